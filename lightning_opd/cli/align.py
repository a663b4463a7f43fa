"""`lightning-opd align`: how much of a response each aligner supervises, for a tokenizer pair.

    lightning-opd align --student fixture:qwen2.5 --teacher fixture:gpt2 \\
        --aligner exact,simct data/gsm8k/test.jsonl [--field answer] [--json]
        [--student-eos TOKEN] [--teacher-eos TOKEN]

Coverage (DESIGN §3.5) is the fraction of the student's response tokens that end up in some
supervision row. Each text of the file is treated as a whole response that ended with EOS, as in
training: the student's ids are its tokenizer's encoding of the text (no special tokens), EOS
follows on both sides, and the teacher tokenizes the text the student's ids spell. For every
aligner in the registry (`--aligner a,b,...`) we report

    aligner, texts, student_tokens (EOS included), supervised_tokens, coverage,
    teacher_vocab_reached, rows, spans (rows with more than one token on a side),
    seconds (align_batch + build_rows only)

`teacher_vocab_reached` (`Aligner.vocab_reached`, structural, no models) is the share of the
teacher's vocabulary ids whose probability can reach the student's side of the comparison:
|V∩| / |V_T| for the V∩ aligners (1 for identical tokenizers), 1 for `uld`, None (`—` in the
table) for `alm`, which compares chunk likelihoods, not distributions over alternatives.

Every aligner takes the defaults of `AlignerConfig`. Rows are built without logits
(`build_rows(segments, None)`), so no model is needed. Texts are
processed in batches, like training batches. `measure_coverage` is the library entry point; the
CLI adds file reading, a rich table (or `--json`), and one-line errors with exit code 2 for a
bad tokenizer SPEC, a missing file or field, or an unknown aligner.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from lightning_opd.config import TokenizerConfig
from lightning_opd.errors import UserError

BATCH_SIZE = 256
KEYS = ("aligner", "texts", "student_tokens", "supervised_tokens", "coverage", "teacher_vocab_reached",
        "rows", "spans", "seconds")  # fmt: skip


class AlignCommandError(UserError, ValueError):
    """A problem with the command's inputs, reported as one line (exit code 2)."""


# --- library -----------------------------------------------------------------------------------


def check_aligners(names: Sequence[str]) -> None:
    from lightning_opd.align import ALIGNERS  # importing the package registers every aligner

    unknown = [n for n in names if n not in ALIGNERS]
    if unknown or not names:
        raise AlignCommandError(
            f"unknown aligner {', '.join(unknown) or '(none given)'}; registered: {', '.join(sorted(ALIGNERS))}"
        )


def batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def reached_share(aligner, pair) -> float | None:
    """`aligner.vocab_reached(pair)` as a plain float for JSON (None stays None)."""
    reached = aligner.vocab_reached(pair)
    return None if reached is None else float(reached)


def measure_coverage(
    student_tok,
    teacher_tok,
    texts: Iterable[str],
    aligner_names: Sequence[str],
    *,
    batch_size: int = BATCH_SIZE,
    pair=None,
) -> list[dict]:
    """Coverage of each aligner when every text is a student response ending in EOS.

    Returns one dict per aligner with the keys in `KEYS`. `pair` (a `TokenizerPair` of these
    two tokenizers) may be passed to reuse one already built.
    """
    from lightning_opd.align import TokenizerPair, align_batch, build_aligner

    check_aligners(aligner_names)
    texts = list(texts)
    if pair is None:
        pair = TokenizerPair.build(student_tok, teacher_tok)
    aligners = {name: build_aligner(name) for name in aligner_names}
    totals = {name: dict.fromkeys(("supervised_tokens", "rows", "spans", "seconds"), 0) for name in aligner_names}
    student_tokens, first_batch = 0, True
    for batch in batches(texts, batch_size):
        student_ids = student_tok(list(batch), add_special_tokens=False)["input_ids"]
        start = time.perf_counter()
        segments = align_batch(pair, student_ids, [True] * len(student_ids)).segments
        segment_seconds = time.perf_counter() - start
        student_tokens += segments.n_student_tokens
        if first_batch:  # one untimed call each: torch's first-call set-up is not alignment time
            for aligner in aligners.values():
                aligner.build_rows(segments, None)
            first_batch = False
        for name, aligner in aligners.items():
            start = time.perf_counter()
            rows = aligner.build_rows(segments, None)
            total = totals[name]
            total["seconds"] += segment_seconds + time.perf_counter() - start
            total["supervised_tokens"] += rows.supervised_student_tokens
            total["rows"] += len(rows)
            total["spans"] += int(rows.is_span.sum())
    return [
        {
            "aligner": name,
            "texts": len(texts),
            "student_tokens": student_tokens,
            "supervised_tokens": int(total["supervised_tokens"]),
            "coverage": total["supervised_tokens"] / student_tokens if student_tokens else 0.0,
            "teacher_vocab_reached": reached_share(aligners[name], pair),
            "rows": int(total["rows"]),
            "spans": int(total["spans"]),
            "seconds": float(total["seconds"]),
        }
        for name, total in totals.items()
    ]


