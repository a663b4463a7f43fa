"""Distillation losses as pure tensor functions.

Rows
    Every loss here works on *rows*. A row compares one student distribution with one
    teacher distribution over the same support of size ``U``: the full vocabulary when the
    tokenizers agree, or whatever shared support an aligner builds (shared tokens, a top-k
    union, span candidates, ...). Slots an aligner wants to ignore are *masked*: their
    logit is ``-inf`` in both the student row and the teacher row. A masked slot
    contributes exactly 0 to every divergence and yields finite (zero) gradients.

Loss forms
    * ``full_divergence``: a dense divergence (reverse KL, forward KL or generalised JSD)
      between the two softmaxes of each row, ``[R, U] -> [R]``.
    * ``sampled_policy_gradient``: on-policy distillation from the unit the student
      sampled (a token, or a span whose log-prob is the sum of its token log-probs), with
      the per-unit reverse-KL estimate ``log pi_T - log pi_S`` as a detached advantage,
      ``[R] -> [R]``.

Reduction
    ``reduce_rows`` turns per-row losses into a scalar ``sum_r w_r * l_r / max(N, 1)``
    where ``N`` is a batch-level normalizer shared by every aligner.

All math runs in float32 whatever the input dtype; outputs are float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_opd.config import LossConfig

NEG_INF = float("-inf")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """float32 log_softmax(logits / temperature) over the last dim; (..., U) -> (..., U).

    A row whose slots are all ``-inf`` (fully masked) comes back as all ``-inf`` instead
    of NaN, so it contributes 0 to every divergence.
    """
    scaled = logits.float() / temperature
    empty_row = torch.isneginf(scaled).all(dim=-1, keepdim=True)  # (..., 1)
    # log_softmax of an all -inf row is NaN (-inf - -inf); feed it zeros and re-mask.
    log_p = torch.log_softmax(scaled.masked_fill(empty_row, 0.0), dim=-1)
    return log_p.masked_fill(empty_row, NEG_INF)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_u p(u) [log p(u) - log q(u)] per row; (..., U) -> (...).

    Slots with p(u) = 0 (log p = -inf) contribute 0 (convention 0 log 0 = 0), whatever q
    is. Both log terms are replaced by 0 there *before* any arithmetic, so neither the
    value nor the gradient ever sees 0 * (-inf) or -inf - (-inf). If p(u) > 0 and
    q(u) = 0 the row is +inf, as KL should be.
    """
    support = log_p != NEG_INF  # NaN stays in the support so bad inputs stay visible
    safe_log_p = torch.where(support, log_p, 0.0)
    safe_log_q = torch.where(support, log_q, 0.0)
    terms = safe_log_p.exp() * (safe_log_p - safe_log_q)
    return torch.where(support, terms, 0.0).sum(dim=-1)


def _reverse_kl(student_log_p: Tensor, teacher_log_p: Tensor, beta: float) -> Tensor:
    return _kl(student_log_p, teacher_log_p)  # KL(p_S || p_T); beta unused


def _forward_kl(student_log_p: Tensor, teacher_log_p: Tensor, beta: float) -> Tensor:
    return _kl(teacher_log_p, student_log_p)  # KL(p_T || p_S); beta unused


def _generalised_jsd(student_log_p: Tensor, teacher_log_p: Tensor, beta: float) -> Tensor:
    # Conventional endpoints (the formula itself tends to 0 at both ends).
    if beta == 0.0:
        return _forward_kl(student_log_p, teacher_log_p, beta)
    if beta == 1.0:
        return _reverse_kl(student_log_p, teacher_log_p, beta)
    # log M = logaddexp(log beta + log p_T, log(1 - beta) + log p_S), (..., U).
    # Where both are -inf, logaddexp's backward is NaN, so feed zeros there and re-mask.
    both_masked = torch.isneginf(student_log_p) & torch.isneginf(teacher_log_p)
    weighted_teacher = torch.where(both_masked, 0.0, teacher_log_p + math.log(beta))
    weighted_student = torch.where(both_masked, 0.0, student_log_p + math.log1p(-beta))
    log_mixture = torch.logaddexp(weighted_teacher, weighted_student)
    log_mixture = log_mixture.masked_fill(both_masked, NEG_INF)
    return beta * _kl(teacher_log_p, log_mixture) + (1.0 - beta) * _kl(student_log_p, log_mixture)


# name -> f(student_log_p (..., U), teacher_log_p (..., U), beta) -> (...)
DIVERGENCES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "rkl": _reverse_kl,
    "fkl": _forward_kl,
    "jsd": _generalised_jsd,
}


