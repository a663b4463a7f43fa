"""`lightning-opd report RUN_DIR...`: one table and one plot from any set of finished runs.

A run directory (written by `train`) holds `summary.json`, `metrics.csv` and `config.yaml`; the
ablation runner adds `ablation.json` ({"knob", "variant", "seed", "baseline"}). Runs are grouped
by *variant*: the ablation's variant name where there is one, else `<experiment>/<aligner>`; the
knob's baseline variant (its overlay changes nothing, ablate.py) reads `name` (baseline).
Per variant, over its seeds (mean ± sample sd; a single seed shows ± 0):

    variant | seeds | student before | student after | gain | coverage | teacher mass |
    final loss | steps/s [+ tool calls / response | tool success, when the runs called tools]

`coverage` is the run's mean of `train/coverage` over steps, `teacher mass` its mean of
`train/teacher_mass` (the share of the teacher's probability that reaches the student's side of
the comparison, `Aligner.teacher_mass`; — for runs that did not log it: `alm`, or runs older
than the metric), `final loss` the last logged `train/loss`, `steps/s` the OPD steps over the
seconds spent in `trainer.fit` (validation included, preparation excluded). `curves.png` has
two panels, coverage and greedy accuracy against the OPD step, one line per variant (the mean
over seeds at the steps all its seeds logged).

    lightning-opd report results/default/aligner --out results/default/aligner
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunRecord:
    """One finished run, read back from its directory."""

    path: Path
    variant: str
    seed: int
    summary: dict
    metrics: list[dict] = field(default_factory=list)  # rows of metrics.csv, values as floats
    baseline: bool = False  # the knob's baseline variant (ablation.json)

    def series(self, column: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged column, in step order, rows without it skipped."""
        steps, values = [], []
        for row in self.metrics:
            value = row.get(column)
            if value is not None and not math.isnan(value):
                steps.append(int(row.get("step", len(steps))))
                values.append(value)
        return steps, values

    def mean_of(self, column: str) -> float | None:
        """The mean of a logged column over steps (None when it was never logged)."""
        _, values = self.series(column)
        return statistics.fmean(values) if values else None

    @property
    def steps_per_second(self) -> float | None:
        if "steps_per_second" in self.summary:  # counts only the steps a resumed call trained
            return self.summary["steps_per_second"]
        seconds = self.summary.get("train_seconds")
        return self.summary["steps"] / seconds if seconds else None


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _seed_of(run_dir: Path, ablation: dict) -> int:
    if "seed" in ablation:
        return int(ablation["seed"])
    config = run_dir / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        return int(OmegaConf.select(OmegaConf.load(config), "trainer.seed", default=0))
    return 0


