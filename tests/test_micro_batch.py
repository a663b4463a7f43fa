"""Micro-batches inside the step (`trainer.micro_batch_size`): the same rollout scored m responses at
a time gives the unsplit step's gradients, loss and metrics.

The unit tests call `OPDModule.training_step` without a Trainer on a fixed rollout (`rollout` is
replaced by responses written out as text), then back-propagate the returned loss as Lightning
would; the integration tests run `train(cfg)` and compare the gradients Lightning hands to the
optimizer. Run as a script, this file is the launcher of the two-process tests: it makes
`on_before_optimizer_step` write every rank's gradients, optionally makes rank 1 admit one prompt
fewer (so that its micro-batch count differs), then calls the CLI.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_opd.config import ConfigError, load
from lightning_opd.data import build_task
from lightning_opd.module import OPDModule
from lightning_opd.rollout.generate import Rollout

ROOT = Path(__file__).resolve().parent.parent

# two answers to each of three prompts: blank-line steps (SOD, split=delimiter), some without EOS
RESPONSES = [
    (0, "3+4=7\n\n2+5=7\n\n#### 77", True),
    (0, "1+1=2 #### 12", False),
    (1, "9+9=18\n\n1+2+1=4\n\n#### 418", True),
    (1, "#### 5", True),
    (2, "6-2=4\n\n#### 44", False),
    (2, "7-3=4\n\n8-1=7 #### 74", True),
]


def fixed_rollout(tokenizer, prompts: list[list[int]]) -> Rollout:
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text, _ in RESPONSES]
    return Rollout(prompt_ids=[prompts[p] for p, _, _ in RESPONSES], response_ids=ids,
                   ended_with_eos=[eos for _, _, eos in RESPONSES], prompt_index=[p for p, _, _ in RESPONSES])  # fmt: skip


def first_sample_right(self, rollout, texts: list[str], answered: list) -> list[float]:
    """Rewards that differ within every group: the first answer to each prompt is right."""
    seen: set[int] = set()
    rewards = []
    for prompt in rollout.prompt_index:
        rewards.append(0.0 if prompt in seen else 1.0)
        seen.add(prompt)
    return rewards


def one_step(split_tokenizer, merge_tokenizer, tiny_llama, *overrides: str, run_dir: Path | None = None):
    """(gradient of every student parameter, logged step metrics) of one step on the fixed rollout."""
    cfg = load(overrides=["data.val_size=4", *overrides])
    student = tiny_llama(split_tokenizer, seed=0)
    teacher = tiny_llama(merge_tokenizer, seed=1, arch="qwen2")
    task = build_task(cfg.data)
    module = OPDModule(cfg, student, teacher, split_tokenizer, merge_tokenizer, task)
    module.train()
    module.run_dir = run_dir
    module.rollout = lambda prompts, greedy=False: fixed_rollout(split_tokenizer, prompts)
    logged: dict = {}
    module._log_train = lambda values, batch_size: logged.update(values)
    loss = module.training_step([task.example(i) for i in range(3)], 0)
    loss.backward()  # as Lightning does with the returned loss
    grads = {name: p.grad.clone() for name, p in module.student.named_parameters()}
    return grads, logged


def assert_same_step(reference, split) -> None:
    (grads, logged), (ref_grads, ref_logged) = split, reference
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert {k for k in logged if not k.startswith("perf/")} == {k for k in ref_logged if not k.startswith("perf/")}
    for key, value in ref_logged.items():
        if key.startswith("perf/"):
            continue
        assert float(logged[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("aligner", ["simct", "bpm"])
@pytest.mark.parametrize("sod", [False, True], ids=["plain", "sod"])
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batches_give_the_unsplit_gradient_loss_and_metrics(split_tokenizer, merge_tokenizer, tiny_llama,
                                                                   tmp_path, aligner, sod, micro):  # fmt: skip
    common = [f"aligner.name={aligner}", f"sod.enabled={str(sod).lower()}", "sod.split=delimiter"]
    runs = {}
    for m in (0, micro):
        (tmp_path / str(m)).mkdir()
        runs[m] = one_step(split_tokenizer, merge_tokenizer, tiny_llama, *common, f"trainer.micro_batch_size={m}",
                           run_dir=tmp_path / str(m))  # fmt: skip
    assert_same_step(runs[0], runs[micro])
    assert math.isfinite(float(runs[micro][1]["train/loss"])) and float(runs[micro][1]["train/loss"]) > 0
    if micro < len(RESPONSES):  # more than one micro-batch: backward ran inside the step
        assert "perf/backward_s" in runs[micro][1] and "perf/backward_s" not in runs[0][1]
    if sod:
        assert float(runs[0][1]["train/sod/w_min"]) < 1  # the weights act
        # the records of SOD steps number the responses in the whole batch, as the unsplit step does
        records = {m: [json.loads(line) for line in (tmp_path / str(m) / "sod_steps.rank0.jsonl").read_text().splitlines()]
                   for m in runs}  # fmt: skip
        assert [r["sequence"] for r in records[micro]] == [r["sequence"] for r in records[0]] == list(range(len(RESPONSES)))
        for split, whole in zip(records[micro], records[0], strict=True):
            assert split["w"] == pytest.approx(whole["w"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("micro", [1, 3])  # 1 and 3 part every group or some: [0 0 1] [1 2 2]
def test_grpo_advantages_are_normalised_over_the_whole_batch_groups(split_tokenizer, merge_tokenizer, tiny_llama,
                                                                    monkeypatch, micro):  # fmt: skip
    # micro-batch 1 puts every answer alone: advantages from the micro-batch's groups would all be 0
    monkeypatch.setattr(OPDModule, "rewards", first_sample_right)
    common = ["aligner.name=bpm", "rl.outcome_coef=1.0", "sod.enabled=true", "sod.split=delimiter"]
    reference = one_step(split_tokenizer, merge_tokenizer, tiny_llama, *common)
    split = one_step(split_tokenizer, merge_tokenizer, tiny_llama, *common, f"trainer.micro_batch_size={micro}")
    assert float(reference[1]["train/outcome_term"]) == pytest.approx(1.0, abs=1e-4)  # |Â| = 1 for every answer
    assert_same_step(reference, split)


def test_supervised_tokens_normaliser_counts_the_whole_batch(split_tokenizer, merge_tokenizer, tiny_llama):
    common = ["aligner.name=exact", "loss.normalizer=supervised_tokens"]
    reference = one_step(split_tokenizer, merge_tokenizer, tiny_llama, *common)
    assert_same_step(reference, one_step(split_tokenizer, merge_tokenizer, tiny_llama, *common,
                                         "trainer.micro_batch_size=2"))  # fmt: skip


def test_negative_micro_batch_size_is_a_config_error():
    with pytest.raises(ConfigError, match=r"trainer.micro_batch_size must be >= 0"):
        load(overrides=["trainer.micro_batch_size=-1"])
    assert load(overrides=["trainer.micro_batch_size=0"]).trainer.micro_batch_size == 0  # the default


def test_bench_section_measures_each_batch_unsplit_and_micro_batched_at_the_same_loss(split_tokenizer,
                                                                                      merge_tokenizer):  # fmt: skip
    from lightning_opd.cli.bench import BenchSettings, micro_batch_points

    settings = BenchSettings(micro_batch_sizes=(2, 4), micro_batch=1, micro_response_tokens=8)
    points = micro_batch_points(settings, split_tokenizer, merge_tokenizer)
    assert [(r["batch"], r["micro_batch_size"]) for r in points] == [(2, 0), (4, 0), (2, 1), (4, 1)]
    for r in points:
        assert r["loss_rel_diff"] < 1e-5 and r["seconds"] > 0 and math.isfinite(r["loss"])
        assert r["logits_mb_per_pass"] > 0 and (r["peak_mb"] is None or r["peak_mb"] >= 0)


# --- train(cfg): gradients as Lightning hands them to the optimizer ------------------------------


class GradientsBeforeStep(L.Callback):
    """Keeps the student's gradients of each optimizer step (before clipping)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.student.named_parameters()})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_train_with_micro_batches_hands_the_optimizer_the_unsplit_gradient(tmp_path, cache_dir):
    from lightning_opd.train import train
    from tests.test_train import step_rows, tiny_cfg

    runs = {}
    for m in (0, 1):
        grads = GradientsBeforeStep()
        summary = train(tiny_cfg(tmp_path, cache_dir, f"run.name=m{m}", "trainer.max_steps=2",
                                 f"trainer.micro_batch_size={m}"), callbacks=[grads])  # fmt: skip
        assert summary["steps"] == 2
        runs[m] = (grads.steps, step_rows(summary))
    (ref_grads, ref_rows), (grads, rows) = runs[0], runs[1]
    assert len(grads) == len(ref_grads) == 2
    # the first step: same batch, same seed, so the same rollout, and the same gradient
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, ref_grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    assert float(rows[0]["train/loss"]) == pytest.approx(float(ref_rows[0]["train/loss"]), rel=1e-5)
    assert float(rows[0]["train/coverage"]) == pytest.approx(float(ref_rows[0]["train/coverage"]), rel=1e-6)
    # the second step's gradient is its own: Lightning did not keep the first step's
    assert all(math.isfinite(float(r["train/loss"])) for r in rows) and "perf/backward_s" in rows[0]
    differs = any(not torch.allclose(grads[1][n], grads[0][n]) for n in grads[0])
    assert differs