# --- reading inputs ----------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_hub_logging() -> Iterator[None]:
    """Keep the hub client's retry warnings off stderr: a failure is reported in one line."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_spec(spec: str, role: str, eos: str | None = None):
    """A tokenizer from SPEC: tokenizer.json, directory, hub id, or fixture:NAME; `eos` names its
    EOS token (None: its own, else its first end-of-text token, `models.EOS_PREFERENCE`)."""
    from lightning_opd.models import load_tokenizer

    looks_like_path = spec.endswith(".json") or spec.startswith((".", "/", "~"))
    if looks_like_path and not Path(spec).expanduser().exists():
        raise AlignCommandError(f"--{role} {spec}: no such file or directory")
    try:
        with quiet_hub_logging():
            source = str(Path(spec).expanduser()) if looks_like_path else spec
            return load_tokenizer(TokenizerConfig(source=source, eos=eos))
    except Exception as err:  # ModelLoadError, or a malformed tokenizer file
        message = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise AlignCommandError(f"--{role} {spec}: {message}") from None


def read_texts(path: str, field: str) -> list[str]:
    """The `field` of every JSON line of `path` (blank lines skipped).

    Lines are read as bytes and decoded one by one (`data.tasks.json_line`, as training reads
    JSONL), so a file that is not UTF-8, or a bad line, is named by line and column in one
    message instead of a UnicodeDecodeError traceback from the middle of the file."""
    from lightning_opd.data.tasks import DataError, json_line, jsonl_lines

    file = Path(path)
    if not file.is_file():
        raise AlignCommandError(f"{path}: no such file")
    texts = []
    for number, raw in jsonl_lines(file):
        try:
            record = json_line(file, number, raw)
        except DataError as err:
            raise AlignCommandError(str(err)) from None
        if not isinstance(record, dict) or field not in record:
            raise AlignCommandError(f"{path}:{number}: no field {field!r} (use --field)")
        if not isinstance(record[field], str):
            raise AlignCommandError(f"{path}:{number}: field {field!r} is not a string")
        texts.append(record[field])
    if not texts:
        raise AlignCommandError(f"{path}: no texts")
    return texts


# --- the command -------------------------------------------------------------------------------


def add_align_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="JSONL file; each line's --field is one response text")
    parser.add_argument("--student", required=True, help="tokenizer SPEC: tokenizer.json, directory, hub id, fixture:NAME")
    parser.add_argument("--teacher", required=True, help="tokenizer SPEC (as --student)")
    parser.add_argument("--student-eos", help="the student's EOS token (default: its own, else its end-of-text token)")
    parser.add_argument("--teacher-eos", help="the teacher's EOS token (as --student-eos)")
    parser.add_argument("--aligner", default="exact", help="registered aligner names, comma-separated (default: exact)")
    parser.add_argument("--field", default="answer", help="JSON field holding the text (default: answer)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="texts per batch (default: 256)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per aligner")


def print_table(results: list[dict], title: str, caption: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), caption=escape(caption))
    for key in KEYS:
        table.add_column(key, justify="left" if key == "aligner" else "right", no_wrap=True)
    for r in results:
        reached = r["teacher_vocab_reached"]  # None: the aligner compares no distributions
        table.add_row(r["aligner"], str(r["texts"]), str(r["student_tokens"]), str(r["supervised_tokens"]),
                      f"{r['coverage']:.4f}", "—" if reached is None else f"{reached:.4f}",
                      str(r["rows"]), str(r["spans"]), f"{r['seconds']:.3f}")  # fmt: skip
    console = Console()
    console.width = max(console.width, 135)  # keep every column readable in a pipe or a narrow terminal
    console.print(table)


def run_align(args: argparse.Namespace) -> int:
    from lightning_opd.align import TokenizerPair

    try:
        names = [n.strip() for n in args.aligner.split(",") if n.strip()]
        check_aligners(names)
        if args.batch_size < 1:
            raise AlignCommandError(f"--batch-size must be >= 1, got {args.batch_size}")
        texts = read_texts(args.file, args.field)
        student = load_spec(args.student, "student", args.student_eos)
        teacher = load_spec(args.teacher, "teacher", args.teacher_eos)
    except AlignCommandError as err:
        print(f"lightning-opd align: {err}", file=sys.stderr)
        return 2
    pair = TokenizerPair.build(student, teacher)
    results = measure_coverage(student, teacher, texts, names, batch_size=args.batch_size, pair=pair)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(
            results,
            title=f"alignment coverage: student {args.student} -> teacher {args.teacher}",
            caption=f"{args.file} [{args.field}], {len(texts)} texts; |V∩| = {len(pair.vocab)}"
            f"{' (identical tokenizers)' if pair.identical else ''}",
        )
    return 0
