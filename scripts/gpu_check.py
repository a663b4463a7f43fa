"""The prepared GPU check (`make gpu-check`): one script, under 5 minutes on one H200-class GPU.

    .venv/bin/python scripts/gpu_check.py [--out results/gpu_check.json] [--steps 4] [--sft-steps 40]
                                          [--budget-s 270] [--no-vllm] [--no-static] [--work-dir DIR]

What it runs, in order, each check on its own (a failure is recorded and the next one runs):

1. `fsdp_bf16`: `lightning_opd.train.train(cfg)` of the embedded default (configs/experiment/
   default.yaml; tokenizers trained and tiny models built on the spot, nothing downloaded) with
   `trainer.strategy=fsdp` on 1 GPU, `trainer.precision=bf16-mixed`, head dimension 64 (hidden
   128, 2 heads, as tests/test_gpu.py sizes them for the GPU kernels), a short SFT of both models
   (`--sft-steps` for the teacher, half for the student; the default's 600/250 would not fit the
   time) and `--steps` OPD steps. It records the peak CUDA memory of the training steps
   (`torch.cuda.max_memory_allocated`, reset when the first step starts) and of the whole call
   (SFT and validation included), against the planner's estimate for the same config
   (`lightning_opd.cli.plan.make_plan`, what `lightning-opd plan` prints, with the measured prompt
   length): the planner's total, and that total less its assumed CUDA context reserve (which the
   allocator does not count). Also each phase's seconds per step (`perf/*_s` of metrics.csv).
2. `auto_bf16`: the same run without FSDP (`trainer.strategy=auto`), its models from the cache
   that check 1 filled: the same numbers, for comparison.
3. `vllm`: if `vllm` is importable, the run of check 2 with `rollout.engine=vllm` (2 steps): its
   rollout seconds and peak memory (the engine's pool, `VLLM_GPU_MEMORY_UTILIZATION` of the GPU,
   comes from the same allocator). Skipped, with the reason, when vllm is not installed.
4. `rollout_cache`: HF `generate` of the SFT'd student (bf16) on 64 prompts, 64 new tokens, greedy,
   with `rollout.cache=dynamic` and `static` (on CUDA HF compiles the forward for a static cache:
   the first call includes that; `--no-static` leaves it out), seconds per call, and whether the
   two give the same tokens.

Checks that would start after `--budget-s` seconds are skipped (recorded as such). Everything is
written to `--out` as JSON and printed as a table. Exit status: 0 when every check passed or was
skipped, 1 when one failed. Without CUDA it prints one line, "gpu_check: skipped: no CUDA ...",
writes a JSON saying so, and exits 0 (nothing to check on this machine).

`--cpu-dry-run` runs checks 1, 2 and 4 on the CPU instead (no memory numbers, vLLM skipped): a
check of the script itself on a machine without a GPU, e.g. `--cpu-dry-run --steps 1 --sft-steps 4`
(15 s to 2 minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python scripts/gpu_check.py` from anywhere
    sys.path.insert(0, str(ROOT))

DEFAULT_CONFIG = ROOT / "configs" / "experiment" / "default.yaml"
GIB = 2**30
PHASES = ("rollout", "teacher", "student_forward", "align", "loss", "update")
# head dimension 64 for the GPU attention kernels (vLLM's among them), as tests/test_gpu.py sizes them
GPU_SIZES = (
    "student.tiny.hidden_size=128", "student.tiny.num_heads=2", "student.tiny.intermediate_size=256",
    "teacher.tiny.hidden_size=128", "teacher.tiny.num_heads=2", "teacher.tiny.intermediate_size=256",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/gpu_check.json", help="JSON file to write (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="OPD steps of the fsdp and auto runs (default: %(default)s)")
    parser.add_argument("--sft-steps", type=int, default=40,
                        help="teacher SFT steps (the student gets half; default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="checks that would start later than this are skipped (default: %(default)s)")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM check even if vllm is importable")
    parser.add_argument("--no-static", action="store_true", help="skip the static-cache timing (its compile)")
    parser.add_argument("--work-dir", default=None, help="runs and model cache go here (default: a temporary directory)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the checks on the CPU without memory numbers (checks the script, not the GPU)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.sft_steps < 0:
        parser.error(f"--sft-steps must be >= 0, got {args.sft_steps}")
    return args


def overrides(args: argparse.Namespace, work: Path, name: str, *extra: str) -> list[str]:
    """The config of one run: the default experiment on one GPU in bf16, small and quick."""
    return [
        *GPU_SIZES, f"trainer.accelerator={'cpu' if args.cpu_dry_run else 'gpu'}", "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        f"teacher.sft.steps={args.sft_steps}", f"student.sft.steps={args.sft_steps // 2}",
        "data.val_size=32", f"trainer.max_steps={args.steps}", "trainer.progress_bar=false",
        f"run.output_dir={work / 'runs'}", f"run.cache_dir={work / 'cache'}", f"run.name={name}", *extra,
    ]  # fmt: skip


def cuda() -> bool:
    import torch

    return torch.cuda.is_available() and not DRY_RUN


DRY_RUN = False  # --cpu-dry-run: everything on the CPU, no memory numbers


def reset_peak() -> None:
    if cuda():
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak(reserved: bool = False) -> int | None:
    """torch.cuda.max_memory_allocated (or _reserved) since the last reset; None off CUDA."""
    if not cuda():
        return None
    import torch

    torch.cuda.synchronize()
    return torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()


def step_memory():
    """A Lightning callback: peak CUDA memory over the training steps (reset as the first starts)."""
    import lightning as L

    class StepMemory(L.Callback):
        def __init__(self) -> None:
            self.peak: int | None = None
            self.reset = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if not self.reset:
                reset_peak()
                self.reset = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = peak()
            if now is not None:
                self.peak = max(self.peak or 0, now)

    return StepMemory()


def phase_seconds(run_dir: Path) -> dict:
    """Mean seconds per step of each phase (metrics.csv `perf/*_s`), steps after the first (its
    first-call set-up excluded) when there are more than one."""
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("train/loss")]
    rows = rows[1:] if len(rows) > 1 else rows
    out = {}
    for phase in PHASES:
        values = [float(r[f"perf/{phase}_s"]) for r in rows if r.get(f"perf/{phase}_s")]
        if values:
            out[phase] = statistics.mean(values)
    return out


def plan_estimate(cfg) -> dict:
    """The planner's per-device estimate for `cfg` (`lightning-opd plan`), at the longest
    rendered student prompt of the first batches, and the GPU's memory."""
    import itertools

    import torch

    from lightning_opd.cli.plan import make_plan
    from lightning_opd.data import build_task
    from lightning_opd.models import render_prompt
    from lightning_opd.prepare import prepared_tokenizer

    task = build_task(cfg.data)
    tok = prepared_tokenizer(cfg, "student", task)
    examples = itertools.islice(task.stream(shard=0, num_shards=1), cfg.data.batch_size * cfg.trainer.max_steps)
    prompt_tokens = max(len(tok(render_prompt(tok, ex.prompt), add_special_tokens=False)["input_ids"]) for ex in examples)
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if cuda() else 80.0
    plan = make_plan(cfg, gpu_memory_gib=gpu_gib, prompt_tokens=prompt_tokens)
    parts = plan.parts
    return {"prompt_tokens": prompt_tokens, "total_bytes": parts.total, "cuda_reserve_bytes": parts.cuda_reserve,
            "allocator_bytes": parts.total - parts.cuda_reserve, "peak_phase": parts.peak_phase,
            "phases_bytes": parts.phases, "held_bytes": parts.held}  # fmt: skip


