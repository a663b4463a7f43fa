"""Tests for lightning_opd.losses: hand-computed values, properties and masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lightning_opd.losses import (
    DIVERGENCES,
    full_divergence,
    reduce_rows,
    sampled_policy_gradient,
    token_logprobs,
)

KINDS = ("rkl", "fkl", "jsd")
FAST = settings(max_examples=40, deadline=None)
LOGIT = st.floats(-15.0, 15.0, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def logit_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 logit tensors of the same small (R, U) shape, U >= 2 (over one slot every
    divergence is 0 whatever the logits, so a width of 1 tests nothing)."""
    shape = (draw(st.integers(1, 4)), draw(st.integers(2, 6)))
    student = draw(arrays(np.float32, shape, elements=LOGIT))
    teacher = draw(arrays(np.float32, shape, elements=LOGIT))
    return torch.from_numpy(student), torch.from_numpy(teacher)


def slow_divergence(
    student_logits: list[float], teacher_logits: list[float], kind: str, beta: float = 0.5
) -> float:
    """Reference for one row: a Python loop with math.log, no torch."""

    def softmax(xs: list[float]) -> list[float]:
        top = max(xs)
        exps = [math.exp(x - top) for x in xs]
        return [e / sum(exps) for e in exps]

    def kl(p: list[float], q: list[float]) -> float:
        return sum(
            pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0
        )

    p_s, p_t = softmax(student_logits), softmax(teacher_logits)
    if kind == "rkl":
        return kl(p_s, p_t)
    if kind == "fkl":
        return kl(p_t, p_s)
    mixture = [beta * t + (1 - beta) * s for s, t in zip(p_s, p_t, strict=True)]
    return beta * kl(p_t, mixture) + (1 - beta) * kl(p_s, mixture)


# ---------------------------------------------------------------- full_divergence values


def hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    student = torch.tensor([[0.0, 0.0]])  # p_S = [0.5, 0.5]
    teacher = torch.tensor([[math.log(0.25), math.log(0.75)]])  # p_T = [0.25, 0.75]
    return student, teacher


def test_hand_computed_values() -> None:
    student, teacher = hand_example()
    rkl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    fkl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    m = [0.5 * 0.25 + 0.5 * 0.5, 0.5 * 0.75 + 0.5 * 0.5]  # [0.375, 0.625]
    kl_t_m = 0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    kl_s_m = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    jsd = 0.5 * kl_t_m + 0.5 * kl_s_m
    for kind, expected in (("rkl", rkl), ("fkl", fkl), ("jsd", jsd)):
        got = full_divergence(student, teacher, divergence=kind, beta=0.5)
        assert got.shape == (1,) and got.dtype == torch.float32
        assert got.item() == pytest.approx(expected, abs=1e-6), kind
    assert rkl != pytest.approx(fkl)  # the example does tell the directions apart


def test_registry_names() -> None:
    assert set(DIVERGENCES) == set(KINDS)


@FAST
@given(pair=logit_pairs(), kind=st.sampled_from(KINDS), beta=st.floats(0.0, 1.0))
def test_identical_distributions_give_zero(pair, kind, beta) -> None:
    student, _ = pair
    shifted = student + 3.0  # same softmax, different logits
    got = full_divergence(student, shifted, divergence=kind, beta=beta)
    assert torch.allclose(got, torch.zeros_like(got), atol=1e-5)


@FAST
@given(pair=logit_pairs(), beta=st.floats(0.01, 0.99))
def test_non_negative_and_jsd_bounded(pair, beta) -> None:
    student, teacher = pair
    assert (full_divergence(student, teacher, divergence="rkl") >= -1e-6).all()
    assert (full_divergence(student, teacher, divergence="fkl") >= -1e-6).all()
    jsd = full_divergence(student, teacher, divergence="jsd", beta=beta)
    # M >= beta p_T and M >= (1-beta) p_S  =>  JSD_beta <= H(beta) <= log 2
    entropy_bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert (jsd >= -1e-6).all()
    assert (jsd <= entropy_bound + 1e-5).all()


@FAST
@given(pair=logit_pairs())
def test_beta_endpoints_and_kl_div_reference(pair) -> None:
    student, teacher = pair
    rkl = full_divergence(student, teacher, divergence="rkl")
    fkl = full_divergence(student, teacher, divergence="fkl")
    torch.testing.assert_close(full_divergence(student, teacher, divergence="jsd", beta=0.0), fkl)
    torch.testing.assert_close(full_divergence(student, teacher, divergence="jsd", beta=1.0), rkl)
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    # kl_div(input, target) = KL(target || input): input=log p_T, target=log p_S is reverse KL
    reference = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(rkl, reference, atol=1e-5, rtol=1e-4)


