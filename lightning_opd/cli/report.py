"""`lightning-opd report RUN_DIR...`: one table and one plot from any set of finished runs.

A run directory (written by `train`) holds `summary.json`, `metrics.csv` and `config.yaml`; the
ablation runner adds `ablation.json` ({"knob", "variant", "seed", "baseline", "overrides"}).
Runs are grouped by *variant* (the ablation's variant name where there is one, else
`<experiment>/<aligner>`) and *setting*: the models (`model_identity`: per role the `path`, or
the `tiny` spec of a model built here, with its tokenizer and SFT settings, from the run's
`config.yaml`) and the keys of the ablation's overrides. Runs of one variant with different
models, say an ablation run once on the tiny pair and once on your own, are different rows; each
row then names the keys that tell them apart, `variant` [student.path=..., ...] (every row
names the same keys, so rows of other variants can be compared with them). The knob's baseline
variant (its overlay changes nothing, ablate.py) reads `name` (baseline). Per row, over its
seeds (mean ± sample sd; a single seed shows ± 0):

    variant | seeds | student before | student after | gain | coverage | teacher mass |
    final loss | steps/s [+ tool calls / response | tool success, when the runs called tools]

`coverage` is the run's mean of `train/coverage` over steps, `teacher mass` its mean of
`train/teacher_mass` (the share of the teacher's probability that reaches the student's side of
the comparison, `Aligner.teacher_mass`; — for runs that did not log it: `alm`, or runs older
than the metric), `final loss` the last logged `train/loss`, `steps/s` the OPD steps over the
seconds spent in `trainer.fit` (validation included, preparation excluded). `curves.png` has
two panels, coverage and greedy accuracy against the OPD step, one line per variant (the mean
over seeds at the steps all its seeds logged), labelled as the table's rows.

`profile.png` (only when some runs wrote `sod_steps.rank*.jsonl`: SOD, or `sod.record`): the
per-step divergence profile, mean d_k against the step index k (1 = the text before the first
tool call), over the trajectories of the first and of the last tenth of the training steps
(`PROFILE_FRACTION`), one line per variant (its seeds' trajectories pooled).

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
from typing import Any


@dataclass
class RunRecord:
    """One finished run, read back from its directory."""

    path: Path
    variant: str
    seed: int
    summary: dict
    metrics: list[dict] = field(default_factory=list)  # rows of metrics.csv, values as floats
    baseline: bool = False  # the knob's baseline variant (ablation.json)
    config: dict = field(default_factory=dict)  # config.yaml as plain containers ({} if absent)
    overrides: list[str] = field(default_factory=list)  # the ablation's key=value overrides

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


def _read_config(run_dir: Path) -> dict:
    """The run's config.yaml as plain containers; {} when it is missing or unreadable (the run
    is still reported, its models as unknown)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # a hand-edited or truncated file must not stop the report
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _select(config: dict, key: str, default: Any = None) -> Any:
    """`config[a][b]...` for the dotted `key`, or `default`."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _seed_of(ablation: dict, config: dict) -> int:
    if "seed" in ablation:
        return int(ablation["seed"])
    return int(_select(config, "trainer.seed", 0) or 0)


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
    config = _read_config(run_dir)
    return RunRecord(run_dir, variant, _seed_of(ablation, config), summary, metrics,
                     baseline=bool(ablation.get("baseline", False)), config=config,
                     overrides=list(ablation.get("overrides") or []))  # fmt: skip


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
    setting: str = ""  # what tells this row from others of its variant: "student.path=..., ..."

    @property
    def gain(self) -> list[float]:
        return [a - b for a, b in zip(self.after, self.before, strict=True)]

    @property
    def label(self) -> str:
        return row_label(self.variant, self.setting)


MODEL_ROLES = ("student", "teacher")
MODEL_SECTIONS = ("tokenizer", "sft")  # with `path` or `tiny`: what decides a model's weights


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}"))
    return flat


def model_identity(config: dict) -> dict[str, Any]:
    """What decides the run's models, as dotted keys of its config: per role the `path` of a
    model of one's own, else the `tiny` spec of the one built here; and its tokenizer and SFT
    settings (the tiny models are made by SFT: a teacher SFT'd for 600 steps is not one SFT'd
    for 20). {} for a run without a readable config.yaml."""
    identity: dict[str, Any] = {}
    for role in MODEL_ROLES:
        section = config.get(role)
        if not isinstance(section, dict):
            continue
        identity[f"{role}.path"] = section.get("path")  # null for a tiny model: differs from any path
        if not section.get("path"):
            identity.update(_flatten(section.get("tiny", {}), f"{role}.tiny"))
        for name in MODEL_SECTIONS:
            identity.update(_flatten(section.get(name, {}), f"{role}.{name}"))
    return identity


def _setting(run: RunRecord, override_keys: Sequence[str]) -> dict[str, str]:
    """The run's models (`model_identity`) and its value of each key that an ablation in the
    report overrode (from its config.yaml: a run that did not override a key still has a value
    for it), as text."""
    values = model_identity(run.config)
    if run.config:
        values.update({key: _select(run.config, key) for key in override_keys if key not in values})
    return {key: _show(value) for key, value in values.items()}


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def row_label(variant: str, setting: str) -> str:
    """`variant`, or `variant [setting]` when the report tells runs of one variant apart."""
    return f"{variant} [{setting}]" if setting else variant


def grouped(runs: Sequence[RunRecord]) -> list[tuple[str, str, list[RunRecord]]]:
    """(variant, setting, runs) per row, in the order rows first appear.

    A row is a variant and a setting (`_setting`): its models and the overridden keys. Shown
    (and then on every row) are only the keys whose values differ between runs of some one
    variant: an ablation whose overlays change a model (a tokenizer knob) differs between
    variants, not within one, and keeps its plain labels. A key that some runs' config.yaml lacks
    (written before the setting existed) tells nothing apart; a run without a config.yaml is a
    row of its own, its models unknown."""
    override_keys = sorted({item.partition("=")[0] for run in runs for item in run.overrides})
    settings = [_setting(run, override_keys) for run in runs]
    by_variant: dict[str, list[dict[str, str]]] = {}
    for run, setting in zip(runs, settings, strict=True):
        by_variant.setdefault(run.variant, []).append(setting)
    shown: list[str] = []  # the keys that split some variant, in the order first met
    unknown_apart = False  # some variant has runs with and without a config.yaml
    for group in by_variant.values():
        known = [setting for setting in group if setting]
        unknown_apart = unknown_apart or 0 < len(known) < len(group)
        common = [key for key in dict.fromkeys(k for setting in known for k in setting)
                  if all(key in setting for setting in known)]  # fmt: skip
        shown += [key for key in common if len({setting[key] for setting in known}) > 1 and key not in shown]
    rows: dict[tuple[str, str], list[RunRecord]] = {}
    for run, setting in zip(runs, settings, strict=True):
        if not (shown or unknown_apart):
            text = ""
        elif not setting:
            text = "models unknown (no config.yaml)"
        else:
            text = ", ".join(f"{key}={setting[key]}" for key in shown if key in setting)
        rows.setdefault((run.variant, text), []).append(run)
    return [(variant, text, group) for (variant, text), group in rows.items()]


def group_by_variant(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """The runs of each row (`grouped`), keyed by the row's label (`row_label`)."""
    return {row_label(variant, setting): group for variant, setting, group in grouped(runs)}


