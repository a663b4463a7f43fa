"""torchmetrics for OPD runs: answer accuracy (the task reward) and supervision coverage.

Both keep plain counts as states reduced by sum, so `compute()` after a distributed sync is
the exact global ratio (not a mean of per-rank ratios). Before any update, and whenever the
total is zero, they compute 0. Keep one metric object per stage (`train/...`, `val/...`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchmetrics import Metric

from .rewards import is_correct

if TYPE_CHECKING:
    from .data.tasks import Example


class AnswerAccuracy(Metric):
    """Fraction of responses whose final answer matches their example's reference."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, responses: Sequence[str], examples: Sequence[Example]) -> None:
        if len(responses) != len(examples):
            raise ValueError(
                f"AnswerAccuracy.update: {len(responses)} responses for {len(examples)} examples"
            )
        pairs = zip(responses, examples, strict=True)
        hits = sum(is_correct(r, ex.answer, ex.answer_kind) for r, ex in pairs)
        self.correct += hits
        self.total += len(examples)

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp_min(1)


class Coverage(Metric):
    """Fraction of (response) tokens that got a supervision row: supervised / total."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    supervised: Tensor
    total: Tensor

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # float64: exact for integer counts up to 2**53, and accepts fractional weights
        self.add_state(
            "supervised", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, supervised: int | float | Tensor, total: int | float | Tensor) -> None:
        if not isinstance(supervised, Tensor) and not isinstance(total, Tensor):
            if not 0 <= supervised <= total:  # checked only where it costs no device sync
                raise ValueError(
                    f"Coverage.update: need 0 <= supervised <= total, got {supervised} and {total}"
                )
        sup = torch.as_tensor(supervised, dtype=torch.float64, device=self.device).sum()
        tot = torch.as_tensor(total, dtype=torch.float64, device=self.device).sum()
        self.supervised += sup
        self.total += tot

    def compute(self) -> Tensor:
        return self.supervised / self.total.clamp_min(1e-12)