@FAST
@given(
    pair=logit_pairs(),
    kind=st.sampled_from(KINDS),
    beta=st.sampled_from([1e-4, 1e-2, 0.3, 0.5, 0.9, 0.99, 1 - 1e-4]),
)
def test_matches_slow_reference(pair, kind, beta) -> None:
    student, teacher = pair
    got = full_divergence(student, teacher, divergence=kind, beta=beta)
    for row in range(student.shape[0]):
        expected = slow_divergence(student[row].tolist(), teacher[row].tolist(), kind, beta)
        assert got[row].item() == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_jsd_near_endpoints_is_continuous_with_formula_not_the_convention() -> None:
    student, teacher = hand_example()
    s_row, t_row = student[0].tolist(), teacher[0].tolist()
    fkl = full_divergence(student, teacher, divergence="fkl").item()
    rkl = full_divergence(student, teacher, divergence="rkl").item()
    for beta in (1e-2, 1e-3, 1e-4):
        near_zero = full_divergence(student, teacher, divergence="jsd", beta=beta).item()
        near_one = full_divergence(student, teacher, divergence="jsd", beta=1 - beta).item()
        # fp32 cancellation leaves ~1e-7 absolute error, far below the values compared
        assert near_zero == pytest.approx(slow_divergence(s_row, t_row, "jsd", beta), abs=2e-7)
        assert near_one == pytest.approx(slow_divergence(s_row, t_row, "jsd", 1 - beta), abs=2e-7)
        # JSD_beta ~ beta * KL(p_T || p_S) as beta -> 0: it goes to 0, unlike the convention
        assert near_zero <= 2 * beta * fkl and near_one <= 2 * beta * rkl


def test_gradient_matches_kl_div_reference() -> None:
    torch.manual_seed(0)
    student = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5)
    full_divergence(student, teacher, divergence="rkl").sum().backward()
    ours = student.grad.clone()
    student.grad = None
    F.kl_div(
        teacher.log_softmax(-1), student.log_softmax(-1), log_target=True, reduction="sum"
    ).backward()
    torch.testing.assert_close(ours, student.grad)


# ---------------------------------------------------------------- masking, grads, dtypes


@pytest.mark.parametrize(
    "kind,beta",
    [("rkl", 0.5), ("fkl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 1.0)],
)
def test_masked_column_changes_nothing(kind: str, beta: float) -> None:
    torch.manual_seed(1)
    student = torch.randn(4, 5)
    teacher = torch.randn(4, 5)
    masked = torch.full((4, 1), float("-inf"))

    plain = student.clone().requires_grad_(True)
    value = full_divergence(plain, teacher, divergence=kind, beta=beta)
    value.sum().backward()

    padded = torch.cat([student, masked], dim=1).requires_grad_(True)
    padded_value = full_divergence(
        padded, torch.cat([teacher, masked], dim=1), divergence=kind, beta=beta
    )
    padded_value.sum().backward()

    assert not torch.isnan(padded_value).any()
    torch.testing.assert_close(padded_value, value)
    assert torch.isfinite(padded.grad).all()
    torch.testing.assert_close(padded.grad[:, :5], plain.grad)
    assert (padded.grad[:, 5] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_row_is_zero_without_nan(kind: str) -> None:
    student = torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0], [float("-inf"), float("-inf")]])
    value = full_divergence(student, teacher, divergence=kind)
    value.sum().backward()
    assert value[1].item() == 0.0 and value[0].item() > 0
    assert torch.isfinite(student.grad).all() and (student.grad[1] == 0).all()


def test_teacher_only_mask_under_student_mass_is_infinite_rkl() -> None:
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, float("-inf")]])
    assert full_divergence(student, teacher, divergence="rkl").item() == math.inf
    # the student has mass everywhere the teacher does, so forward KL stays finite
    assert full_divergence(student, teacher, divergence="fkl").item() == pytest.approx(math.log(2))


@FAST
@given(pair=logit_pairs(), kind=st.sampled_from(KINDS), temperature=st.floats(0.25, 4.0))
def test_temperature_scales_logits(pair, kind, temperature) -> None:
    student, teacher = pair
    torch.testing.assert_close(
        full_divergence(student, teacher, divergence=kind, temperature=temperature),
        full_divergence(student / temperature, teacher / temperature, divergence=kind),
    )


def test_temperature_two_explicit() -> None:
    student, teacher = hand_example()
    got = full_divergence(student, teacher, divergence="rkl", temperature=2.0)
    assert got.item() == pytest.approx(full_divergence(student / 2, teacher / 2, divergence="rkl").item())
    assert got.item() != pytest.approx(full_divergence(student, teacher, divergence="rkl").item())


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_gets_no_gradient(kind: str) -> None:
    torch.manual_seed(2)
    student = torch.randn(2, 4, requires_grad=True)
    teacher = torch.randn(2, 4, requires_grad=True)
    full_divergence(student, teacher, divergence=kind).sum().backward()
    assert teacher.grad is None or (teacher.grad == 0).all()
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_give_float32_close_to_fp32(kind: str) -> None:
    torch.manual_seed(3)
    student, teacher = torch.randn(6, 32), torch.randn(6, 32)
    got = full_divergence(student.bfloat16(), teacher.bfloat16(), divergence=kind)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, full_divergence(student, teacher, divergence=kind), atol=2e-2, rtol=5e-2
    )
    # the math itself is fp32: identical to upcasting the bf16 values first
    torch.testing.assert_close(
        got, full_divergence(student.bfloat16().float(), teacher.bfloat16().float(), divergence=kind)
    )


