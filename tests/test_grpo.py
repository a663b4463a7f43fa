"""GRPO mixing (`OPDModule.mixed_policy_gradient` and its use in `distillation_loss`) against
advantages worked out by hand.

Per row r of response i: A_r = outcome_coef · Â_i + opd_coef · w_r · (log π_T − log π_S), with
Â_i = (r_i − mean_g r) / std_g r (population std) over the responses g to the same prompt, and
the row loss is −A_r · log π_S with A_r detached. The methods are called on a stand-in for the
module that holds only the settings they read, with logits built so that every log-prob below
is a chosen number: a row of logits [log p, log(1 − p)] has log π(token 0) = log p exactly.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lightning_opd.align.base import Rows, ScoredBatch, ScoredSide
from lightning_opd.config import RLConfig
from lightning_opd.module import OPDModule

SQRT2 = math.sqrt(2.0)


def side(probs: list[float], lengths: list[int], grad: bool = False) -> ScoredSide:
    """Responses of `lengths` tokens; token n is id 0 with probability probs[n] (vocabulary 2)."""
    p = torch.tensor(probs, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=1).float().requires_grad_(grad)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return ScoredSide(logits, torch.zeros(len(probs), dtype=torch.long), offsets)


def one_row_per_token(n: int) -> Rows:
    pos = torch.arange(n)
    return Rows(pos, pos, pos, pos, pos, pos)


def stand_in(outcome_coef: float, opd_coef: float) -> SimpleNamespace:
    """What the two methods read of the module: its settings, and each other."""
    module = SimpleNamespace(
        cfg=SimpleNamespace(loss=SimpleNamespace(temperature=1.0, normalizer="response_tokens"),
                            rl=RLConfig(outcome_coef=outcome_coef, opd_coef=opd_coef)),  # fmt: skip
        _global_token_count=float,
    )
    module.mixed_policy_gradient = lambda *a: OPDModule.mixed_policy_gradient(module, *a)
    return module


def advantages(module: SimpleNamespace, student: ScoredSide, teacher: ScoredSide,
               weights: list[float] | None, rewards: list[float], groups: list[int]) -> torch.Tensor:  # fmt: skip
    """The advantage each row was given, read back from its loss −A·log π_S, and checked against
    the gradient that loss sends to the sampled token's logit: −A·(1 − p_S)."""
    rows = one_row_per_token(len(student.ids))
    w = torch.tensor(weights) if weights is not None else None
    losses = OPDModule.mixed_policy_gradient(module, rows, ScoredBatch(student, teacher, None), w, rewards, groups)
    student_lp = torch.log_softmax(student.logits.detach(), dim=-1)[:, 0]
    adv = -losses.detach() / student_lp
    losses.sum().backward()
    expected_grad = -adv * (1 - student_lp.exp())  # A detached: no gradient through log π_S in A
    torch.testing.assert_close(student.logits.grad[:, 0], expected_grad, atol=1e-5, rtol=1e-4)
    return adv


def test_outcome_advantage_is_group_normalised_over_the_samples_of_a_prompt() -> None:
    # samples_per_prompt = 3 for prompt 0, 2 for prompt 1; one token per response, p_S = 0.5
    module = stand_in(outcome_coef=1.0, opd_coef=0.0)
    student = side([0.5] * 5, [1] * 5, grad=True)
    adv = advantages(module, student, side([0.9] * 5, [1] * 5), None, [1.0, 0.0, 0.0, 1.0, 1.0], [0, 0, 0, 1, 1])
    # prompt 0: mean 1/3, std sqrt(2/9) -> (2/3)/sqrt(2/9) = sqrt 2, (-1/3)/sqrt(2/9) = -1/sqrt 2;
    # prompt 1: every answer right -> 0
    torch.testing.assert_close(adv, torch.tensor([SQRT2, -1 / SQRT2, -1 / SQRT2, 0.0, 0.0]), atol=1e-4, rtol=0)
    # the right answer's token is pushed up: its loss gradient on the sampled logit is negative
    assert student.logits.grad[0, 0] < 0 < student.logits.grad[1, 0]


