"""The whole pipeline on CPU with tiny models: train(cfg), its run directory, resume, every config."""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_opd.cli import main
from lightning_opd.config import load
from lightning_opd.module import OPDModule
from lightning_opd.train import SUMMARY_KEYS, TrainingInterrupted, train

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "student.tiny.hidden_size=32", "student.tiny.num_layers=1", "student.tiny.num_heads=2",
    "student.tiny.intermediate_size=64", "teacher.tiny.hidden_size=32", "teacher.tiny.num_layers=1",
    "teacher.tiny.num_heads=2", "teacher.tiny.intermediate_size=64",
    "student.sft.steps=2", "teacher.sft.steps=2", "student.sft.batch_size=8", "teacher.sft.batch_size=8",
    "data.batch_size=4", "data.val_size=4", "rollout.max_new_tokens=12", "trainer.max_steps=2",
    "trainer.progress_bar=false", "trainer.accelerator=cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_cfg(tmp_path: Path, cache_dir: Path, *extra: str, experiment: str = "default"):
    overrides = TINY + [f"run.output_dir={tmp_path}", f"run.cache_dir={cache_dir}", *extra]
    return load(ROOT / "configs" / "experiment" / f"{experiment}.yaml", overrides=overrides)


def step_rows(summary: dict) -> list[dict[str, str]]:
    """The metrics.csv rows of the run's training steps (those that logged a loss)."""
    rows = csv.DictReader((Path(summary["run_dir"]) / "metrics.csv").open())
    return [r for r in rows if r.get("train/loss")]


def assert_trained(summary: dict, steps: int) -> list[dict[str, str]]:
    """What any training run must show: every step ran and logged a finite loss, and the loss moved
    (the student was updated, and a different batch was drawn). Returns the step rows."""
    assert summary["steps"] == steps
    rows = step_rows(summary)
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    assert len(set(losses)) > 1, f"the loss did not change over the run: {losses}"
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] == losses[-1]
    return rows


def test_train_writes_run_directory_and_summary(tmp_path, cache_dir):
    summary = train(tiny_cfg(tmp_path, cache_dir, "run.name=run1"))
    run_dir = tmp_path / "run1"
    for key in SUMMARY_KEYS:
        assert key in summary
    assert summary["steps"] == 2
    assert 0.0 <= summary["coverage"] <= 1.0
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["steps"] == 2 and on_disk["aligner"] == "bpm"  # the default's aligner
    assert (run_dir / "config.yaml").read_text().count("max_steps: 2") == 1
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    columns = set(rows[0])
    for name in ("train/loss", "train/coverage", "train/response_len", "train/reward", "perf/rollout_s",
                 "perf/teacher_s", "perf/align_s", "perf/update_s", "val/accuracy"):  # fmt: skip
        assert name in columns, name
    assert_trained(summary, steps=2)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_second_run_reuses_the_cached_teacher(tmp_path, cache_dir):
    train(tiny_cfg(tmp_path, cache_dir, "run.name=a"))
    summary = train(tiny_cfg(tmp_path, cache_dir, "run.name=b"))
    assert summary["prepare/teacher_cache"] == "hit"
    assert summary["prepare/student_cache"] == "hit"


def test_resume_from_checkpoint_continues_the_step_count(tmp_path, cache_dir):
    train(tiny_cfg(tmp_path, cache_dir, "run.name=first"))
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    summary = train(tiny_cfg(tmp_path, cache_dir, "run.name=second", "trainer.max_steps=3",
                             f"run.resume_from={ckpt}"))  # fmt: skip
    assert summary["steps"] == 3
    rows = list(csv.DictReader((tmp_path / "second" / "metrics.csv").open()))
    assert len([r for r in rows if r["train/loss"]]) == 1  # only the third step ran