def load_run(run_dir: str | Path) -> RunRecord:
    """Read one run directory; ValueError naming the directory if it has no summary.json."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{run_dir}: no summary.json (not a finished run)")
    summary = json.loads(summary_path.read_text())
    ablation_path = run_dir / "ablation.json"
    ablation = json.loads(ablation_path.read_text()) if ablation_path.is_file() else {}
    variant = ablation.get("variant") or f"{summary.get('experiment')}/{summary.get('aligner')}"
    metrics: list[dict] = []
    metrics_path = run_dir / "metrics.csv"
    if metrics_path.is_file():
        with metrics_path.open() as f:
            metrics = [{k: _float_or_nan(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return RunRecord(run_dir, variant, _seed_of(run_dir, ablation), summary, metrics,
                     baseline=bool(ablation.get("baseline", False)))


def find_runs(paths: Iterable[str | Path]) -> list[RunRecord]:
    """Every finished run at or below the given paths (directories with a summary.json)."""
    found: dict[Path, RunRecord] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"{path}: no such file or directory")
        candidates = [path] if (path / "summary.json").is_file() else sorted(p.parent for p in path.rglob("summary.json"))
        for run_dir in candidates:
            found.setdefault(run_dir.resolve(), load_run(run_dir))
    return sorted(found.values(), key=lambda r: (r.variant, r.seed, str(r.path)))


@dataclass
class VariantSummary:
    variant: str
    seeds: list[int]
    before: list[float]
    after: list[float]
    coverage: list[float]
    final_loss: list[float]
    steps_per_second: list[float]
    teacher_mass: list[float] = field(default_factory=list)  # per run, mean over steps
    tool_calls: list[float] = field(default_factory=list)  # per response, mean over steps
    tool_success: list[float] = field(default_factory=list)  # successful calls / calls
    baseline: bool = False  # the knob's baseline variant: shown as `name` (baseline)

    @property
    def gain(self) -> list[float]:
        return [a - b for a, b in zip(self.after, self.before, strict=True)]


def group_by_variant(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run)
    return groups


def summarise(runs: Sequence[RunRecord]) -> list[VariantSummary]:
    """One summary per variant, in the order variants first appear."""

    def values(group: list[RunRecord], get) -> list[float]:
        return [float(v) for v in map(get, group) if v is not None]

    out = []
    for variant, group in group_by_variant(runs).items():
        paired = [r for r in group if r.summary.get("student_accuracy_before") is not None
                  and r.summary.get("student_accuracy_after") is not None]  # fmt: skip
        out.append(VariantSummary(
            variant=variant,
            seeds=[r.seed for r in group],
            before=[float(r.summary["student_accuracy_before"]) for r in paired],
            after=[float(r.summary["student_accuracy_after"]) for r in paired],
            coverage=values(group, lambda r: r.summary.get("coverage")),
            final_loss=values(group, lambda r: r.summary.get("final_loss")),
            steps_per_second=values(group, lambda r: r.steps_per_second),
            teacher_mass=values(group, lambda r: r.mean_of("train/teacher_mass")),
            tool_calls=values(group, lambda r: r.mean_of("train/tool_calls")),
            tool_success=values(group, lambda r: r.mean_of("train/tool_success_rate")),
            baseline=any(r.baseline for r in group),
        ))  # fmt: skip
    return out


def mean_sd(values: Sequence[float], digits: int = 3, signed: bool = False) -> str:
    """'0.355 ± 0.009' (sample sd; ± 0 for one value; '—' for none)."""
    if not values:
        return "—"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f} ± {sd:.{digits}f}"


TABLE_HEADER = ("variant", "seeds", "student before", "student after", "gain", "coverage",
                "teacher mass", "final loss", "steps/s")  # fmt: skip


TOOL_HEADER = ("tool calls / response", "tool success")


def markdown_table(summaries: Sequence[VariantSummary]) -> str:
    """The variant table; runs with tool calls add two columns (training rollouts' means)."""
    tools = any(s.tool_calls for s in summaries)
    header = TABLE_HEADER + (TOOL_HEADER if tools else ())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [f"`{s.variant}`" + (" (baseline)" if s.baseline else ""), ",".join(map(str, s.seeds)), mean_sd(s.before), mean_sd(s.after),
                 mean_sd(s.gain, signed=True), mean_sd(s.coverage, 4), mean_sd(s.teacher_mass, 4),
                 mean_sd(s.final_loss, 4),
                 mean_sd(s.steps_per_second, 2)]  # fmt: skip
        if tools:
            cells += [mean_sd(s.tool_calls, 2), mean_sd(s.tool_success, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_curve(curves: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    """The mean over runs at the steps every run logged."""
    if not curves:
        return [], []
    common = set(curves[0][0]).intersection(*(set(steps) for steps, _ in curves[1:]))
    steps = sorted(common)
    by_run = [dict(zip(s, v, strict=True)) for s, v in curves]
    return steps, [statistics.fmean(run[step] for run in by_run) for step in steps]


def accuracy_curve(run: RunRecord) -> tuple[list[int], list[float]]:
    history = run.summary.get("accuracy_history") or []
    return [int(step) for step, _ in history], [float(acc) for _, acc in history]


def plot_curves(runs: Sequence[RunRecord], path: str | Path, title: str = "") -> Path:
    """curves.png: coverage (left) and greedy accuracy (right) over OPD steps, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI
    import matplotlib.pyplot as plt

    fig, (ax_cov, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for variant, group in group_by_variant(runs).items():
        steps, cov = mean_curve([r.series("train/coverage") for r in group])
        ax_cov.plot(steps, cov, label=variant)
        steps, acc = mean_curve([accuracy_curve(r) for r in group])
        ax_acc.plot(steps, acc, marker="o", label=variant)
    ax_cov.set(xlabel="OPD step", ylabel="coverage (supervised / student tokens)", ylim=(-0.02, 1.02))
    ax_acc.set(xlabel="OPD step", ylabel="student accuracy (greedy, held out)", ylim=(-0.02, 1.02))
    ax_acc.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(runs: Sequence[RunRecord], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """table.md and curves.png in out_dir; returns their paths."""
    if not runs:
        raise ValueError("no finished runs to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "table.md"
    heading = f"# {title}\n\n" if title else ""
    table.write_text(heading + markdown_table(summarise(runs)))
    return table, plot_curves(runs, out_dir / "curves.png", title)


# --- command line ------------------------------------------------------------------------------


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run directories, or directories holding runs")
    parser.add_argument("--out", default=None, help="where table.md and curves.png go (default: the first path)")
    parser.add_argument("--title", default="", help="a heading for the table and the plot")


def run_report(args: argparse.Namespace) -> int:
    import sys

    try:
        runs = find_runs(args.runs)
        table, plot = write_report(runs, args.out or args.runs[0], args.title)
    except ValueError as err:
        print(f"lightning-opd report: {err}", file=sys.stderr)
        return 2
    print(table.read_text(), end="")
    print(f"wrote {table} and {plot} ({len(runs)} runs)")
    return 0