# --- two processes: DDP and FSDP ---------------------------------------------------------------

TIMEOUT_S = 300


def grad_record(module) -> dict:
    """A position-weighted sum of each student gradient (gathered when sharded), by name."""
    out = {}
    for name, p in module.student.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        weights = torch.linspace(1.0, 2.0, grad.numel(), dtype=torch.float64)
        out[name] = float((grad.detach().double().flatten().cpu() * weights).sum())
    return out


def patch_for_two_ranks(drop_on_rank_1: bool) -> None:
    """Every rank writes its gradients before each optimizer step; rank 1 may admit a prompt fewer."""
    admit, before_step = OPDModule._admit, OPDModule.on_before_optimizer_step

    def admit_one_fewer_on_rank_1(self, batch):
        examples, prompts = admit(self, batch)
        if drop_on_rank_1 and self.global_rank == 1:
            self.skipped_prompts += 1
            return examples[1:], prompts[1:]
        return examples, prompts

    def record_gradients(self, optimizer):
        record = grad_record(self)  # every rank: gathering a sharded gradient is a collective
        path = self.run_dir / f"grads.rank{self.global_rank}.jsonl"
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        before_step(self, optimizer)

    OPDModule._admit = admit_one_fewer_on_rank_1
    OPDModule.on_before_optimizer_step = record_gradients


