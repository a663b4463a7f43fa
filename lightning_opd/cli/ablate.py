"""`lightning-opd ablate EXPERIMENT.yaml --knob K --seeds "0 1 2"`: one run per overlay and seed.

A *knob* is a directory `configs/ablation/<knob>/` of overlays, each a config delta holding
only what it changes (`aligner/exact.yaml` is `aligner: {name: exact}`). For every overlay and
seed the runner loads

    base.yaml <- EXPERIMENT.yaml <- overlay <- overrides <- trainer.seed=S data.seed=S

and trains it into `<out>/<experiment>/<knob>[+<hash>]/<variant>/seed<S>/` (the data seed also
draws a different validation set, as in docs/results.md). After all runs it writes `table.md`
and `curves.png` in the knob's directory (report.py).

Overrides: `+<hash>` is there only when the command has overrides, and is a short hash of them
(`overrides_key`: each key's last value, sorted, without the keys that change nothing that is
trained, `NEUTRAL_KEYS`). So the same ablation called again with other overrides (another model,
another learning rate) gets a directory of its own instead of finding the first call's runs
"finished", and the results of ablations without overrides keep their paths. Each run's
`ablation.json` records the overrides.

Baseline: the overlay of a knob whose values are the experiment's own (`aligner/simct.yaml` for
the default experiment) holds a line `# baseline`. It changes nothing; it is there so the knob's
table has the reference row, which the report marks `(baseline)`. Every other overlay must
change the resolved config (tests/test_ablate.py checks both).

Resuming: a run with a `summary.json` is finished and skipped; a run directory without one
was interrupted and resumes from its last checkpoint (`checkpoints/last.ckpt`, written every
`trainer.checkpoint_every_n_steps`, which the runner sets to a fifth of the run when the
experiment leaves it at 0), or starts again if it has none or cannot read it (a save cut
short). Validation runs at the same interval unless set, so curves.png has points between
"before" and "after".

One failing run does not stop the ablation: its traceback goes to `<run>/error.txt`, the rest
go on, and the command exits 1 at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_opd.config import CONFIG_DIR, Config, ConfigError, checkpoint_problem, load

ABLATION_DIR = CONFIG_DIR / "ablation"
BASELINE_MARKER = "# baseline"


def is_baseline(overlay: Path) -> bool:
    """The overlay is marked as its knob's baseline variant: a line `# baseline`."""
    return any(line.strip() == BASELINE_MARKER for line in overlay.read_text().splitlines())


@dataclass(frozen=True)
class PlannedRun:
    variant: str
    overlay: Path
    seed: int
    run_dir: Path

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()


def knob_overlays(knob: str, ablation_dir: Path = ABLATION_DIR) -> list[Path]:
    directory = ablation_dir / knob
    overlays = sorted(directory.glob("*.yaml"))
    if not overlays:
        known = sorted(p.name for p in ablation_dir.iterdir() if p.is_dir()) if ablation_dir.is_dir() else []
        raise ConfigError(f"ablation knob '{knob}': no overlays in {directory}; knobs: {known}")
    return overlays


