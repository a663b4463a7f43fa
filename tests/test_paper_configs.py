"""The paper-pair and SOD experiment configs, each trained for one step at toy scale.

Each config under configs/experiment/ that names real models by hub id is loaded as it is, with
overrides that change only the scale: no `path` (so prepare builds the `tiny` model), the same
architecture family built tiny, the real tokenizers where a packaged fixture exists (a stand-in
fixture where none does), a handful of GSM8K prompts, one step of float32 on the CPU. Nothing is
downloaded (HF_HUB_OFFLINE=1). Everything else (aligner, loss, SOD, tools, GRPO mixing) is the
config's own, and the test checks it was in effect.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from lightning_opd.config import load
from lightning_opd.gguf_models import is_gguf_spec
from lightning_opd.rollout.sandbox import isolation_problem
from lightning_opd.train import train

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "configs" / "experiment"
GSM8K = ROOT / "data" / "gsm8k"

# Tiny stand-ins per named model: (tiny.arch, tokenizer source). `tiny.arch` offers llama | qwen2.
# - Qwen2.5-7B-Instruct: qwen2 (its own family); tokenizer fixture:qwen2.5 (its real tokenizer).
# - Qwen3-0.6B / Qwen3-4B: qwen2 (Qwen3 is Qwen2 plus QK-norm, the closest family offered);
#   fixture:qwen2.5 (Qwen3 has the same BPE ranks; it adds only <think>/<tool_response> tokens,
#   and keeps <tool_call> for the Hermes format).
# - gemma-2-2b-it: llama (no Gemma family is offered; Gemma's decoder is Llama-like). No fixture
#   has Gemma's SentencePiece vocabulary: fixture:deepseek stands in (a real large vocabulary,
#   different from the other side's, so the pair stays cross-tokenizer).
# - Phi-4-mini-instruct: llama (no Phi3 family is offered; Phi3 is Llama with fused projections).
#   No fixture has its o200k vocabulary: fixture:gpt2 stands in (OpenAI's BPE lineage).
STAND_INS = {
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", "fixture:qwen2.5"),
    "Qwen/Qwen3-0.6B": ("qwen2", "fixture:qwen2.5"),
    "Qwen/Qwen3-4B": ("qwen2", "fixture:qwen2.5"),
    "google/gemma-2-2b-it": ("llama", "fixture:deepseek"),
    "microsoft/Phi-4-mini-instruct": ("llama", "fixture:gpt2"),
}
# the configs that name real models by hub id (test_every_paper_config_is_covered keeps this list
# in step with the folder)
PAPER_CONFIGS = {
    "simct_qwen7b_gemma2b": ("Qwen/Qwen2.5-7B-Instruct", "google/gemma-2-2b-it"),
    "simct_qwen7b_phi4mini": ("Qwen/Qwen2.5-7B-Instruct", "microsoft/Phi-4-mini-instruct"),
    "simct_phi4mini_gemma2b": ("microsoft/Phi-4-mini-instruct", "google/gemma-2-2b-it"),
    "sod_qwen3": ("Qwen/Qwen3-4B", "Qwen/Qwen3-0.6B"),
}  # experiment -> (teacher, student)
PROMPTS = 4  # training prompts copied from data/gsm8k/train.jsonl
VAL_PROMPTS = 1  # held-out prompts copied from data/gsm8k/test.jsonl


def gsm8k_sample(tmp_path: Path) -> tuple[Path, Path]:
    """A handful of GSM8K lines, so the run reads a few prompts rather than the whole file."""
    out = []
    for name, n in (("train.jsonl", PROMPTS), ("test.jsonl", VAL_PROMPTS)):
        lines = (GSM8K / name).read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        path = tmp_path / name
        path.write_text("".join(lines), encoding="utf-8")
        out.append(path)
    return out[0], out[1]


def toy_overrides(experiment: str, tmp_path: Path) -> list[str]:
    """Everything from the config except scale."""
    train_path, val_path = gsm8k_sample(tmp_path)
    teacher, student = PAPER_CONFIGS[experiment]
    overrides = [
        f"data.path={train_path}", f"data.val_path={val_path}", f"data.val_size={VAL_PROMPTS}",
        "data.batch_size=2", "rollout.max_new_tokens=6", "trainer.max_steps=1",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto",
        "trainer.precision=32-true", "trainer.activation_checkpointing=false",
        "trainer.progress_bar=false", f"run.output_dir={tmp_path / 'runs'}", "run.name=toy",
        f"run.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    # the teacher is the larger model of each pair, here too: two layers to the student's one (and
    # so never the student's twin, which two same-seed tiny models of one family would be)
    for role, model, layers in (("teacher", teacher, 2), ("student", student, 1)):
        arch, tokenizer = STAND_INS[model]
        overrides += [
            f"{role}.path=null", f"{role}.tokenizer.source={tokenizer}", f"{role}.tiny.arch={arch}",
            f"{role}.tiny.hidden_size=16", f"{role}.tiny.num_layers={layers}", f"{role}.tiny.num_heads=2",
            f"{role}.tiny.intermediate_size=32", f"{role}.tiny.max_position_embeddings=512",
            f"{role}.sft.steps=0", f"{role}.dtype=float32",
        ]  # fmt: skip
    return overrides


def step_rows(summary: dict) -> list[dict[str, str]]:
    rows = csv.DictReader((Path(summary["run_dir"]) / "metrics.csv").open())
    return [r for r in rows if r.get("train/loss")]


def test_every_paper_config_is_covered():
    """Every experiment config that names a model by hub id is one of the cases below."""
    named = set()
    for path in EXPERIMENTS.glob("*.yaml"):
        cfg = load(path)
        paths = [p for p in (cfg.student.path, cfg.teacher.path) if p]
        if paths and not all(is_gguf_spec(p) for p in paths):  # GGUF pairs: tests/test_real_weights.py
            named.add(path.stem)
            assert (cfg.teacher.path, cfg.student.path) == PAPER_CONFIGS.get(path.stem), path.stem
    assert named == set(PAPER_CONFIGS)


@pytest.mark.slow  # a few seconds each; `make test` runs them
@pytest.mark.parametrize("experiment", sorted(PAPER_CONFIGS))
def test_paper_config_trains_one_step_at_toy_scale(experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    config_file = EXPERIMENTS / f"{experiment}.yaml"
    full = load(config_file)
    if full.tools.enabled and (problem := isolation_problem()) is not None:
        pytest.skip(f"{experiment} runs tool calls, and the sandbox is unavailable: {problem}")
    overrides = toy_overrides(experiment, tmp_path)
    if full.rollout.samples_per_prompt > 1:  # a group of 2 keeps GRPO's group normalisation
        overrides.append("rollout.samples_per_prompt=2")
    if full.tools.enabled:
        overrides.append("tools.max_turns=2")
    cfg = load(config_file, overrides=overrides)

    # the toy run keeps every setting of the config that is not about scale
    for key in ("aligner", "loss.form", "loss.divergence", "sod", "rl", "rollout.temperature",
                "tools.enabled", "tools.format", "optim.lr"):  # fmt: skip
        section, _, name = key.partition(".")
        want = getattr(getattr(full, section), name) if name else getattr(full, section)
        got = getattr(getattr(cfg, section), name) if name else getattr(cfg, section)
        assert got == want, key
    assert cfg.student.path is None and cfg.teacher.path is None

    summary = train(cfg)

    assert summary["experiment"] == experiment
    assert summary["steps"] == 1
    assert summary["aligner"] == full.aligner.name
    losses = [float(r["train/loss"]) for r in step_rows(summary)]
    assert len(losses) == 1 and math.isfinite(losses[0]), losses
    assert losses[0] != 0.0, "zero loss: the teacher gave no signal that differs from the student"
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] == losses[0]
    row = step_rows(summary)[0]
    assert float(row["train/rows"]) > 0, "no supervision rows: nothing was distilled"
    run_dir = Path(summary["run_dir"])
    teacher, student = PAPER_CONFIGS[experiment]
    for role, model in (("teacher", teacher), ("student", student)):  # built tiny, not loaded
        assert summary[f"prepare/{role}_cache"] == "miss"
        assert summary[f"prepare/{role}_parameters"] < 5_000_000
        (built,) = (tmp_path / "cache").glob(f"{role}-*/config.json")
        assert json.loads(built.read_text())["model_type"] == STAND_INS[model][0]
    if full.sod.enabled:
        assert row.get("train/sod/w_mean") not in (None, ""), "SOD weights were not computed"
        assert float(row["train/sod/d_mean"]) > 0, "SOD step divergences are all zero"
        assert 0 < float(row["train/sod/w_min"]) <= float(row["train/sod/w_mean"]) <= 1 + full.sod.delta
        assert list(run_dir.glob("sod_steps.rank*.jsonl")), "no SOD step record"
    else:
        assert "train/sod/w_mean" not in row
    if full.tools.enabled:
        assert cfg.tools.format == "hermes"
        assert "tool_calls" in summary and "tool_success_rate" in summary
        assert row.get("train/tool_calls") not in (None, "")
    if full.rl.outcome_coef > 0:  # GRPO mixing: the outcome term is computed and logged
        assert row.get("train/outcome_term") not in (None, "")
        assert math.isfinite(float(row["train/outcome_term"]))
