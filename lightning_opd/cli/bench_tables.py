"""Rich tables for `lightning-opd bench` (bench.py measures; this only prints its JSON)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _table(title: str, columns: list[str], rows: list[list[str]], caption: str = "") -> Table:
    table = Table(title=escape(title), caption=escape(caption) if caption else None)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*[escape(cell) for cell in row])
    return table


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def alignment_table(result: dict) -> Table:
    """One row per (pair, length); one column per aligner: ms per 1k student tokens."""
    names = sorted({r["aligner"] for r in result["alignment"]})
    points: dict[tuple[str, int], dict] = {}
    for r in result["alignment"]:
        points.setdefault((r["pair"], r["length"]), {"first": r})[r["aligner"]] = r
    rows = []
    for (pair, length), by_name in points.items():
        first = by_name["first"]
        simct = by_name.get("simct", first)
        rows.append([pair, str(length), str(first["batch"]), _f(first["tokenize_ms_per_1k"]),
                     *[_f(by_name[n]["ms_per_1k"]) for n in names], _f(simct["without_tokenize_ms_per_1k"]),
                     _f(simct["coverage"], 3)])  # fmt: skip
    return _table("(a) alignment, ms per 1k student tokens (segment + pack + build_rows)",
                  ["pair", "length", "batch", "tokenize", *names, "simct w/o tokenize", "coverage (simct)"], rows,
                  "tokenize = the teacher tokenizing the response texts alone; it is inside every aligner's time. "
                  "w/o tokenize = the same alignment with the teacher's ids given")  # fmt: skip


def naive_table(result: dict) -> Table:
    rows = []
    for r in result["naive"]:
        if "skipped" in r:
            rows.append([r["pair"], str(r["length"]), *["-"] * 6, r["skipped"]])
            continue
        rows.append([r["pair"], str(r["length"]), _f(r["fast_ms_per_1k"]), _f(r["naive_ms_per_1k"]),
                     f"{r['speedup']:.1f}x", _f(r["fast_without_tokenize_ms_per_1k"]),
                     _f(r["naive_without_tokenize_ms_per_1k"]), f"{r['speedup_without_tokenize']:.1f}x",
                     str(r["same_segments"])])  # fmt: skip
    return _table("(d) segments: fast path vs naive decode-each-token reference, ms per 1k tokens",
                  ["pair", "length", "fast", "naive", "speedup", "fast w/o tok", "naive w/o tok", "speedup w/o tok",
                   "same segments"], rows, "w/o tok = both with the teacher's ids given (the tokenization they share)")  # fmt: skip


def loss_table(result: dict) -> Table:
    rows = []
    for r in result["loss"]:
        if "skipped" in r:
            rows.append([r["aligner"], str(r["length"]), *["-"] * 7, r["skipped"]])
            continue
        rows.append([r["aligner"], str(r["length"]), str(r["rows"]), _f(r["rows_ms"]), _f(r["forward_s"]),
                     _f(r["backward_s"]), f"{r['rows_per_s']:.0f}", _f(r["logits_mb"], 0), _f(r["peak_mb"], 0),
                     _f(r["peak_kb_per_token"], 0)])  # fmt: skip
    first = next(iter(result["loss"]), None)
    caption = "" if first is None else (
        f"V_S={first['student_vocab']}, V_T={first['teacher_vocab']}, |V∩|={first['shared_vocab']}; bf16 logits; "
        "peak = max RSS during rows+forward+backward above the RSS before (logits excluded, their grad included)")
    return _table("(b) rows + loss (forward + backward)",
                  ["aligner", "length", "rows", "rows ms", "fwd s", "bwd s", "rows/s", "logits MB", "peak MB",
                   "peak KB/token"], rows, caption)  # fmt: skip


def step_table(result: dict) -> Table:
    step = result["step"]
    mean = step["mean"]
    phases = ("rollout", "teacher", "student_forward", "align", "loss", "update")
    rows = [[p, _f(mean[p], 3), f"{mean[p] / mean['step']:.1%}"] for p in phases]
    other = mean["step"] - sum(mean[p] for p in phases)
    rows += [["other", _f(other, 3), f"{other / mean['step']:.1%}"], ["step", _f(mean["step"], 3), "100%"]]
    caption = (f"batch {step['batch_size']} prompts, mean response {mean['response_len']:.1f} tokens "
               f"(max_new_tokens {step['max_new_tokens']}), untrained models; mean of {len(step['steps'])} steps")
    return _table("(c) one training step of the tiny default, seconds", ["phase", "seconds", "share"], rows, caption)


def targets_table(result: dict) -> Table:
    rows = [[t["target"], t["measured"], {True: "met", False: "NOT met"}.get(t["met"], "-")] for t in result["targets"]]
    return _table("issue #7 targets", ["target", "measured", "met"], rows)


def profile_table(result: dict) -> Table:
    rows = [[r["function"], str(r["calls"]), _f(r["tottime_s"], 3), _f(r["cumtime_s"], 3)]
            for r in result["step"]["profile"]]  # fmt: skip
    return _table("(c) cProfile of one step: top functions by own time", ["function", "calls", "own s", "cum s"], rows)


def print_result(result: dict) -> None:
    console = Console()
    console.width = max(console.width, 140)
    m = result["machine"]
    console.print(f"machine: {m['processor']}, {m['cpus']} CPUs, {m['memory_gb']:.0f} GiB, torch {m['torch']} "
                  f"({m['torch_threads']} threads); load average {result['load_average_start'][0]:.1f} at start, "
                  f"{result['load_average_end'][0]:.1f} at end")  # fmt: skip
    if result["alignment"]:
        console.print(alignment_table(result))
        console.print(naive_table(result))
    if result["loss"]:
        console.print(loss_table(result))
    if result["step"]:
        console.print(step_table(result))
        if result["step"].get("profile"):
            console.print(profile_table(result))
    console.print(targets_table(result))