def parse_seeds(text: str | list[str]) -> list[int]:
    items = text if isinstance(text, list) else [text]
    try:
        seeds = [int(s) for item in items for s in item.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--seeds must be integers, got {items!r}") from None
    if not seeds:
        raise ConfigError("--seeds is empty")
    return seeds


# Overrides that do not change what a run trains, left out of the directory's hash, so that they
# cannot send an ablation to a new directory for nothing: where the cache is, the progress bar,
# how often the run validates, checkpoints and logs (greedy validation samples nothing, a resume
# restores the RNG; docs/results/README.md's own commands set these), and the keys the runner
# sets itself after the overrides (a run's place and seeds).
NEUTRAL_KEYS = frozenset({
    "run.cache_dir", "trainer.progress_bar", "trainer.val_every_n_steps", "trainer.checkpoint_every_n_steps",
    "trainer.log_every_n_steps", "run.output_dir", "run.name", "trainer.seed", "data.seed",
})  # fmt: skip


def overrides_key(overrides: Sequence[str]) -> list[str]:
    """The overrides that decide an ablation's directory: `key=value`, each key's last value (a
    later override wins, as in `config.load`), sorted by key, `NEUTRAL_KEYS` left out."""
    last: dict[str, str] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        last[key.strip()] = value.strip()
    return [f"{key}={value}" for key, value in sorted(last.items()) if key not in NEUTRAL_KEYS]


def overrides_hash(overrides: Sequence[str]) -> str:
    """8 hex digits of `overrides_key`; "" when no override counts (the directory has no suffix)."""
    key = overrides_key(overrides)
    return hashlib.sha256("\n".join(key).encode()).hexdigest()[:8] if key else ""


def knob_dir(out: Path, experiment_name: str, knob: str, overrides: Sequence[str] = ()) -> Path:
    """`<out>/<experiment>/<knob>`, with `+<overrides_hash>` after the knob when there are overrides."""
    digest = overrides_hash(overrides)
    return out / experiment_name / (f"{knob}+{digest}" if digest else knob)


def plan(experiment: Path, knob: str, seeds: list[int], out: Path,
         ablation_dir: Path = ABLATION_DIR, only: list[str] | None = None,
         overrides: Sequence[str] = ()) -> tuple[str, list[PlannedRun]]:  # fmt: skip
    """The runs of a knob; `only`: just these variants (overlay names), in this order;
    `overrides`: the command's, which place the runs in a directory of their own (`knob_dir`)."""
    name = load(experiment).experiment
    root = knob_dir(out, name, knob, overrides)
    overlays = knob_overlays(knob, ablation_dir)
    if only:
        by_name = {overlay.stem: overlay for overlay in overlays}
        unknown = [v for v in only if v not in by_name]
        if unknown:
            raise ConfigError(f"--only: no overlays {unknown} in knob '{knob}'; it has {sorted(by_name)}")
        overlays = [by_name[v] for v in only]
    runs = [PlannedRun(overlay.stem, overlay, seed, root / overlay.stem / f"seed{seed}")
            for overlay in overlays for seed in seeds]  # fmt: skip
    return name, runs


def run_config(experiment: Path, run: PlannedRun, knob: str, overrides: list[str]) -> Config:
    seed = [f"trainer.seed={run.seed}", f"data.seed={run.seed}"]
    placement = [f"run.output_dir={run.run_dir.parent}", f"run.name={run.run_dir.name}"]
    cfg = load(experiment, run.overlay, overrides=[*overrides, *seed, *placement])
    interval = max(cfg.trainer.max_steps // 5, 1)
    if cfg.trainer.checkpoint_every_n_steps == 0:
        cfg.trainer.checkpoint_every_n_steps = interval
    if cfg.trainer.val_every_n_steps == 0:
        cfg.trainer.val_every_n_steps = interval
    last = run.run_dir / "checkpoints" / "last.ckpt"
    # a checkpoint whose save was cut short (the process killed while writing) cannot be resumed
    # from: the run starts again, as one without a checkpoint does
    if last.is_file() and checkpoint_problem(last) is None:
        cfg.run.resume_from = str(last)
    return cfg


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def ablate(experiment: str | Path, knob: str, seeds: list[int], out: str | Path = "results",
           overrides: list[str] | tuple[str, ...] = (), ablation_dir: Path = ABLATION_DIR,
           log=print, only: list[str] | None = None) -> dict:  # fmt: skip
    """Run every (overlay, seed) not yet finished, then write the report.

    Returns {"dir", "finished", "failed", "skipped", "table", "curves"}.
    """
    from lightning_opd.cli.report import find_runs, write_report
    from lightning_opd.train import train

    experiment, out = Path(experiment), Path(out)
    name, runs = plan(experiment, knob, seeds, out, ablation_dir, only, overrides)
    configs = {run: run_config(experiment, run, knob, list(overrides)) for run in runs}  # bad keys fail here
    todo = [r for r in runs if not r.finished]
    log(f"ablation {name}/{knob}: {len(runs)} runs, {len(runs) - len(todo)} already finished")
    failed, durations = [], []
    for i, run in enumerate(todo, start=1):
        eta = f", about {_duration(sum(durations) / len(durations) * (len(todo) - i + 1))} left" if durations else ""
        resuming = " (resuming)" if configs[run].run.resume_from else ""
        log(f"[{i}/{len(todo)}] {knob}={run.variant} seed={run.seed}{resuming}{eta}")
        if run.run_dir.exists() and not configs[run].run.resume_from:
            shutil.rmtree(run.run_dir)  # an interrupted run without a checkpoint starts again
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "ablation.json").write_text(json.dumps({
            "knob": knob, "variant": run.variant, "seed": run.seed, "baseline": is_baseline(run.overlay),
            "overrides": overrides_key(overrides), "overrides_hash": overrides_hash(overrides),
        }))  # fmt: skip
        start = time.time()
        try:
            summary = train(configs[run])
            log(f"    done in {_duration(time.time() - start)}: accuracy {summary['student_accuracy_before']}"
                f" -> {summary['student_accuracy_after']}, coverage {summary['coverage']}")
        except Exception:  # one broken run must not end the ablation
            (run.run_dir / "error.txt").write_text(traceback.format_exc())
            failed.append(run)
            log(f"    FAILED (traceback in {run.run_dir / 'error.txt'})")
        durations.append(time.time() - start)
    root = knob_dir(out, name, knob, overrides)
    if only:  # the report covers every finished run of the knob (these overrides), not only the ones run now
        runs = plan(experiment, knob, seeds, out, ablation_dir, overrides=overrides)[1] + runs
        runs = list(dict.fromkeys(runs))
    finished = [r for r in runs if r.finished]
    result = {"dir": str(root), "finished": len(finished), "failed": len(failed),
              "skipped": len(runs) - len(todo), "table": None, "curves": None}  # fmt: skip
    if finished:
        counted = overrides_key(overrides)
        title = f"{name}: {knob}" + (f" ({' '.join(counted)})" if counted else "")
        table, curves = write_report(find_runs([r.run_dir for r in finished]), root, title)
        result.update(table=str(table), curves=str(curves))
        log(table.read_text())
        log(f"wrote {table} and {curves}")
    return result


# --- command line ------------------------------------------------------------------------------


def add_ablate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="the experiment config, e.g. configs/experiment/default.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run; with any, "
                        "the runs go to <knob>+<hash of the overrides>/ (a directory of their own)")  # fmt: skip
    parser.add_argument("--knob", required=True, help="a directory of overlays under configs/ablation/")
    parser.add_argument("--seeds", default="0", help='seeds, e.g. "0 1 2" (default 0)')
    parser.add_argument("--out", default="results", help="results root (default: results)")
    parser.add_argument("--only", default="", help="run just these variants, in this order: "
                        '"bpm_lr1e-3,exact_lr1e-3" (the report still covers every finished run)')  # fmt: skip


def run_ablate(args: argparse.Namespace) -> int:
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command line: overrides must look like key=value, got {bad}")
    only = [v for v in args.only.replace(",", " ").split() if v]
    result = ablate(args.experiment, args.knob, parse_seeds(args.seeds), args.out, args.overrides, only=only or None)
    if result["failed"]:
        print(f"lightning-opd ablate: {result['failed']} run(s) failed", file=sys.stderr)
        return 1
    return 0