def two_rank_gradients(tmp_path: Path, strategy: str, micro: int, drop: bool) -> list[list[dict]]:
    from tests.test_train import TINY

    name = f"{strategy}-m{micro}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DROP_ON_RANK_1": str(int(drop))}
    args = [sys.executable, __file__, "train", str(ROOT / "configs/experiment/default.yaml"), *TINY,
            f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'cache'}", f"run.name={name}",
            "trainer.devices=2", f"trainer.strategy={strategy}", "trainer.max_steps=1", "data.val_size=2",
            f"trainer.micro_batch_size={micro}"]  # fmt: skip
    try:
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the 2-process run did not finish in {TIMEOUT_S} s (deadlock?): {str(err.stderr)[-2000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [[json.loads(line) for line in (tmp_path / name / f"grads.rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_with_micro_batches_sync_the_unsplit_gradient(tmp_path, strategy):
    # rank 1 admits 3 prompts, rank 0 all 4: with micro-batch 1 their counts differ (fsdp pads)
    reference = two_rank_gradients(tmp_path, strategy, 0, drop=True)
    split = two_rank_gradients(tmp_path, strategy, 1, drop=True)
    for ranks in (reference, split):
        assert len(ranks[0]) == len(ranks[1]) == 1
        assert ranks[0][0] == pytest.approx(ranks[1][0], rel=1e-6)  # the ranks agree
    assert split[0][0] == pytest.approx(reference[0][0], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_fsdp_rank_with_only_overlong_prompts_runs_micro_batched_placeholder_steps(tmp_path):
    """tests/test_skip_rank.py's launcher (rank 0 admits nothing) with micro-batch 1 under fsdp:
    rank 0 runs one placeholder micro-batch and pads to rank 1's four, no deadlock."""
    from tests.test_train import TINY

    launcher = ROOT / "tests" / "test_skip_rank.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SKIP_RANK": "0"}
    args = [sys.executable, str(launcher), "train", str(ROOT / "configs/experiment/default.yaml"), *TINY,
            f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'cache'}", "run.name=skip",
            "trainer.devices=2", "trainer.strategy=fsdp", "trainer.max_steps=2", "data.val_size=2",
            "trainer.micro_batch_size=1"]  # fmt: skip
    try:
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the 2-process run did not finish in {TIMEOUT_S} s (deadlock?): {str(err.stderr)[-2000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "skip"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_prompts"] == 2 * 4 and summary["final_loss"] == 0.0
    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-6)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    patch_for_two_ranks(os.environ.get("DROP_ON_RANK_1") == "1")
    from lightning_opd.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))