def summarise(runs: Sequence[RunRecord]) -> list[VariantSummary]:
    """One summary per row (variant and setting, `grouped`), in the order rows first appear."""

    def values(group: list[RunRecord], get) -> list[float]:
        return [float(v) for v in map(get, group) if v is not None]

    out = []
    for variant, setting, group in grouped(runs):
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
            setting=setting,
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
        label = f"`{s.variant}`" + (" (baseline)" if s.baseline else "")
        if s.setting:
            label += " [" + s.setting.replace("|", "\\|") + "]"  # a `|` would end the table cell
        cells = [label, ",".join(map(str, s.seeds)), mean_sd(s.before), mean_sd(s.after),
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


PROFILE_FRACTION = 0.1  # profile.png: the first and the last tenth of the training steps
PROFILE_MIN_SHARE = 0.05  # a step index is drawn where at least this share of trajectories reach it


def load_step_records(run_dir: str | Path) -> list[dict]:
    """The run's per-trajectory step records ({"step", "sequence", "d": [d_1..d_K], "w": [...]}),
    every rank's `sod_steps.rank*.jsonl`; [] when it wrote none (SOD off without `sod.record`)."""
    records = []
    for path in sorted(Path(run_dir).glob("sod_steps.rank*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def step_profile(records: Sequence[dict], fraction: float = PROFILE_FRACTION,
                 min_share: float = PROFILE_MIN_SHARE) -> dict[str, tuple[list[int], list[float], list[int]]]:  # fmt: skip
    """Mean d_k per step index k (1-based) at the start and the end of training.

    "start" pools the trajectories of the first `fraction` of the logged training steps (at least
    one step), "end" those of the last. Returns {"start"|"end": (k, mean d_k, trajectories with a
    step k)}, k only where at least `min_share` of the window's trajectories have a step k."""
    if not records:
        return {}
    steps = sorted({int(r["step"]) for r in records})
    span = max(1, round(fraction * len(steps)))
    windows = {"start": set(steps[:span]), "end": set(steps[-span:])}
    out = {}
    for name, chosen in windows.items():
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        n = 0
        for r in records:
            if int(r["step"]) not in chosen:
                continue
            n += 1
            for k, d in enumerate(r["d"], start=1):
                sums[k] = sums.get(k, 0.0) + float(d)
                counts[k] = counts.get(k, 0) + 1
        ks = [k for k in sorted(sums) if counts[k] >= min_share * n]
        out[name] = (ks, [sums[k] / counts[k] for k in ks], [counts[k] for k in ks])
    return out


def plot_profile(runs: Sequence[RunRecord], path: str | Path, title: str = "") -> Path | None:
    """profile.png: mean d_k against step index k, at the start (left) and at the end (right) of
    training, one line per variant (its seeds' trajectories pooled). None, and no file, when no
    run has step records."""
    profiles = {}
    for variant, group in group_by_variant(runs).items():
        records = [r for run in group for r in load_step_records(run.path)]
        if records:
            profiles[variant] = step_profile(records)
    path = Path(path)
    if not profiles:
        path.unlink(missing_ok=True)  # not one left from an earlier report of other runs
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, window in zip(axes, ("start", "end"), strict=True):
        for variant, profile in profiles.items():
            ks, d, _ = profile[window]
            ax.plot(ks, d, marker="o", label=variant)
        ax.set(xlabel="step k (text between tool calls)", title=f"{window} of training")
        ax.set_xticks(sorted({k for p in profiles.values() for k in p[window][0]}))
    axes[0].set_ylabel("mean d_k = mean |log pi_S - log pi_T|")
    axes[1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(runs: Sequence[RunRecord], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """table.md and curves.png in out_dir, and profile.png when runs recorded their step
    divergences (`plot_profile`); returns the paths of table.md and curves.png."""
    if not runs:
        raise ValueError("no finished runs to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "table.md"
    heading = f"# {title}\n\n" if title else ""
    table.write_text(heading + markdown_table(summarise(runs)))
    plot_profile(runs, out_dir / "profile.png", title)
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
    profile = table.parent / "profile.png"
    extra = f" and {profile}" if profile.is_file() else ""
    print(f"wrote {table} and {plot}{extra} ({len(runs)} runs)")
    return 0
