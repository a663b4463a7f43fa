"""Two CPU processes (gloo): DDP and FSDP2 train, agree on parameters, split prompts, resume;
and a single-process run stopped and resumed ends where an uninterrupted one does."""

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

from lightning_opd.rollout.sandbox import isolation_problem
from lightning_opd.train import train
from tests.test_train import TINY, tiny_cfg

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "lightning_opd.cli", "train", str(ROOT / "configs/experiment/default.yaml")]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*CLI, *TINY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def two_process_run(tmp_path: Path, strategy: str, *extra: str) -> Path:
    run_cli(f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'cache'}", f"run.name={strategy}",
            "trainer.accelerator=cpu", "trainer.devices=2", f"trainer.strategy={strategy}", *extra)  # fmt: skip
    return tmp_path / strategy


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_agree_and_split_prompts(tmp_path, strategy):
    run_dir = two_process_run(tmp_path, strategy, "trainer.max_steps=2")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2
    assert math.isfinite(summary["final_loss"]) and abs(summary["final_loss"]) < 1e6
    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-6)
    uids = [set(r["prompt_uids"]) for r in ranks]
    assert len(uids[0]) == len(ranks[0]["prompt_uids"]) > 0
    assert not uids[0] & uids[1], "a prompt was trained on by both ranks"


def test_fsdp_sharded_checkpoint_resumes(tmp_path):
    run_dir = two_process_run(tmp_path, "fsdp", "trainer.max_steps=2")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir(), "FSDP should write a distributed (sharded) checkpoint directory"
    run_cli(f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'cache'}", "run.name=resumed",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=fsdp", "trainer.max_steps=3",
            f"run.resume_from={ckpt}")  # fmt: skip
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["steps"] == 3


class StopAt(L.Callback):
    """Stops training after `step` optimizer steps, as an interruption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def student_state(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    steps = ["trainer.max_steps=4", "rollout.temperature=1.0"]
    train(tiny_cfg(tmp_path, cache, "run.name=straight", *steps))
    train(tiny_cfg(tmp_path, cache, "run.name=part1", *steps), callbacks=[StopAt(2)])
    part1 = student_state(tmp_path / "part1")
    ckpt = tmp_path / "part1" / "checkpoints" / "last.ckpt"
    summary = train(tiny_cfg(tmp_path, cache, "run.name=part2", *steps, f"run.resume_from={ckpt}"))
    assert summary["steps"] == 4
    straight, resumed = student_state(tmp_path / "straight"), student_state(tmp_path / "part2")
    assert straight.keys() == resumed.keys()
    assert any(not torch.equal(part1[k], straight[k]) for k in straight), "training changed nothing"
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


@pytest.mark.skipif(isolation_problem() is not None, reason="tool calls run in the sandbox")
def test_tool_rollouts_train_under_fsdp_on_two_processes(tmp_path):
    """Once refused; the tool loop now keeps the ranks' forward passes in step (rollout/tools.py;
    tests/test_tool_sync.py makes the ranks take different numbers of turns)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [*CLI[:-1], str(ROOT / "configs/experiment/arith_tool_opd.yaml"), *TINY, f"run.output_dir={tmp_path}",
            f"run.cache_dir={tmp_path / 'cache'}", "run.name=tools", "trainer.devices=2", "trainer.strategy=fsdp",
            "trainer.max_steps=1", "data.val_size=2", "rollout.max_new_tokens=24"]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "tools" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["world_size"] == 2
    assert math.isfinite(summary["final_loss"])