def run_training(args: argparse.Namespace, work: Path, name: str, *extra: str) -> dict:
    """One `train(cfg)` call with its peak memory, phase seconds and plan."""
    from lightning_opd.config import load
    from lightning_opd.train import train

    cfg = load(DEFAULT_CONFIG, overrides=overrides(args, work, name, *extra))
    memory = step_memory()
    reset_peak()
    start = time.perf_counter()
    summary = train(cfg, callbacks=[memory])
    run_peak, run_reserved = peak(), peak(reserved=True)
    seconds = time.perf_counter() - start
    plan = plan_estimate(cfg)
    steps_peak = memory.peak
    return {
        "overrides": list(extra), "seconds": seconds, "steps": summary.get("steps"),
        "final_loss": summary.get("final_loss"), "teacher_accuracy": summary.get("teacher_accuracy"),
        "peak_allocated_steps_bytes": steps_peak, "peak_allocated_run_bytes": run_peak,
        "peak_reserved_run_bytes": run_reserved, "plan": plan,
        "measured_over_plan": steps_peak / plan["allocator_bytes"] if steps_peak and plan["allocator_bytes"] else None,
        "phase_seconds": phase_seconds(Path(summary["run_dir"])), "run_dir": summary["run_dir"],
    }  # fmt: skip


