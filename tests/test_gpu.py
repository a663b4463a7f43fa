"""The GPU-only paths: bf16 on one GPU, FSDP2 over several, and vLLM rollouts (`-m gpu`).

Each test runs one or two tiny training steps where its hardware and packages are there, and is
skipped elsewhere with a reason naming what is missing (no CUDA GPU, fewer than two GPUs, no
vllm package). Tiny models are sized for the GPU kernels: head dimension 64 (hidden 128, 2 heads),
which vLLM's attention backends support.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_opd.train import train
from tests.test_train import TINY, step_rows, tiny_cfg

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
VLLM = importlib.util.find_spec("vllm") is not None
NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]

GPU_SIZES = [
    "student.tiny.hidden_size=128", "student.tiny.num_heads=2", "student.tiny.intermediate_size=256",
    "teacher.tiny.hidden_size=128", "teacher.tiny.num_heads=2", "teacher.tiny.intermediate_size=256",
]  # fmt: skip
BF16 = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed", *GPU_SIZES]


class Seen(L.Callback):
    """Records where and in what precision the training steps ran."""

    def __init__(self) -> None:
        self.devices: set[str] = set()
        self.precision: str | None = None

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.devices.add(pl_module.device.type)
        self.precision = str(trainer.precision)


def assert_steps(summary: dict, steps: int) -> None:
    assert summary["steps"] == steps
    losses = [float(r["train/loss"]) for r in step_rows(summary)]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] == losses[-1]


def test_one_bf16_step_on_a_gpu(tmp_path):
    seen = Seen()
    summary = train(tiny_cfg(tmp_path, tmp_path / "cache", *BF16, "trainer.max_steps=1"), callbacks=[seen])
    assert_steps(summary, 1)
    assert seen.devices == {"cuda"}
    assert seen.precision == "bf16-mixed"


@pytest.mark.skipif(GPUS < 2, reason=f"FSDP over GPUs needs at least 2 CUDA GPUs, found {GPUS}")
def test_fsdp_bf16_over_the_gpus(tmp_path):
    """FSDP2 on every visible GPU (a CLI subprocess: Lightning launches one process per GPU)."""
    cli = [sys.executable, "-m", "lightning_opd.cli", "train", str(ROOT / "configs/experiment/default.yaml")]
    args = [*TINY, *BF16, f"trainer.devices={GPUS}", "trainer.strategy=fsdp",
            "trainer.activation_checkpointing=true", "trainer.max_steps=2", f"run.output_dir={tmp_path}",
            f"run.cache_dir={tmp_path / 'cache'}", "run.name=fsdp"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cli, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "fsdp"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert_steps(summary, 2)
    assert summary["world_size"] == GPUS
    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in range(GPUS)]
    for rank in ranks[1:]:  # sharded parameters, gathered: every rank sees the same student
        assert rank["param_checksum"] == pytest.approx(ranks[0]["param_checksum"], rel=1e-5)
    assert (run_dir / "checkpoints" / "last.ckpt").is_dir(), "FSDP writes a sharded checkpoint directory"


@pytest.mark.skipif(not VLLM, reason="rollout.engine=vllm needs the vllm package, which is not importable "
                    "(pip install 'lightning_opd[vllm]')")  # fmt: skip
def test_vllm_rollouts_train(tmp_path):
    """Two steps with vLLM sampling: the second samples with the weights the first updated."""
    summary = train(tiny_cfg(tmp_path, tmp_path / "cache", *BF16, "rollout.engine=vllm", "trainer.max_steps=2"))
    assert_steps(summary, 2)
    rows = step_rows(summary)
    assert all(float(r["train/response_len"]) > 0 for r in rows), "vLLM returned empty responses"
