"""`chain_tool`: a chain of dependent operations, one interpreter call per operation.

A problem is a start number and three numbered operations applied in turn, e.g.

    Start with 47. Step 1: times 6. Step 2: add 35. Step 3: mod 23.

and the reference solution is a tool-use trace in the fenced format of `rollout/tools.py` with
one call per step, each call's left operand the previous call's output:

    ```python
    # Step 1: times 6
    print(47*6)
    ```
    ```output
    282
    ```
    ```python
    # Step 2: add 35
    print(282+35)
    ```
    ```output
    317
    ```
    ```python
    # Step 3: mod 23
    print(317%23)
    ```
    ```output
    18
    ```
    #### 18

Design (issue 14: SOD needs several dependent steps whose divergence can differ, on a task that
tiny models learn within this machine's budget):

- every step needs the tool: the first is a 2-digit number times one digit 3..9 (never
  trivial for a model that cannot multiply in its head), the middle one adds or subtracts a
  2-digit number, the last takes the result mod a 2-digit number or multiplies it by 3..9;
- the steps are dependent: call k+1 must copy the output of call k (a number that is nowhere in
  the prompt), so one wrong copy, or one wrong operand, makes every later value wrong, and the
  final `#### answer` is right only if every step was;
- each call opens with a comment that repeats its step's words from the prompt (`# Step 2: add
  35`): the model counts its calls and copies what follows `Step k:` in the prompt, a plain
  look-up, and the operand it then writes in the code sits right above it;
- every intermediate stays positive (the subtrahend is smaller than the product), so each
  output is a plain integer line.

Why these sizes (docs/results/chain_tool.md): the first version (3-4 digit start, 2-digit
multiplier, 3-digit addend and modulus, unnumbered instructions) left a 4x128 teacher at 0.00
after 1,200 x 64 SFT steps: every trace copies about five numbers of 3-7 digits, and one wrong
digit anywhere fails it. With the numbers at most four digits and numbered steps, the same
teacher passes 0.8 after 500 x 64 steps.

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

# how each operation reads in the prompt and in its call's comment
PHRASES = {"+": "add {x}", "-": "subtract {x}", "%": "mod {x}", "*": "times {x}"}


def phrase(k: int, op: str, x: int) -> str:
    """The words of step k (0-based): `Step 1: times 6`, `Step 2: subtract 35`, ..."""
    return f"Step {k + 1}: " + PHRASES[op].format(x=x)


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
    """`Start with 47. Step 1: times 6. Step 2: add 35. Step 3: mod 23.`, answered by three
    dependent fenced Python calls and `#### <answer>`. From `ArithToolTask`: the observation
    spans SFT masks out of the labels, `__init__` and `_number`."""

    generator_version = 3  # part of the model cache key (prepare.py): bump when the text changes
    start_digits = (2, 2)  # from 12
    mul_digits = (1, 1)  # first step: start * this (3..9)
    add_digits = (2, 2)  # middle step: + or - this (from 11)
    mod_digits = (2, 2)  # last step: % this (from 11: a guess is rarely right) ...
    last_mul_digits = (1, 1)  # ... or * this (3..9)
    p_mod = 0.5  # probability that the last step is `%` (else `*`)

    def _draw(self, rng: random.Random) -> Problem:  # type: ignore[override]
        start = self._number(rng, self.start_digits, low=12)
        b = self._number(rng, self.mul_digits, low=3)
        product = start * b
        middle_op = rng.choice("+-")
        c = self._number(rng, self.add_digits, low=11)
        if middle_op == "-" and c >= product:  # keep every intermediate positive
            c = c % product or 1
        if rng.random() < self.p_mod:
            last: Step = ("%", self._number(rng, self.mod_digits, low=11))
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
        return f"Start with {start}. " + " ".join(f"{phrase(k, op, x)}." for k, (op, x) in enumerate(steps))

    @classmethod
    def calls(cls, problem: Problem) -> list[str]:
        """The code of every call: `# Step k: <instruction>` then `print(<previous output><op><operand>)`."""
        inputs = [problem[0], *cls.values(problem)[:-1]]
        return [f"# {phrase(k, op, x)}\nprint({v}{op}{x})"
                for k, (v, (op, x)) in enumerate(zip(inputs, problem[1], strict=True))]  # fmt: skip

    def _make(self, problem: Problem, uid: str) -> Example:  # type: ignore[override]
        outputs = self.values(problem)
        trace = "".join(f"```python\n{code}\n```" + wrap_observation(str(out), "fenced")
                        for code, out in zip(self.calls(problem), outputs, strict=True))  # fmt: skip
        answer = str(outputs[-1])
        return Example(self.prompt(problem), answer, f"{trace}{ANSWER_MARK} {answer}", uid=uid, answer_kind="number")