def test_interleaved_groups_and_rows_take_the_advantage_of_their_own_response() -> None:
    # responses (prompt, reward): (0, 1) of 2 tokens, (1, 0), (0, 0) of 2 tokens, (1, 1)
    module = stand_in(outcome_coef=2.0, opd_coef=0.0)
    student = side([0.5] * 6, [2, 1, 2, 1], grad=True)
    adv = advantages(module, student, side([0.5] * 6, [2, 1, 2, 1]), None, [1.0, 0.0, 0.0, 1.0], [0, 1, 0, 1])
    # each group: mean 1/2, std 1/2 -> Â = ±1, times outcome_coef 2
    torch.testing.assert_close(adv, torch.tensor([2.0, 2.0, -2.0, -2.0, -2.0, 2.0]), atol=1e-4, rtol=0)


def test_opd_term_is_teacher_minus_student_log_prob_times_the_row_weight() -> None:
    module = stand_in(outcome_coef=0.0, opd_coef=0.5)
    student = side([0.25, 0.25, 0.5, 0.8], [4], grad=True)
    teacher = side([0.75, 0.75, 0.125, 0.2], [4])
    adv = advantages(module, student, teacher, [1.0, 0.5, 2.0, 0.0], [0.0], [0])
    # 0.5 · w · log(p_T / p_S): log 3, log 3 / 2, 2 · log(1/4), 0 · log(1/4)
    expected = 0.5 * torch.tensor([math.log(3), 0.5 * math.log(3), 2 * math.log(0.25), 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    # the teacher prefers the first token more than the student does: the student is pulled towards it
    assert adv[0] > 0 and adv[2] < 0


def test_without_row_weights_every_row_weighs_one() -> None:
    module = stand_in(outcome_coef=0.0, opd_coef=1.0)
    adv = advantages(module, side([0.25, 0.5], [2], grad=True), side([0.75, 0.125], [2]), None, [0.0], [0])
    torch.testing.assert_close(adv, torch.tensor([math.log(3), math.log(0.25)]), atol=1e-5, rtol=1e-5)


def test_row_weights_scale_only_the_opd_term_not_the_outcome_term() -> None:
    module = stand_in(outcome_coef=1.0, opd_coef=1.0)
    # two responses to one prompt, rewards 1 and 0: Â = +1, -1; one token each
    student, teacher = side([0.25, 0.5], [1, 1], grad=True), side([0.75, 0.125], [1, 1])
    adv = advantages(module, student, teacher, [0.5, 0.0], [1.0, 0.0], [0, 0])
    # row 0: 1 + 0.5 · log 3; row 1: the weight 0 silences the teacher, the outcome stays -1
    torch.testing.assert_close(adv, torch.tensor([1 + 0.5 * math.log(3), -1.0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("opd_coef", [0.0, 1.0])
def test_distillation_loss_folds_the_weights_into_the_advantage_only(opd_coef: float) -> None:
    """With outcome_coef > 0 the reduction takes no weights: Σ_r −A_r · log π_S / N."""
    module = stand_in(outcome_coef=1.0, opd_coef=opd_coef)
    student, teacher = side([0.25, 0.5, 0.5], [2, 1]), side([0.75, 0.125, 0.5], [2, 1])
    segments = SimpleNamespace(n_student_tokens=4)  # the normaliser N (one more token than rows)
    weights = SimpleNamespace(token_weights=torch.tensor([0.5, 0.25, 0.0]))
    loss = OPDModule.distillation_loss(module, one_row_per_token(3), ScoredBatch(student, teacher, None), weights,
                                       [1.0, 0.0], [0, 0], segments)  # fmt: skip
    ls, lt = [math.log(0.25), math.log(0.5), math.log(0.5)], [math.log(0.75), math.log(0.125), math.log(0.5)]
    outcome = [1.0, 1.0, -1.0]  # rows 0 and 1 belong to response 0 (reward 1), row 2 to response 1
    w = [0.5, 0.25, 0.0]
    expected = sum(-(outcome[r] + opd_coef * w[r] * (lt[r] - ls[r])) * ls[r] for r in range(3)) / 4
    assert float(loss) == pytest.approx(expected, abs=1e-4)