# ---------------------------------------------------------------- sampled_policy_gradient


def test_sampled_policy_gradient_value_and_gradient() -> None:
    student = torch.tensor([-1.0, -2.0], requires_grad=True)
    teacher = torch.tensor([-0.5, -3.0], requires_grad=True)
    loss = sampled_policy_gradient(student, teacher)
    # A = [-0.5 - -1, -3 - -2] = [0.5, -1];  loss = -A * s = [0.5, -2]
    torch.testing.assert_close(loss, torch.tensor([0.5, -2.0]))
    loss.sum().backward()
    torch.testing.assert_close(student.grad, torch.tensor([-0.5, 1.0]))  # -A
    assert teacher.grad is None


def test_sampled_policy_gradient_offset_is_added_and_detached() -> None:
    student = torch.tensor([-1.0, -2.0], requires_grad=True)
    teacher = torch.tensor([-0.5, -3.0])
    offset = torch.tensor([1.0, 1.0], requires_grad=True)
    loss = sampled_policy_gradient(student, teacher, advantage_offset=offset)
    torch.testing.assert_close(loss, torch.tensor([1.5, 0.0]))  # A = [1.5, 0]
    loss.sum().backward()
    torch.testing.assert_close(student.grad, torch.tensor([-1.5, 0.0]))
    assert offset.grad is None
    scalar = sampled_policy_gradient(student.detach(), teacher, advantage_offset=1.0)
    torch.testing.assert_close(scalar, torch.tensor([1.5, 0.0]))


def test_sampled_policy_gradient_bf16_returns_float32() -> None:
    loss = sampled_policy_gradient(torch.tensor([-1.0]).bfloat16(), torch.tensor([-0.5]).bfloat16())
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(0.5)


# ---------------------------------------------------------------- reduce_rows


def test_reduce_rows_hand_example() -> None:
    per_row = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    weights = torch.tensor([1.0, 0.0, 0.5], requires_grad=True)
    got = reduce_rows(per_row, weights, 4)
    assert got.shape == () and got.item() == pytest.approx((1.0 + 1.5) / 4)
    got.backward()
    torch.testing.assert_close(per_row.grad, torch.tensor([0.25, 0.0, 0.125]))
    assert weights.grad is None
    assert reduce_rows(per_row, None, torch.tensor(4.0)).item() == pytest.approx(6.0 / 4)


def test_reduce_rows_small_normalizer_divides_by_one() -> None:
    per_row = torch.tensor([1.0, 2.0, 3.0])
    assert reduce_rows(per_row, None, 0).item() == pytest.approx(6.0)
    assert reduce_rows(per_row, None, torch.tensor(0.5)).item() == pytest.approx(6.0)
    assert reduce_rows(torch.zeros(0), None, 0).item() == 0.0


def test_reduce_rows_zero_weight_drops_infinite_row() -> None:
    per_row = torch.tensor([1.0, math.inf])
    assert reduce_rows(per_row, torch.tensor([1.0, 0.0]), 1).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_log_softmax_gather(temperature: float) -> None:
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 11)
    ids = torch.randint(0, 11, (2, 3))
    got = token_logprobs(logits, ids, temperature=temperature)
    expected = (logits / temperature).log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_token_logprobs_bf16_and_gradient() -> None:
    torch.manual_seed(5)
    logits = torch.randn(4, 7).bfloat16().requires_grad_(True)
    ids = torch.tensor([0, 6, 3, 3])
    got = token_logprobs(logits, ids)
    assert got.dtype == torch.float32
    expected = logits.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_error() -> None:
    student, teacher = hand_example()
    with pytest.raises(ValueError, match="unknown divergence"):
        full_divergence(student, teacher, divergence="tvd")
    with pytest.raises(ValueError, match="same shape"):
        full_divergence(student, torch.zeros(1, 3), divergence="rkl")
    for beta in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="beta"):
            full_divergence(student, teacher, divergence="jsd", beta=beta)
    for temperature in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            full_divergence(student, teacher, divergence="rkl", temperature=temperature)
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(student, torch.tensor([0]), temperature=temperature)
    with pytest.raises(ValueError, match="same shape"):
        sampled_policy_gradient(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="weights"):
        reduce_rows(torch.zeros(2), torch.ones(3), 1)
    with pytest.raises(ValueError, match="ids shape"):
        token_logprobs(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(torch.zeros(2, 5), torch.zeros(2))
