"""`arith_tool`: arithmetic worth delegating to the interpreter, with tool-use traces for SFT.

Problems are `a*b` or `a*b+c` with a of 3-4 digits and b, c of 2-3 digits ("What is
4821*37+519?"): hard for a small model to do in its head, one line for Python. The reference
solution is a tool-use trace in the fenced format of `rollout/tools.py`, e.g.

    ```python
    print(4821*37)
    ```
    ```output
    178377
    ```
    #### 178377

so a teacher SFT'd on it learns to call the tool, and its observation wrapper is exactly the
text the rollout loop appends (`tools.wrap_observation`). The output is computed with Python's
own integers (running the sandbox per example would cost ~50 ms); tests check on a sample that
the sandbox prints the same thing, so the traces hold real sandbox outputs.

SFT runs teacher forcing over the whole solution, observation included as input. The task's
`observation_spans` gives the character spans of the observations, and SFT masks their tokens
out of the labels, as the rollouts' loss mask does.

Determinism, sharding, validation and checking follow `ArithTask`: example i is a pure
function of (seed, i) through `random.Random(f"arith_tool-{seed}-{i}")`; the validation set is
`val_size` distinct problems from the stream `arith_tool-val-{seed}`, and a training draw that
hits one is redrawn; `check` is an exact numeric match of the final `####` answer. The
`data.arith` settings (digits, operators) do not apply to this task.
"""

from __future__ import annotations

import random

from ..config import DataConfig
from ..rewards import ANSWER_MARK
from ..rollout.tools import observation_spans as _spans
from ..rollout.tools import wrap_observation
from .tasks import ArithTask, DataError, Example, register_task

Problem = tuple[int, int, int | None]  # (a, b, c): a*b, plus c unless c is None


def observation_spans(solution: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the observation blocks ("\\n```output\\n...\\n```\\n")
    of a fenced tool-use trace; solution[s:e] is exactly what a rollout would mask."""
    return _spans(solution, "fenced")


@register_task("arith_tool")
class ArithToolTask(ArithTask):
    """`What is 4821*37+519?`, answered by one fenced Python call and `#### <answer>`."""

    # SFT (sft.supervised_finetune) masks these spans out of the labels: the model learns to
    # call the interpreter and read its output, not to predict the output itself
    observation_spans = staticmethod(observation_spans)

    a_digits = (3, 4)
    b_digits = (2, 3)
    c_digits = (2, 3)
    p_add = 0.5  # probability of the `+c` term

    def __init__(self, cfg: DataConfig):  # ArithTask's checks concern data.arith: not called
        if cfg.val_size < 0:
            raise DataError(f"data.val_size must be >= 0, got {cfg.val_size}")
        self.seed, self.val_size = cfg.seed, cfg.val_size
        self._val: list[Example] | None = None
        self._val_problems: frozenset[Problem] = frozenset()

    @staticmethod
    def _number(rng: random.Random, digits: tuple[int, int], low: int = 0) -> int:
        """A number of a random length in `digits` (inclusive), at least `low`."""
        n = rng.randint(*digits)
        return rng.randint(max(10 ** (n - 1), low), 10**n - 1)

    def _draw(self, rng: random.Random) -> Problem:  # type: ignore[override]
        a, b = self._number(rng, self.a_digits), self._number(rng, self.b_digits)
        c = self._number(rng, self.c_digits) if rng.random() < self.p_add else None
        return a, b, c

    @staticmethod
    def expression(problem: Problem) -> str:
        a, b, c = problem
        return f"{a}*{b}" if c is None else f"{a}*{b}+{c}"

    @staticmethod
    def value(problem: Problem) -> int:
        a, b, c = problem
        return a * b + (c or 0)

    def _make(self, problem: Problem, uid: str) -> Example:  # type: ignore[override]
        expr, answer = self.expression(problem), str(self.value(problem))
        # what print() of the expression writes, newline stripped as by format_observation
        trace = f"```python\nprint({expr})\n```" + wrap_observation(answer, "fenced")
        solution = f"{trace}{ANSWER_MARK} {answer}"
        return Example(f"What is {expr}?", answer, solution, uid=uid, answer_kind="number")
