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
from lightning_opd.threads import cpu_threads

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


# --- fused full form over gathered rows (the V∩ aligners' hot path) --------------------------------

# rows handled per pass inside `gathered_divergence` / `gathered_logsumexp` on the CPU: a (rows, U)
# float32 block of about this many bytes, so that the dozen elementwise passes over it run in cache
# instead of streaming (R, U) temporaries through memory (1 MiB: 6 rows of a 41k-column V∩;
# measured on the bench-gold rows, 397 x 41,765, one thread: 0.5-1 MiB fastest, 64 MiB 2.5x slower).
# Other devices take far larger blocks (each pass is a kernel launch there). On the CPU the passes
# run with one torch thread (threads.cpu_threads): 0.14 s for the fused forward there, 0.25-11 s
# with two threads on 2 loaded cores.
BLOCK_BYTES = 2**20
BLOCK_BYTES_ACCELERATOR = 2**30


def _block_rows(width: int, device: torch.device) -> int:
    budget = BLOCK_BYTES if device.type == "cpu" else BLOCK_BYTES_ACCELERATOR
    return max(1, budget // (4 * max(int(width), 1)))


def _gather(logits: Tensor, rows: Tensor, cols: Tensor | None) -> Tensor:
    """logits[rows][:, cols] as a new float32 tensor (owned: safe to modify in place)."""
    block = logits.index_select(0, rows)
    if cols is not None:
        block = block.index_select(1, cols)
    return block.float() if block.dtype != torch.float32 else block


def _lse_(t: Tensor) -> Tensor:
    """logsumexp over the last dim of a float32 (r, U) tensor it may overwrite; (r,). As
    torch.logsumexp: max + log Σ exp(x − max), an infinite max taken as 0."""
    m = t.amax(dim=-1)
    m = torch.where(torch.isinf(m), 0.0, m)
    return m + t.sub_(m[:, None]).exp_().sum(dim=-1).log()


def gathered_logsumexp(logits: Tensor, rows: Tensor, cols: Tensor | None, temperature: float) -> Tensor:
    """logsumexp(logits[rows][:, cols] / τ) over the columns, (r,) float32, no grad; a few rows at
    a time (BLOCK_BYTES), never the (r, U) block at once. cols None = every column."""
    _check_temperature(temperature)
    out = torch.empty(len(rows), dtype=torch.float32, device=logits.device)
    step = _block_rows(logits.shape[1] if cols is None else len(cols), logits.device)
    with torch.no_grad(), cpu_threads(1, logits.device):
        for lo in range(0, len(rows), step):
            t = _gather(logits, rows[lo : lo + step], cols)
            if temperature != 1.0:
                t.div_(temperature)
            out[lo : lo + step] = _lse_(t)
    return out


def _softmax_parts_(t: Tensor, slot: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Log-softmax and softmax of the rows [t, slot] (t (r, U) float32 finite, overwritten with its
    log-probabilities; slot (r,) float32, -inf allowed): (log p block = t, p block, log p slot,
    p slot)."""
    m = torch.maximum(t.amax(dim=-1), slot)  # (r,) finite: the block is
    t.sub_(m[:, None])
    e = t.exp()  # (r, U)
    total = e.sum(dim=-1) + torch.exp(slot - m)  # (r,)
    log_s = total.log()
    t.sub_(log_s[:, None])
    e.div_(total[:, None])
    log_slot = slot - m - log_s
    return t, e, log_slot, log_slot.exp()


class _GatheredKL(torch.autograd.Function):
    """KL over the rows [student_logits[rows_s][:, cols_s], slot_s] vs the teacher's likewise, a
    few rows at a time, with the gradient w.r.t. the student's logits computed in the same pass
    and kept (one (r, U) float32 tensor) instead of autograd's saved softmaxes (see
    `gathered_divergence`)."""

    @staticmethod
    def forward(ctx, student_logits, student_slot, teacher_logits, teacher_slot, rows_s, cols_s, rows_t, cols_t,
                reverse, temperature):  # fmt: skip
        r = len(rows_s)
        width = student_logits.shape[1] if cols_s is None else len(cols_s)
        device = student_logits.device
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss = torch.empty(r, dtype=torch.float32, device=device)
        grad = torch.empty((r, width), dtype=torch.float32, device=device) if want_grad else None
        grad_slot = torch.empty(r, dtype=torch.float32, device=device) if want_grad else None
        no_slot = torch.full((r,), NEG_INF, dtype=torch.float32, device=device)
        s_slot = no_slot if student_slot is None else student_slot.detach().float() / temperature
        t_slot = no_slot if teacher_slot is None else teacher_slot.detach().float() / temperature
        step = _block_rows(width, device)
        with cpu_threads(1, device):
            _GatheredKL._passes(loss, grad, grad_slot, student_logits, teacher_logits, s_slot, t_slot, rows_s, cols_s,
                                rows_t, cols_t, reverse, temperature, step, want_grad)  # fmt: skip
        if want_grad and temperature != 1.0:
            grad.div_(temperature)
            grad_slot.div_(temperature)
        ctx.save_for_backward(grad, grad_slot, rows_s, cols_s)
        ctx.shape, ctx.dtype, ctx.slot_dtype = student_logits.shape, student_logits.dtype, (
            None if student_slot is None else student_slot.dtype)
        return loss

    @staticmethod
    def _passes(loss, grad, grad_slot, student_logits, teacher_logits, s_slot, t_slot, rows_s, cols_s, rows_t, cols_t,
                reverse, temperature, step, want_grad) -> None:  # fmt: skip
        r = len(rows_s)
        for lo in range(0, r, step):
            sl = slice(lo, min(lo + step, r))
            ls, p, ls_slot, p_slot = _softmax_parts_(_scaled(student_logits, rows_s[sl], cols_s, temperature), s_slot[sl])
            lt, q, lt_slot, q_slot = _softmax_parts_(_scaled(teacher_logits, rows_t[sl], cols_t, temperature), t_slot[sl])
            # the slot, as _kl: 0 outside the support of the first distribution
            if reverse:  # KL(p_S || p_T)
                d = ls.sub_(lt)  # (r, U) log p_S − log p_T
                on = ls_slot != NEG_INF
                d_slot = torch.where(on, ls_slot - torch.where(on, lt_slot, 0.0), 0.0)
                loss[sl] = torch.linalg.vecdot(p, d) + torch.where(on, p_slot * d_slot, 0.0)
                if want_grad:  # d/dz = p (d + 1) − p Σ p (d + 1)
                    d.add_(1.0).mul_(p)  # p (d + 1)
                    total = d.sum(dim=-1) + torch.where(on, p_slot * (d_slot + 1.0), 0.0)  # (r,)
                    grad[sl] = d.sub_(p.mul_(total[:, None]))
                    grad_slot[sl] = torch.where(on, p_slot * (d_slot + 1.0), 0.0) - p_slot * total
            else:  # KL(p_T || p_S)
                d = lt.sub_(ls)  # (r, U) log p_T − log p_S
                on = lt_slot != NEG_INF
                d_slot = torch.where(on, lt_slot - torch.where(on, ls_slot, 0.0), 0.0)
                loss[sl] = torch.linalg.vecdot(q, d) + torch.where(on, q_slot * d_slot, 0.0)
                if want_grad:  # d/dz = p Σ q − q
                    mass = q.sum(dim=-1) + torch.where(on, q_slot, 0.0)  # (r,)
                    grad[sl] = p.mul_(mass[:, None]).sub_(q)
                    grad_slot[sl] = p_slot * mass - torch.where(on, q_slot, 0.0)

    @staticmethod
    def backward(ctx, grad_loss):
        grad, grad_slot, rows_s, cols_s = ctx.saved_tensors
        d_logits = d_slot = None
        if ctx.needs_input_grad[0]:
            d_logits = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad_loss.device)
            step = _block_rows(ctx.shape[1], grad_loss.device)
            with cpu_threads(1, grad_loss.device):
                for lo in range(0, len(rows_s), step):
                    sl = slice(lo, lo + step)
                    g = grad[sl] * grad_loss[sl, None]  # (r, U)
                    if cols_s is not None:  # into the full width (a column listed twice gets both)
                        g = torch.zeros((g.shape[0], ctx.shape[1]), dtype=g.dtype, device=g.device).index_add_(1, cols_s, g)
                    d_logits.index_add_(0, rows_s[sl], g.to(ctx.dtype))
        if ctx.needs_input_grad[1]:
            d_slot = (grad_slot * grad_loss).to(ctx.slot_dtype)
        return d_logits, d_slot, None, None, None, None, None, None, None, None


def _scaled(logits: Tensor, rows: Tensor, cols: Tensor | None, temperature: float) -> Tensor:
    t = _gather(logits.detach(), rows, cols)
    return t.div_(temperature) if temperature != 1.0 else t


def gathered_divergence(student_logits: Tensor, student_rows: Tensor, student_cols: Tensor | None,
                        teacher_logits: Tensor, teacher_rows: Tensor, teacher_cols: Tensor | None, *,
                        divergence: str, beta: float = LossConfig.beta, temperature: float = LossConfig.temperature,
                        student_slot: Tensor | None = None, teacher_slot: Tensor | None = None) -> Tensor:  # fmt: skip
    """`full_divergence` of the rows gathered from two logit tables, optionally with one extra slot
    per row, without materialising them: row r is

        student  [ student_logits[student_rows[r], student_cols], student_slot[r] ]
        teacher  [ teacher_logits[teacher_rows[r], teacher_cols], teacher_slot[r] ]

    (cols None = every column; no slot = no extra column), and the result (R,) float32 equals
    full_divergence(student rows, teacher rows, ...) to float32 rounding, gradients included
    (w.r.t. student_logits and student_slot; the teacher's are detached).

    For "fkl" and "rkl" the rows are processed a few at a time (BLOCK_BYTES) in one fused pass,
    and the gradient w.r.t. the gathered student logits is computed in that pass
    (fkl: p_S·Σq − q; rkl: p_S(d+1) − p_S·Σ p_S(d+1), d = log p_S − log p_T; over τ) and kept as
    one (R, U) float32 tensor: autograd would keep several (R, U) tensors, and the backward is
    then one scaled scatter. Slots may be -inf (a masked slot, as in full_divergence); the
    gathered logits must be finite: if any row's loss comes out non-finite (a -inf or NaN logit,
    or a slot that is -inf on one side only), the whole call is redone through full_divergence,
    whose conventions for masked slots then decide. "jsd" always goes that way."""
    _check_temperature(temperature)

    def reference() -> Tensor:
        zs = student_logits[student_rows]
        zt = teacher_logits[teacher_rows]
        if student_cols is not None:
            zs = zs[:, student_cols]
        if teacher_cols is not None:
            zt = zt[:, teacher_cols]
        if student_slot is not None or teacher_slot is not None:
            r = len(student_rows)
            fill = lambda slot, z: (slot if slot is not None else torch.full((r,), NEG_INF, device=z.device))  # noqa: E731
            zs = torch.cat([zs.float(), fill(student_slot, zs).float()[:, None]], dim=1)
            zt = torch.cat([zt.float(), fill(teacher_slot, zt).float()[:, None]], dim=1)
        return full_divergence(zs, zt, divergence=divergence, beta=beta, temperature=temperature)

    width = student_logits.shape[-1] if student_cols is None else len(student_cols)
    t_width = teacher_logits.shape[-1] if teacher_cols is None else len(teacher_cols)
    if divergence not in ("fkl", "rkl") or width == 0 or width != t_width or len(student_rows) != len(teacher_rows):
        return reference()  # (which also refuses what full_divergence refuses)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    out = _GatheredKL.apply(student_logits, student_slot, teacher_logits.detach(),
                            None if teacher_slot is None else teacher_slot.detach(), student_rows, student_cols,
                            teacher_rows, teacher_cols, divergence == "rkl", float(temperature))  # fmt: skip
    if not bool(torch.isfinite(out).all()):
        return reference()
    return out