def full_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str,
    beta: float = LossConfig.beta,
    temperature: float = LossConfig.temperature,
) -> Tensor:
    """Per-row divergence between student and teacher softmaxes.

    Args:
        student_logits: (R, U) any float dtype; masked slots are -inf. Extra leading
            dims are allowed and kept.
        teacher_logits: (R, U), same shape; detached here (the teacher gets no gradient).
        divergence: a key of ``DIVERGENCES`` (``loss.divergence`` of the config):
            ``"rkl"``  KL(p_S || p_T) = sum_u p_S (log p_S - log p_T)  (reverse KL, SimCT);
            ``"fkl"``  KL(p_T || p_S) = sum_u p_T (log p_T - log p_S);
            ``"jsd"``  generalised JSD of GKD (Agarwal et al., 2024):
            M = beta p_T + (1 - beta) p_S (built in log space),
            JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M).
            By convention (as in TRL) beta = 0 returns KL(p_T || p_S) and beta = 1 returns
            KL(p_S || p_T); the formula's own limit at both ends is 0.
        beta: mixture weight of the teacher in [0, 1]; only used by ``"jsd"``.
        temperature: > 0; both logit rows are divided by it before the softmax.

    Returns:
        (R,) float32. Slots that are -inf in both rows contribute exactly 0 with zero,
        finite gradients. A slot that is -inf only in the teacher while the student puts
        mass on it makes ``"rkl"`` +inf (and ``"fkl"`` likewise for the mirrored case).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {sorted(DIVERGENCES)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 1:
        raise ValueError("logits need at least one (support) dimension")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    _check_temperature(temperature)
    student_log_p = _log_probs(student_logits, temperature)  # (R, U)
    teacher_log_p = _log_probs(teacher_logits.detach(), temperature)  # (R, U)
    return DIVERGENCES[divergence](student_log_p, teacher_log_p, beta)


def sampled_policy_gradient(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    advantage_offset: Tensor | float = 0.0,
) -> Tensor:
    """Per-unit on-policy distillation loss from the sampled unit.

    Args:
        student_logprobs: (R,) log pi_S(y) of the unit the student sampled (a token, or a
            span: the sum of its token log-probs, computed by the caller). Carries grad.
        teacher_logprobs: (R,) log pi_T(y) of the same unit.
        advantage_offset: scalar or (R,) added to the advantage (e.g. a GRPO outcome
            advantage); detached.

    Returns:
        (R,) float32 loss = -A * log pi_S(y), with
        A = (offset + log pi_T(y) - log pi_S(y)).detach(), so d loss / d log pi_S = -A.
    """
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(
            "student_logprobs and teacher_logprobs must have the same shape, got "
            f"{tuple(student_logprobs.shape)} and {tuple(teacher_logprobs.shape)}"
        )
    student = student_logprobs.float()
    offset = torch.as_tensor(advantage_offset, dtype=torch.float32, device=student.device)
    advantage = (offset + teacher_logprobs.float() - student).detach()  # (R,)
    return -advantage * student


def reduce_rows(per_row: Tensor, weights: Tensor | None, normalizer: float | Tensor) -> Tensor:
    """Scalar sum_r w_r * l_r / max(normalizer, 1).

    Args:
        per_row: (R,) per-row losses l_r.
        weights: (R,) or None (all ones); detached. Rows with weight 0 contribute exactly
            0 to the value even if their loss is inf/NaN.
        normalizer: N, by default the number of student response tokens in the batch
            (supervised or not), so every aligner shares the same denominator (SimCT's
            choice); alternatively the number of supervised tokens. Clamped to >= 1.

    Returns:
        () float32.
    """
    losses = per_row.float()
    if weights is None:
        weighted = losses
    else:
        if weights.shape != per_row.shape:
            raise ValueError(
                "weights must have the same shape as per_row, got "
                f"{tuple(weights.shape)} and {tuple(per_row.shape)}"
            )
        weights = weights.detach().float()
        weighted = torch.where(weights != 0, weights * losses, 0.0)
    denominator = torch.as_tensor(normalizer, dtype=torch.float32, device=losses.device)
    return weighted.sum() / denominator.detach().clamp_min(1.0)


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log_softmax(logits / temperature) at ``ids``.

    Args:
        logits: (..., V) any float dtype.
        ids: (...) integer ids into the last dim of ``logits``.
        temperature: > 0.

    Returns:
        (...) float32. Computed as chosen logit - logsumexp, so the full (..., V)
        log_softmax is never materialised.
    """
    _check_temperature(temperature)
    if ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"ids shape {tuple(ids.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    scaled = logits.float()  # (..., V)
    if temperature != 1.0:
        scaled = scaled / temperature
    chosen = scaled.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)  # (...)
    return chosen - torch.logsumexp(scaled, dim=-1)  # (...)
