"""Prompt tasks: where prompts, reference answers and rewards come from.

A task (registered by name in `TASKS`, chosen by `data.source`) hands out `Example`s:

- `stream(shard=s, num_shards=n, start=k)`: shard s's examples in a fixed order, skipping the
  first k. Shards are disjoint; together they cover every training example. A finite task
  (a file) yields one pass and stops; an unbounded one (arith) never stops.
- `validation_set()`: a fixed held-out list that no training stream contains.
- `check(response, example)`: the reward, delegated to `rewards.is_correct`.

Tasks hold plain values only (no open files, no config objects), so a task pickles into
DataLoader worker processes. Optional counters: a task that skips malformed input exposes
`val_bad_lines: int` and `train_bad_lines: dict[(shard, num_shards), int]` (see `JsonlTask`).

`arith` (the embedded default) draws multi-digit arithmetic problems: example i is a pure
function of (seed, i), so its streams are unbounded and resume in O(1). `jsonl` streams a
file such as GSM8K.
"""

from __future__ import annotations

import codecs
import json
import operator
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from typing import Any, Protocol

from ..config import DataConfig
from ..errors import DataError  # defined there (no heavy imports); imported from here by callers
from ..rewards import ANSWER_MARK, is_correct


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer."""

    prompt: str  # the user message (no chat template; each model renders it itself)
    answer: str  # reference final answer, e.g. "432"
    solution: str = ""  # a full reference response ending with the final answer, for SFT
    uid: str = ""  # stable id, e.g. "arith-0-123" or "path:line"
    answer_kind: str = "number"  # "number" (exact numeric match) | "math" (math-verify)


class Task(Protocol):
    """What the datamodule and the trainer need from a task (see the module docstring)."""

    def example(self, index: int) -> Example: ...

    def stream(self, *, shard: int, num_shards: int, start: int = 0) -> Iterator[Example]: ...

    def validation_set(self) -> list[Example]: ...

    def check(self, response: str, example: Example) -> bool: ...


TASKS: dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: make a task available as `data.source=<name>`."""

    def decorator(cls: type) -> type:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered ({TASKS[name].__name__})")
        TASKS[name] = cls
        cls.name = name  # also the prefix of the task's uids and RNG streams
        return cls

    return decorator


def build_task(cfg: DataConfig) -> Task:
    """The task named by `cfg.source`, built from `cfg`."""
    if cfg.source not in TASKS:
        raise DataError(
            f"data.source={cfg.source!r} is not a registered task; known: {sorted(TASKS)}"
        )
    return TASKS[cfg.source](cfg)


def check_shard(shard: int, num_shards: int, start: int = 0) -> None:
    if num_shards < 1 or not 0 <= shard < num_shards or start < 0:
        raise ValueError(f"bad shard {shard} of {num_shards} (start={start})")


def split_reference(text: str) -> tuple[str, str]:
    """(final answer, full solution) from a GSM8K-style answer field `... #### 1,234`.

    The answer is the text after the last `####`, stripped, thousands commas removed. A field
    without `####` is taken as a bare answer, and its solution becomes `#### <answer>`.
    """
    if ANSWER_MARK in text:
        answer = text.rsplit(ANSWER_MARK, 1)[1].strip().replace(",", "")
        return answer, text
    answer = text.strip().replace(",", "")
    return answer, f"{ANSWER_MARK} {answer}"


# ----------------------------------------------------------------------------- arith


def _digits(n: int) -> list[int]:
    """Decimal digits of n >= 0, units first."""
    return [int(c) for c in reversed(str(n))]


def _at(digits: list[int], i: int) -> int:
    return digits[i] if i < len(digits) else 0


