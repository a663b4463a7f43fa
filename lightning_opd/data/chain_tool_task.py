"""`chain_tool`: a chain of dependent operations, one interpreter call per operation.

A problem is a start number and three operations applied in turn, e.g.

    Start with 4821. Multiply by 37, then subtract 519, then mod 997.

and the reference solution is a tool-use trace in the fenced format of `rollout/tools.py` with
one call per operation, each call's left operand the previous call's output:

    ```python
    # multiply by 37
    print(4821*37)
    ```
    ```output
    178377
    ```
    ```python
    # subtract 519
    print(178377-519)
    ```
    ```output
    177858
    ```
    ```python
    # mod 997
    print(177858%997)
    ```
    ```output
    392
    ```
    #### 392

Design (issue 14: SOD needs several dependent steps whose divergence can differ):

- every step needs the tool: the first is a 3-4 digit number times a 2-digit one (never
  trivial), the middle one adds or subtracts a 3-digit number to the 4-6 digit product, the
  last takes the result mod a 3-digit number or multiplies it by one digit 3..9 (answers that
  a tiny model cannot compute in its head);
- the steps are dependent: call k+1 must copy the output of call k (a number that is nowhere in
  the prompt), so one wrong copy, or one wrong operand, makes every later value wrong, and the
  final `#### answer` is right only if every step was;
- each call opens with a comment that repeats its instruction word for word from the prompt
  (`# subtract 519`), and every instruction's words are used once per prompt (`multiply by`
  first, `add`/`subtract`, then `mod`/`times`): the operand is then copied right after its own
  phrase. Without the comment, a 4x128 teacher SFT'd 600 steps (batch 64) copied the observations
  and the first call right but mis-copied the later operands from the prompt (accuracy 0.0;
  docs/results/chain_tool.md);
- every intermediate stays positive (the subtrahend is smaller than the product), so each
  output is a plain integer line.

The observations are computed with Python's own integers; tests check on a sample that the
bubblewrap sandbox prints the same text. As for `arith_tool`, SFT masks the observation spans
(`observation_spans`) out of the labels. Determinism, sharding, the validation set and the check
follow `ArithTask` (example i is a pure function of (seed, i) via `random.Random(
f"chain_tool-{seed}-{i}")`; validation problems are never drawn for training).
"""

from __future__ import annotations

import random

from ..rewards import ANSWER_MARK
from ..rollout.tools import wrap_observation
from .tasks import Example, register_task
from .tool_task import ArithToolTask

# (op symbol, operand) per step; the problem is (start, ((op, x), ...))
Step = tuple[str, int]
Problem = tuple[int, tuple[Step, ...]]

# how each operation reads in the prompt and in its call's comment: a multiplication is
# `multiply by` as the first step and `times` as the last, so no phrase occurs twice in a prompt
FIRST_PHRASES = {"*": "multiply by {x}"}
PHRASES = {"+": "add {x}", "-": "subtract {x}", "%": "mod {x}", "*": "times {x}"}


def phrase(k: int, op: str, x: int) -> str:
    """The instruction of step k (0-based) in words: `multiply by 37`, `subtract 519`, ..."""
    return (FIRST_PHRASES if k == 0 else PHRASES)[op].format(x=x)


def apply(value: int, op: str, x: int) -> int:
    """value <op> x for op in * + - % (Python's own semantics, as the interpreter computes)."""
    if op == "*":
        return value * x
    if op == "+":
        return value + x
    if op == "-":
        return value - x
    if op == "%":
        return value % x
    raise ValueError(f"unknown operation {op!r}")


@register_task("chain_tool")
class ChainToolTask(ArithToolTask):
    """`Start with 4821. Multiply by 37, then subtract 519, then mod 997.`,
    answered by three dependent fenced Python calls and `#### <answer>`. From `ArithToolTask`: the
    observation spans SFT masks out of the labels, `__init__` and `_number`."""

    start_digits = (3, 4)
    mul_digits = (2, 2)  # first step: start * this (from 11)
    add_digits = (3, 3)  # middle step: + or - this (from 101)
    mod_digits = (3, 3)  # last step: % this (from 101: a guess is rarely right) ...
    last_mul_digits = (1, 1)  # ... or * this (3..9)
    p_mod = 0.5  # probability that the last step is `%` (else `*`)

    def _draw(self, rng: random.Random) -> Problem:  # type: ignore[override]
        start = self._number(rng, self.start_digits)
        b = self._number(rng, self.mul_digits, low=11)
        product = start * b
        middle_op = rng.choice("+-")
        c = self._number(rng, self.add_digits, low=101)
        if middle_op == "-" and c >= product:  # keep every intermediate positive
            c = c % product or 1
        if rng.random() < self.p_mod:
            last: Step = ("%", self._number(rng, self.mod_digits, low=101))
        else:
            last = ("*", self._number(rng, self.last_mul_digits, low=3))
        return start, (("*", b), (middle_op, c), last)

    @staticmethod
    def values(problem: Problem) -> list[int]:
        """The output of every call, in order; the last is the answer."""
        value, out = problem[0], []
        for op, x in problem[1]:
            value = apply(value, op, x)
            out.append(value)
        return out

    @staticmethod
    def prompt(problem: Problem) -> str:
        start, steps = problem
        phrases = [phrase(k, op, x) for k, (op, x) in enumerate(steps)]
        return f"Start with {start}. " + ", then ".join(phrases).capitalize() + "."

    @classmethod
    def calls(cls, problem: Problem) -> list[str]:
        """The code of every call: `# <instruction>` then `print(<previous output><op><operand>)`."""
        inputs = [problem[0], *cls.values(problem)[:-1]]
        return [f"# {phrase(k, op, x)}\nprint({v}{op}{x})"
                for k, (v, (op, x)) in enumerate(zip(inputs, problem[1], strict=True))]  # fmt: skip

    def _make(self, problem: Problem, uid: str) -> Example:  # type: ignore[override]
        outputs = self.values(problem)
        trace = "".join(f"```python\n{code}\n```" + wrap_observation(str(out), "fenced")
                        for code, out in zip(self.calls(problem), outputs, strict=True))  # fmt: skip
        answer = str(outputs[-1])
        return Example(self.prompt(problem), answer, f"{trace}{ANSWER_MARK} {answer}", uid=uid, answer_kind="number")
