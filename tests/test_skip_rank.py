"""Two CPU processes (DDP, gloo) where one rank's prompts are all too long: the ranks agree, the
rank with nothing admitted runs a zero-loss placeholder step, and the run finishes (no deadlock).

Run as a script, this file is the launcher: it makes `OPDModule._admit` treat every prompt of
rank $SKIP_RANK as too long, then calls the CLI. Lightning's DDP launcher starts the second
process by running this same script again, so both ranks carry the patch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240  # a deadlock fails the test here instead of hanging it


def patch_admit(skip_rank: str) -> None:
    """Rank `skip_rank` ("all": every rank) admits no prompt."""
    from lightning_opd.module import OPDModule

    admit = OPDModule._admit

    def admit_nothing_on_skip_rank(self, batch):
        examples, prompts = admit(self, batch)
        if skip_rank not in ("all", str(self.global_rank)):
            return examples, prompts
        self.skipped_prompts += len(examples)  # as if every prompt were over data.max_prompt_tokens
        return [], []

    OPDModule._admit = admit_nothing_on_skip_rank


def run_two_ranks(tmp_path: Path, skip_rank: str) -> Path:
    """The tiny default, DDP on 2 CPU processes for 2 steps, rank `skip_rank` admitting nothing."""
    from tests.test_train import TINY

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SKIP_RANK": skip_rank}
    args = [sys.executable, __file__, "train", str(ROOT / "configs/experiment/default.yaml"), *TINY,
            f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'cache'}", "run.name=skip",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=2",
            "data.val_size=2"]  # fmt: skip
    try:
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the 2-process run did not finish in {TIMEOUT_S} s (deadlock?): {str(err.stderr)[-2000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path / "skip"


def test_one_rank_with_only_overlong_prompts_does_not_deadlock(tmp_path):
    run_dir = run_two_ranks(tmp_path, skip_rank="0")
    summary = json.loads((run_dir / "summary.json").read_text())  # written by rank 0, the skipping rank
    assert summary["steps"] == 2 and summary["world_size"] == 2
    assert summary["skipped_prompts"] == 2 * 4  # every prompt of both steps (data.batch_size=4)
    assert summary["final_loss"] == 0.0  # rank 0's placeholder loss; rank 1 trained
    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert math.isfinite(ranks[0]["param_checksum"])
    # the gradient sync ran on both steps: both ranks hold the same parameters
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-6)


def test_every_rank_with_only_overlong_prompts_skips_together(tmp_path):
    run_dir = run_two_ranks(tmp_path, skip_rank="all")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["skipped_prompts"] == 2 * 4
    assert summary["final_loss"] is None  # no step trained
    assert "train/skipped_prompts" in (run_dir / "metrics.csv").read_text()
    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-6)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from lightning_opd.cli.main import main

    patch_admit(os.environ.get("SKIP_RANK", "1"))
    sys.exit(main(sys.argv[1:]))