def test_both_loss_forms_train(tmp_path, cache_dir):
    first_loss = {}
    for form in ("full", "sampled"):
        summary = train(tiny_cfg(tmp_path, cache_dir, f"loss.form={form}", f"run.name={form}", "trainer.max_steps=2"))
        rows = assert_trained(summary, steps=2)
        first_loss[form] = float(rows[0]["train/loss"])
        # simct over two different tokenizers: a share of the teacher's probability, every step
        masses = [float(r["train/teacher_mass"]) for r in rows]
        assert all(0 < m <= 1 for m in masses), (form, masses)
        if form == "full":  # a KL between distributions: never negative
            assert all(float(r["train/loss"]) >= 0 for r in rows)
    # same seed, so the same first rollout: the two forms must score it differently
    assert first_loss["full"] != pytest.approx(first_loss["sampled"], rel=1e-3), first_loss


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_config_runs_one_tiny_step(tmp_path, cache_dir, path):
    cfg = tiny_cfg(tmp_path, cache_dir, "trainer.max_steps=1", experiment=path.stem)
    if cfg.student.path or cfg.teacher.path:
        pytest.skip("needs downloaded models")
    if cfg.data.path and not Path(cfg.data.path).is_file():
        pytest.skip(f"data file {cfg.data.path} is not on this machine")
    assert train(cfg)["steps"] == 1


def test_cli_train_prints_the_results_table(tmp_path, cache_dir, capsys):
    args = ["train", str(ROOT / "configs/experiment/default.yaml"), *TINY, f"run.output_dir={tmp_path}",
            f"run.cache_dir={cache_dir}", "run.name=cli"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "student_accuracy_after" in out and "coverage" in out


def test_tool_sod_run_logs_tool_and_step_metrics(tmp_path, cache_dir):
    summary = train(tiny_cfg(tmp_path, cache_dir, "run.name=sod", "trainer.max_steps=1", "rollout.max_new_tokens=24",
                             experiment="arith_tool_sod"))  # fmt: skip
    run_dir = Path(summary["run_dir"])
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["train/loss"]]
    for name in ("train/tool_calls", "train/tool_success_rate", "train/sod/d_mean", "train/sod/w_mean",
                 "train/sod/w_min", "train/sod/steps"):  # fmt: skip
        assert rows[0][name] != "", name
    # the summary (and the printed table) reports the rollouts' tool use
    assert summary["tool_calls"] == float(rows[0]["train/tool_calls"])
    assert summary["tool_success_rate"] == float(rows[0]["train/tool_success_rate"])
    assert "tool_calls" not in train(tiny_cfg(tmp_path, cache_dir, "run.name=plain", "trainer.max_steps=1"))
    records = [json.loads(line) for line in (run_dir / "sod_steps.rank0.jsonl").read_text().splitlines()]
    assert records and all(len(r["d"]) == len(r["w"]) and r["w"][0] == 1.0 for r in records)


def first_sample_right(self, rollout, texts: list[str], answered: list) -> list[float]:
    """Rewards that differ within every group: the first answer to each prompt is right."""
    seen: set[int] = set()
    rewards = []
    for prompt in rollout.prompt_index:
        rewards.append(0.0 if prompt in seen else 1.0)
        seen.add(prompt)
    return rewards