def rollout_cache_timing(args: argparse.Namespace, work: Path) -> dict:
    """`generate` with the dynamic and the static cache on the SFT'd student: seconds per call
    (the first call separately: it includes the static cache's compile) and equal greedy tokens."""
    import itertools

    import torch

    from lightning_opd.config import load
    from lightning_opd.data import build_task
    from lightning_opd.models import render_prompt
    from lightning_opd.prepare import prepare
    from lightning_opd.rollout.generate import generate

    cfg = load(DEFAULT_CONFIG, overrides=overrides(args, work, "rollout"))
    task = build_task(cfg.data)
    prepared = prepare(cfg, task)  # from the cache of the runs above
    model, tok = prepared.student.to("cuda" if cuda() else "cpu", dtype=torch.bfloat16), prepared.student_tokenizer
    examples = list(itertools.islice(task.stream(shard=0, num_shards=1), cfg.data.batch_size))
    prompts = [tok(render_prompt(tok, ex.prompt), add_special_tokens=False)["input_ids"] for ex in examples]
    out: dict = {"prompts": len(prompts), "max_new_tokens": cfg.rollout.max_new_tokens, "dtype": "bfloat16"}
    tokens = {}
    for cache in ("dynamic",) if args.no_static else ("dynamic", "static"):
        rollout_cfg = load(DEFAULT_CONFIG, overrides=overrides(args, work, "rollout", f"rollout.cache={cache}")).rollout
        times = []
        for _ in range(4):
            peak()  # synchronises
            start = time.perf_counter()
            rollout = generate(model, prompts, rollout_cfg, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, greedy=True)
            peak()
            times.append(time.perf_counter() - start)
        tokens[cache] = rollout.response_ids
        out[cache] = {"first_call_s": times[0], "best_later_s": min(times[1:]), "later_s": times[1:],
                      "response_tokens": sum(len(r) for r in rollout.response_ids)}  # fmt: skip
    if "static" in tokens:
        out["same_greedy_tokens"] = tokens["static"] == tokens["dynamic"]
    return out


def check_rows(result: dict) -> list[list[str]]:
    """The printed table: check, status, seconds, peaks, plan, measured/plan, rollout s per step."""

    def gib(n) -> str:
        return "" if n is None else f"{n / GIB:.3f}"

    rows = []
    for name, check in result["checks"].items():
        status = check.get("status", "")
        value = check.get("result") or {}
        if "plan" in value:
            ratio = value.get("measured_over_plan")
            rows.append([name, status, f"{value['seconds']:.1f}", gib(value["peak_allocated_steps_bytes"]),
                         gib(value["peak_allocated_run_bytes"]), gib(value["plan"]["allocator_bytes"]),
                         "" if ratio is None else f"{ratio:.2f}",
                         f"{value['phase_seconds'].get('rollout', float('nan')):.3f}"])  # fmt: skip
        elif name == "rollout_cache" and value:
            dyn, sta = value.get("dynamic", {}), value.get("static", {})
            note = f"dynamic {dyn.get('best_later_s', float('nan')):.3f} s"
            if sta:
                note += (f", static {sta['best_later_s']:.3f} s (first {sta['first_call_s']:.1f} s), "
                         f"same tokens {value.get('same_greedy_tokens')}")
            rows.append([name, status, f"{check.get('seconds', 0):.1f}", "", "", "", "", note])
        else:
            rows.append([name, status, f"{check.get('seconds', 0):.1f}", "", "", "", "", check.get("reason", "")])
    return rows


