"""Rewards: pull the final answer out of a response and check it against the reference.

A response states its final answer GSM8K-style (`... #### 432`) or LaTeX-style
(`... \\boxed{432}`). `extract_final_answer` finds it; `is_correct` compares it with the
reference under an *answer kind*, looked up in `ANSWER_KINDS`:

- `number`: exact numeric equality after `normalize_number` ("1,000" == "1000.00", "-0" == "0").
  Decimal arithmetic, so no float rounding: "0.1" and "0.10000000001" differ.
- `math`: numeric equality, else math-verify (`parse` + `verify`) on both sides wrapped in
  `\\boxed{}` ("1/2" == "0.5" == "\\frac{1}{2}"). math-verify runs sympy and can be slow on
  odd input: long answers skip it, and it runs under its own signal-based timeout when called
  from the main thread (signals work only there; elsewhere it runs unguarded, but any error
  it raises still counts as a wrong answer).

`is_correct` never raises on a bad response or reference (they are simply wrong); only an
unknown answer kind raises, since that is a programming error that would otherwise silently
zero every reward.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

ANSWER_MARK = "####"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_PLAIN_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,2})?")
_MAX_MATH_CHARS = 300  # longer answers are compared numerically only
_MATH_TIMEOUT_S = 5


def _last_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}`, braces balanced, or None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            if depth == 0:
                return text[start:pos].strip()
        # unbalanced (e.g. a truncated response): try an earlier one
    return None


def extract_final_answer(text: str) -> str | None:
    """The final answer a response states: after the last `####` (its first line), else the
    content of the last `\\boxed{...}`, else None."""
    if not isinstance(text, str):
        return None
    if ANSWER_MARK in text:
        tail = text.rsplit(ANSWER_MARK, 1)[1].strip()
        first_line = tail.split("\n", 1)[0].strip()
        if first_line:
            return first_line
    return _last_boxed(text)


def normalize_number(s: str | int) -> str | None:
    """A canonical string for a number written as text, or None if it is not one.

    Strips whitespace, `$`, a leading `+`, a trailing `.` and thousands commas ("1,234.50" ->
    "1234.5"); trailing fractional zeros go ("3.50" -> "3.5") and "-0" becomes "0". Commas
    that are not thousands separators ("1,2"), words, "nan" and "inf" give None.
    """
    if isinstance(s, bool) or not isinstance(s, (str, int)):
        return None
    text = str(s).strip().replace("$", "").strip()
    sign = ""
    if text and text[0] in "+-":
        sign, text = ("-" if text[0] == "-" else ""), text[1:].strip()
    if text.endswith(".") and text[:-1].replace(",", "").isdigit():
        text = text[:-1]
    if "," in text:
        if not _THOUSANDS.fullmatch(text):
            return None
        text = text.replace(",", "")
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        value = Decimal(sign + text)
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    out = format(value, "f")  # plain notation, exact (no context rounding)
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    return out


def _same_number(pred: str, ref: str) -> bool:
    a, b = normalize_number(pred), normalize_number(ref)
    return a is not None and a == b


def _same_math(pred: str, ref: str) -> bool:
    if _same_number(pred, ref):
        return True
    if not pred or not ref or max(len(pred), len(ref)) > _MAX_MATH_CHARS:
        return False
    from math_verify import parse, verify  # imported lazily: it pulls in sympy

    in_main = threading.current_thread() is threading.main_thread()
    timeout = _MATH_TIMEOUT_S if in_main else None  # the timeout uses SIGALRM
    gold = parse(f"\\boxed{{{ref}}}", parsing_timeout=timeout)
    answer = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
    return bool(gold) and bool(answer) and bool(verify(gold, answer, timeout_seconds=timeout))


# answer kind -> checker(extracted prediction, reference) -> bool
ANSWER_KINDS: dict[str, Callable[[str, str], bool]] = {
    "number": _same_number,
    "math": _same_math,
}


def is_correct(response: str, reference: str, kind: str = "number") -> bool:
    """Whether the final answer stated in `response` equals `reference` under `kind`."""
    checker = ANSWER_KINDS.get(kind)
    if checker is None:
        raise ValueError(f"unknown answer kind {kind!r}; known: {sorted(ANSWER_KINDS)}")
    try:
        pred = extract_final_answer(response)
        if pred is None or not isinstance(reference, str):
            return False
        return bool(checker(pred, reference.strip()))
    except Exception:  # math-verify/sympy can raise nearly anything on odd input
        return False