def steps_of_four_tokens(self, rollout, texts: list[str], offsets: torch.Tensor) -> torch.Tensor:
    """SOD steps of four tokens each: a two-step SFT student writes no delimiter nor valid UTF-8."""
    return torch.cat([torch.arange(int(n)) // 4 for n in offsets.diff()])


def test_grpo_mixing_with_sod_weights_trains(tmp_path, cache_dir, monkeypatch):
    # a tiny student answers nothing right, so every group's rewards are equal and Â = 0, and its
    # text has no step delimiters: rewards that differ within each group and steps of four
    # tokens stand in, so that both the outcome term and the SOD weights act
    monkeypatch.setattr(OPDModule, "rewards", first_sample_right)
    monkeypatch.setattr(OPDModule, "packed_step_ids", steps_of_four_tokens)
    summary = train(tiny_cfg(tmp_path, cache_dir, "trainer.max_steps=2", "rl.outcome_coef=1.0",
                             "rollout.samples_per_prompt=2", "sod.enabled=true"))  # fmt: skip
    rows = assert_trained(summary, steps=2)
    # the outcome term is on: two answers per prompt, rewards 1 and 0 -> |Â| = 1 for each
    assert [float(r["train/outcome_term"]) for r in rows] == pytest.approx([1.0, 1.0], abs=1e-4)
    # the SOD weights are on, and not all 1 (a later step diverging more gets w < 1)
    assert all(float(r["train/sod/steps"]) > 1 for r in rows)
    assert any(float(r["train/sod/w_min"]) < 1 for r in rows)


def test_outcome_term_is_not_logged_without_grpo_mixing(tmp_path, cache_dir):
    summary = train(tiny_cfg(tmp_path, cache_dir, "trainer.max_steps=1"))
    assert "train/outcome_term" not in step_rows(summary)[0]


class InterruptAt(L.Callback):
    """Raises KeyboardInterrupt, as Ctrl-C would, when step `step` is about to run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_continues_at_that_step(tmp_path, cache_dir, capsys):
    steps = "trainer.max_steps=3"
    straight = train(tiny_cfg(tmp_path, cache_dir, "run.name=straight", steps))
    handler = signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny_cfg(tmp_path, cache_dir, "run.name=cut", steps), callbacks=[InterruptAt(2)])
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning's SIG_IGN is undone
    ckpt = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert stopped.value.checkpoint == ckpt and ckpt.is_file()
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("lightning-opd:")]
    assert f"run.name=cut run.resume_from={ckpt}" in line and "after 2 finished step(s)" in line

    # cut again before its first step: nothing new is saved, and metrics.csv keeps the rows so far
    with pytest.raises(TrainingInterrupted) as again:
        train(tiny_cfg(tmp_path, cache_dir, "run.name=cut", steps, f"run.resume_from={ckpt}"),
              callbacks=[InterruptAt(2)])  # fmt: skip
    assert again.value.checkpoint is None and f"run.resume_from={ckpt}" in again.value.message
    assert [r["step"] for r in step_rows({"run_dir": str(tmp_path / "cut")})] == ["0", "1"]

    resumed = train(tiny_cfg(tmp_path, cache_dir, "run.name=cut", steps, f"run.resume_from={ckpt}"))
    assert resumed["steps"] == 3
    rows, reference = step_rows(resumed), step_rows(straight)
    assert [r["step"] for r in rows] == [r["step"] for r in reference]  # steps 0, 1 kept; 2 trained now
    # the step cut off was taken again as the uninterrupted run took it: same batch, same samples
    losses = [float(r["train/loss"]) for r in rows]
    assert losses == pytest.approx([float(r["train/loss"]) for r in reference], rel=1e-6)


def test_ctrl_c_before_a_step_finished_saves_nothing_and_says_so(tmp_path, cache_dir):
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny_cfg(tmp_path, cache_dir, "run.name=early"), callbacks=[InterruptAt(0)])
    assert stopped.value.checkpoint is None and "start over" in stopped.value.message
    assert not (tmp_path / "early" / "checkpoints" / "last.ckpt").exists()


def test_cli_train_exits_130_on_ctrl_c_mid_step_naming_the_checkpoint(tmp_path, cache_dir, capsys, monkeypatch):
    rollout = OPDModule.rollout

    def cut_in_step_1(self, *args, **kwargs):  # Ctrl-C while the student samples, in the second step
        if self.global_step == 1:
            raise KeyboardInterrupt
        return rollout(self, *args, **kwargs)

    monkeypatch.setattr(OPDModule, "rollout", cut_in_step_1)
    args = ["train", str(ROOT / "configs/experiment/default.yaml"), *TINY, f"run.output_dir={tmp_path}",
            f"run.cache_dir={cache_dir}", "run.name=cli_cut"]  # fmt: skip
    assert main(args) == 130
    ckpt = tmp_path / "cli_cut" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 1
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("lightning-opd:")]
    assert len(lines) == 1 and f"run.resume_from={ckpt}" in lines[0]


def test_cli_exits_130_on_ctrl_c_during_preparation(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lightning_opd.train.prepare", interrupted)
    assert main(["train", *TINY, f"run.output_dir={tmp_path}", "run.name=prep"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "lightning-opd: interrupted"