def print_table(result: dict) -> None:
    header = ["check", "status", "seconds", "peak steps GiB", "peak run GiB", "plan GiB", "measured/plan",
              "rollout s/step"]  # fmt: skip
    rows = check_rows(result)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print("plan GiB = `lightning-opd plan`'s total less its assumed CUDA context reserve; peaks are "
          "torch.cuda.max_memory_allocated (steps: from the first training step on; run: SFT and validation too)")


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available()}  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "gpu_memory_gib": props.total_memory / GIB, "gpus": torch.cuda.device_count(),
                     "cuda": torch.version.cuda})  # fmt: skip
    for package in ("transformers", "lightning", "vllm"):
        if importlib.util.find_spec(package) is not None:
            try:
                info[package] = __import__(package).__version__
            except Exception as err:  # a broken install is worth a note, not a crash
                info[package] = f"import failed: {err}"
    return info


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    global DRY_RUN
    DRY_RUN = args.cpu_dry_run
    out = Path(args.out)
    if not torch.cuda.is_available() and not DRY_RUN:
        reason = "no CUDA (torch.cuda.is_available() is False); nothing was run"
        write({"skipped": reason, "machine": machine()}, out)
        print(f"gpu_check: skipped: {reason}")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    start = time.perf_counter()
    result: dict = {"machine": machine(), "args": vars(args), "work_dir": str(work), "checks": {}}
    vllm_reason = ("--no-vllm" if args.no_vllm else "--cpu-dry-run: vLLM needs CUDA" if DRY_RUN else
                   None if importlib.util.find_spec("vllm") is not None else "vllm is not importable")  # fmt: skip
    checks = [
        ("fsdp_bf16", lambda: run_training(args, work, "fsdp_bf16", "trainer.strategy=fsdp"), None),
        ("auto_bf16", lambda: run_training(args, work, "auto_bf16", "trainer.strategy=auto"), None),
        ("vllm", lambda: run_training(args, work, "vllm", "trainer.strategy=auto", "rollout.engine=vllm",
                                      "trainer.max_steps=2"), vllm_reason),
        ("rollout_cache", lambda: rollout_cache_timing(args, work), None),  # last: its compile may be long
    ]  # fmt: skip
    for name, fn, skip in checks:
        elapsed = time.perf_counter() - start
        if skip is None and elapsed > args.budget_s:
            skip = f"time budget: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}"
        if skip is not None:
            result["checks"][name] = {"status": "skipped", "reason": skip}
            print(f"[gpu_check] {name}: skipped ({skip})", flush=True)
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result["checks"][name] = {"status": "ok", "result": fn()}
        except Exception as err:  # one failed check must not hide the others
            result["checks"][name] = {"status": "failed", "reason": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc()}  # fmt: skip
            print(f"[gpu_check] {name} failed: {type(err).__name__}: {err}", flush=True)
        result["checks"][name]["seconds"] = time.perf_counter() - t0
        write(result, out)  # what is done so far survives a later crash or a kill
    result["seconds"] = time.perf_counter() - start
    write(result, out)
    print_table(result)
    print(f"[gpu_check] wrote {out} ({result['seconds']:.0f} s)")
    return 1 if any(c["status"] == "failed" for c in result["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
