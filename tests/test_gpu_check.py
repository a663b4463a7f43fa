"""scripts/gpu_check.py on a machine without CUDA: its arguments, the one-line skip, the table.

The checks themselves need a GPU (`make gpu-check` there); these only make sure the script
starts, refuses bad arguments, and says in one line why it did nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


def test_arguments_and_their_defaults(gpu_check) -> None:
    args = gpu_check.parse_args([])
    assert (args.out, args.steps, args.sft_steps, args.budget_s) == ("results/gpu_check.json", 4, 40, 270.0)
    assert not args.no_vllm and not args.no_static and not args.cpu_dry_run and args.work_dir is None
    args = gpu_check.parse_args(["--steps", "2", "--sft-steps", "0", "--no-vllm", "--out", "x.json"])
    assert (args.steps, args.sft_steps, args.no_vllm, args.out) == (2, 0, True, "x.json")


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--sft-steps", "-1"], ["--steps", "two"], ["--bogus"]])
def test_bad_arguments_exit_2(gpu_check, argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2
    assert "gpu_check.py" in capsys.readouterr().err


def test_overrides_are_a_valid_one_gpu_bf16_config(gpu_check, tmp_path) -> None:
    from lightning_opd.config import load

    args = gpu_check.parse_args(["--sft-steps", "10"])
    cfg = load(gpu_check.DEFAULT_CONFIG, overrides=gpu_check.overrides(args, tmp_path, "x", "trainer.strategy=fsdp"))
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.precision) == ("fsdp", 1, "bf16-mixed")
    assert (cfg.teacher.sft.steps, cfg.student.sft.steps) == (10, 5)
    assert cfg.student.tiny.hidden_size // cfg.student.tiny.num_heads == 64  # the GPU kernels' head size
    assert cfg.run.cache_dir == str(tmp_path / "cache") and cfg.trainer.accelerator == "gpu"
    dry = gpu_check.parse_args(["--cpu-dry-run"])
    assert load(gpu_check.DEFAULT_CONFIG, overrides=gpu_check.overrides(dry, tmp_path, "x")).trainer.accelerator == "cpu"


def test_without_cuda_it_says_so_in_one_line_and_exits_0(gpu_check, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == ["gpu_check: skipped: no CUDA (torch.cuda.is_available() is False); nothing was run"]
    assert json.loads(out.read_text())["skipped"].startswith("no CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path, as a subprocess, needs a machine without CUDA")
def test_the_script_runs_as_a_command(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "g.json")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("gpu_check: skipped: no CUDA")


def test_table_of_a_finished_check(gpu_check, capsys) -> None:
    gib = 2**30
    training = {"seconds": 41.5, "peak_allocated_steps_bytes": gib // 2, "peak_allocated_run_bytes": gib,
                "plan": {"allocator_bytes": gib}, "measured_over_plan": 0.5, "phase_seconds": {"rollout": 0.25}}
    result = {"checks": {
        "fsdp_bf16": {"status": "ok", "result": training, "seconds": 42.0},
        "rollout_cache": {"status": "ok", "seconds": 9.0, "result": {
            "dynamic": {"best_later_s": 0.5}, "static": {"best_later_s": 0.25, "first_call_s": 30.0},
            "same_greedy_tokens": True}},
        "vllm": {"status": "skipped", "reason": "vllm is not importable"},
    }}  # fmt: skip
    gpu_check.print_table(result)
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["fsdp_bf16"] == ["fsdp_bf16", "ok", "41.5", "0.500", "1.000", "1.000", "0.50", "0.250"]
    assert "static 0.250 s (first 30.0 s), same tokens True" in out
    assert "vllm" in out and "vllm is not importable" in out


def test_make_has_the_target() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "gpu-check:" in makefile and "scripts/gpu_check.py" in makefile