def _add_steps(a: int, b: int) -> list[str]:
    """Column by column, units first, carry added: 347+85 -> 7+5=12 4+8+1=13 3+0+1=4."""
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = _at(da, i), _at(db, i)
        total = x + y + carry
        steps.append(f"{x}+{y}={total}" if i == 0 else f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return steps


def _sub_steps(a: int, b: int) -> list[str]:
    """Column by column with borrows: 432-85 -> 12-5=7 13-8-1=4 4-0-1=3.

    A top digit written 1x has borrowed ten from the next column, which subtracts that
    borrow (-1, else -0). A negative difference is flipped first: 85-432 -> -(432-85) ...
    """
    if a < b:
        return [f"-({b}-{a})", *_sub_steps(b, a)]
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i, x in enumerate(da):
        y = _at(db, i)
        top = x + 10 if x - y - borrow < 0 else x
        rest = top - y - borrow
        steps.append(f"{top}-{y}={rest}" if i == 0 else f"{top}-{y}-{borrow}={rest}")
        borrow = int(top > x)
    return steps


def _mul_steps(a: int, b: int) -> list[str]:
    """A partial product per nonzero digit of b, then their sum: 347*25 -> 347*5=1735
    347*20=6940 1735+6940=8675."""
    shifted = [d * 10**i for i, d in enumerate(_digits(b)) if d]
    steps = [f"{a}*{m}={a * m}" for m in shifted]
    if len(shifted) > 1:
        steps.append("+".join(str(a * m) for m in shifted) + f"={a * b}")
    return steps or [f"{a}*0=0"]


# operator -> (its value, its worked solution)
ARITH_OPS: dict[str, tuple[Callable[[int, int], int], Callable[[int, int], list[str]]]] = {
    "+": (operator.add, _add_steps),
    "-": (operator.sub, _sub_steps),
    "*": (operator.mul, _mul_steps),
}


@register_task("arith")
class ArithTask:
    """`What is 347+85?` with the worked solution `7+5=12 4+8+1=13 3+0+1=4 #### 432`.

    Each operand has min_digits..max_digits digits (the length drawn first, then the value);
    the operator is drawn from `data.arith.ops` (a repeated one is drawn more often).
    Training example i comes from `random.Random(f"arith-{seed}-{i}")`, so a stream is
    unbounded and starts anywhere in O(1); shard s of n takes indices s, s+n, s+2n, ...
    Validation: `val_size` distinct problems from a separate stream, `arith-val-{seed}`,
    excluded from training by their (a, op, b): a training draw that hits one is redrawn
    from the same generator, so example i stays a pure function of (seed, i).
    """

    name = "arith"
    max_redraws = 1000

    def __init__(self, cfg: DataConfig):
        arith = cfg.arith
        if not 1 <= arith.min_digits <= arith.max_digits:
            raise DataError(
                f"data.arith: need 1 <= min_digits <= max_digits, "
                f"got {arith.min_digits} and {arith.max_digits}"
            )
        unknown = sorted(set(arith.ops) - set(ARITH_OPS))
        if unknown or not arith.ops:
            raise DataError(
                f"data.arith.ops={arith.ops!r}: unknown or no operators {unknown}; "
                f"known: {''.join(ARITH_OPS)}"
            )
        self.seed, self.val_size, self.ops = cfg.seed, cfg.val_size, arith.ops
        self.min_digits, self.max_digits = arith.min_digits, arith.max_digits
        self.worked_solution = arith.worked_solution
        operands = 10**self.max_digits - (10 ** (self.min_digits - 1) if self.min_digits > 1 else 0)
        problems = operands**2 * len(set(self.ops))
        if self.val_size > problems // 2:
            raise DataError(
                f"data.val_size={self.val_size} is over half of the {problems} "
                f"distinct problems that data.arith allows"
            )
        self._val: list[Example] | None = None
        self._val_problems: frozenset[tuple[int, str, int]] = frozenset()

    def _operand(self, rng: random.Random) -> int:
        n = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        return self._operand(rng), rng.choice(self.ops), self._operand(rng)

    def _make(self, problem: tuple[int, str, int], uid: str) -> Example:
        a, op, b = problem
        value, worked = ARITH_OPS[op]
        answer = str(value(a, b))
        steps = worked(a, b) if self.worked_solution else []
        solution = " ".join([*steps, f"{ANSWER_MARK} {answer}"])
        return Example(f"What is {a}{op}{b}?", answer, solution, uid=uid, answer_kind="number")

    def validation_set(self) -> list[Example]:
        if self._val is None:
            rng, problems = random.Random(f"{self.name}-val-{self.seed}"), {}
            for _ in range(100 * self.val_size + 1000):
                if len(problems) >= self.val_size:
                    break
                problems.setdefault(self._draw(rng), None)  # a dict keeps draw order
            if len(problems) < self.val_size:
                raise DataError(f"cannot draw data.val_size={self.val_size} distinct problems")
            self._val_problems = frozenset(problems)
            self._val = [
                self._make(p, f"{self.name}-val-{self.seed}-{j}") for j, p in enumerate(problems)
            ]
        return list(self._val)

    def example(self, index: int) -> Example:
        if index < 0:
            raise IndexError(f"{self.name} example index must be >= 0, got {index}")
        self.validation_set()  # training draws avoid its problems
        rng = random.Random(f"{self.name}-{self.seed}-{index}")
        for _ in range(self.max_redraws):
            problem = self._draw(rng)
            if problem not in self._val_problems:
                return self._make(problem, f"{self.name}-{self.seed}-{index}")
        raise DataError(f"{self.name} example {index}: every draw was a validation problem")

    def stream(self, *, shard: int, num_shards: int, start: int = 0) -> Iterator[Example]:
        check_shard(shard, num_shards, start)
        for k in count(start):
            yield self.example(shard + k * num_shards)

    def check(self, response: str, example: Example) -> bool:
        return is_correct(response, example.answer, example.answer_kind)


# ----------------------------------------------------------------------------- jsonl


def jsonl_lines(path: Path, first: int = 1) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for the non-blank lines of `path` from line `first`.

    A UTF-8 byte order mark opening the file (as some Windows editors write) is dropped: it is
    not part of the first record, and editors do not count it as a column."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if lineno >= first and raw.strip():
                yield lineno, raw


def json_line(path: Path, lineno: int, raw: bytes, alternative: str = "") -> Any:
    """The JSON value on line `lineno` of a JSONL file (its raw bytes, as `jsonl_lines` yields them).

    `DataError` otherwise, one line naming file, line and 1-based column, as editors count
    them: json's own `colno` (characters, so right after non-ASCII text too) for bad JSON, and
    for bytes that are not UTF-8 the character column at which the first of them stands
    (`UnicodeDecodeError.start` is a 0-based byte offset, which would be off by one, and by
    more after multi-byte characters). `alternative` ends the message: another way out that the
    caller offers (", or set data.on_bad_line=skip ...")."""
    where = f"{path}:{lineno}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        column = len(raw[: err.start].decode("utf-8")) + 1  # the bytes before it are valid
        raise DataError(
            f"{where}: not valid UTF-8 at column {column} (byte 0x{raw[err.start]:02x}: {err.reason}); "
            f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8 {path} > fixed.jsonl){alternative}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: bad JSON at column {err.colno} ({err.msg}); fix the line{alternative}") from None


def _check_not_empty(path: Path, key: str) -> None:
    """DataError if `path` holds no non-blank line: said now, rather than as 'fewer lines than
    data.val_size' or an empty validation set later."""
    if next(jsonl_lines(path), None) is None:
        raise DataError(f"{path}: the file is empty ({key}); give a JSONL file with one JSON object per line")


# the way past a malformed line that training offers (the align command has none)
SKIP_HINT = ", or set data.on_bad_line=skip to skip malformed lines"


@register_task("jsonl")
class JsonlTask:
    """Prompts from a JSONL file, read lazily line by line (GSM8K layout by default).

    Each line is an object with `data.prompt_field` (a string) and `data.answer_field` (a
    string such as GSM8K's "...\\n#### 72", or a number). Blank lines are ignored. A malformed
    line raises `DataError` naming file, line and field, or with `data.on_bad_line=skip` is
    skipped and counted. Validation: `data.val_path`, else the first `data.val_size` valid
    lines, which the training stream then starts after. Training lines are dealt to shards
    by physical line number, (line - first training line) % num_shards; each shard reads the
    whole file but parses only its own lines.
    """

    def __init__(self, cfg: DataConfig):
        if not cfg.path:
            raise DataError("data.source=jsonl needs data.path")
        self.path = Path(cfg.path)
        self.val_path = Path(cfg.val_path) if cfg.val_path else None
        for key, p in (("data.path", self.path), ("data.val_path", self.val_path)):
            if p is not None and not p.is_file():
                raise DataError(f"{p}: file not found ({key})")
            if p is not None:
                _check_not_empty(p, key)
        if cfg.on_bad_line not in ("error", "skip"):
            raise DataError(f"data.on_bad_line={cfg.on_bad_line!r} is not one of error | skip")
        self.prompt_field, self.answer_field = cfg.prompt_field, cfg.answer_field
        self.skip_bad = cfg.on_bad_line == "skip"
        self.val_size = cfg.val_size
        self.val_bad_lines = 0  # skipped lines in the validation source
        self.train_bad_lines: dict[tuple[int, int], int] = {}  # (shard, num_shards) -> per pass
        self._val: list[Example] | None = None
        self._first_train_line = 1

    def parse(self, path: Path, lineno: int, raw: bytes) -> Example:
        """The Example on one line; DataError naming file, line and field if malformed."""
        where = f"{path}:{lineno}"
        record = json_line(path, lineno, raw, alternative=SKIP_HINT)
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; fix the line{SKIP_HINT}")
        for key, setting, holds in (
            (self.prompt_field, "prompt_field", "prompt"),
            (self.answer_field, "answer_field", "reference answer"),
        ):
            if key not in record:
                fields = ", ".join(map(repr, list(record)[:10])) or "none"
                raise DataError(
                    f"{where}: missing field {key!r} (data.{setting}); the line has fields {fields}: "
                    f"set data.{setting} to the field that holds the {holds}"
                )
        prompt, answer = record[self.prompt_field], record[self.answer_field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(
                f"{where}: field {self.prompt_field!r} must be a non-empty string, "
                f"got {type(prompt).__name__}"
            )
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise DataError(
                f"{where}: field {self.answer_field!r} must be a string or a number, "
                f"got {type(answer).__name__}"
            )
        final, solution = split_reference(answer)
        if not final:
            raise DataError(f"{where}: field {self.answer_field!r} has an empty final answer")
        return Example(prompt, final, solution, uid=where, answer_kind="math")

    def _valid(self, path: Path, first: int = 1) -> Iterator[tuple[int, Example]]:
        """(line number, Example) for the valid lines of a validation source; skipped lines
        are counted in `val_bad_lines`."""
        for lineno, raw in jsonl_lines(path, first):
            try:
                yield lineno, self.parse(path, lineno, raw)
            except DataError:
                if not self.skip_bad:
                    raise
                self.val_bad_lines += 1

    def validation_set(self) -> list[Example]:
        """The held-out examples (built on first call, then cached)."""
        if self._val is None:
            self.val_bad_lines = 0
            if self.val_path is not None:
                # the first val_size examples of the validation file
                self._val = [ex for _, ex in islice(self._valid(self.val_path), self.val_size)]
            else:
                pairs = list(islice(self._valid(self.path), self.val_size))
                if len(pairs) < self.val_size:
                    raise DataError(
                        f"{self.path}: only {len(pairs)} valid lines, fewer than "
                        f"data.val_size={self.val_size}; lower it or set data.val_path"
                    )
                self._val = [ex for _, ex in pairs]
                self._first_train_line = pairs[-1][0] + 1 if pairs else 1
        return list(self._val)

    def stream(self, *, shard: int, num_shards: int, start: int = 0) -> Iterator[Example]:
        """One pass over this shard's training lines, skipping its first `start` examples."""
        check_shard(shard, num_shards, start)
        self.validation_set()  # fixes where training starts
        first, bad, seen = self._first_train_line, 0, 0
        for lineno, raw in jsonl_lines(self.path, first):
            if (lineno - first) % num_shards != shard:
                continue
            try:
                example = self.parse(self.path, lineno, raw)
            except DataError:
                if not self.skip_bad:
                    raise
                bad += 1
                key = (shard, num_shards)
                self.train_bad_lines[key] = max(bad, self.train_bad_lines.get(key, 0))
                continue
            seen += 1
            if seen > start:
                yield example

    def example(self, index: int) -> Example:
        """The index-th training example (a scan of the file: prefer `stream`)."""
        found = next(self.stream(shard=0, num_shards=1, start=index), None)
        if found is None:
            raise IndexError(f"{self.path}: no training example {index}")
        return found

    def check(self, response: str, example: Example) -> bool:
        return is_correct(response, example.answer, example.answer_kind)
