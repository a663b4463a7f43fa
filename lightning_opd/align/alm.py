"""`alm`: approximate likelihood matching (Minixhofer et al., 2025), a coarse baseline.

ALM never compares distributions over alternatives: per aligned chunk it compares only how
likely each model finds the text of the chunk. Chunks are our segments (DESIGN §3.2), every
one of them, shared tokens and spans alike. For segment g with student tokens [c, d) and
teacher tokens [a, b):

    ℓ^S_g = Σ_{k=c}^{d-1} log p_S(s_k),     ℓ^T_g = Σ_{l=a}^{b-1} log p_T(t_l)

(full-vocabulary log-probs at the loss temperature). Each chunk likelihood is *binarised*
at temperature τ = `aligner.alm_temperature` (default 100): the chunk becomes a two-outcome
distribution Bern(q) with

    q = p(chunk)^{1/τ} = exp(x),   x = ℓ/τ,   log q = x,   log(1 − q) = log1mexp(x),

and the row loss is the forward KL between the teacher's and the student's Bernoullis,
scaled by τ (teacher detached):

    L_g = τ · KL(Bern(q_T) ‖ Bern(q_S))
        = τ · [ q_T (x_T − x_S) + (1 − q_T) (log1mexp(x_T) − log1mexp(x_S)) ].

As τ → ∞ this tends to (ℓ_T − ℓ_S) + ℓ_T log(ℓ_S / ℓ_T), the generalised KL between the
positive numbers −ℓ_T and −ℓ_S; it is 0 iff ℓ_S = ℓ_T.

Against the released SimCT baseline (`kdflow/algorithms/alm.py`), which we follow in
direction (KL from teacher to student), binarisation (p^{1/τ}, 1 − p^{1/τ}), default τ and
chunking (chunks close at 1:1 matches, our default `boundary: match`; `boundary: offset`
gives the finer chunks of the paper, closing at every common byte boundary), we deviate in:
- *exact form at every τ*: for τ ≥ 50 the released code evaluates the τ → ∞ closed form
  above, for τ < 50 the unscaled KL with probabilities clamped to [1e-8, 1 − 1e-8], so its
  loss jumps by a factor ≈ τ at τ = 50. We compute τ·KL exactly through a stable log1mexp;
  at τ = 100 it agrees with the closed form to O(ℓ²/τ) and is continuous in τ.
- *no debiasing* ("outcome chunk debiasing" of the paper; off by default in the released
  code) and *KL only* (its TVD option has no config field here).
- chunk likelihoods are capped at log p ≤ −1e-6 (below float32 resolution of a summed
  token log-prob) so that log1mexp stays finite when a model is certain of a chunk.
`loss.divergence` does not apply; `loss.form=sampled` falls back to the base class's
sampled form (advantage log π_T(chunk) − log π_S(chunk) on the same rows).
`teacher_mass` and `vocab_reached` are None: a chunk likelihood is not a distribution over
alternatives, so no share of the teacher's next-token probability is compared.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from lightning_opd.align.base import (
    Aligner,
    BatchSegments,
    Rows,
    ScoredBatch,
    ScoredSide,
    chunked,
    register_aligner,
    rows_from_segments,
    unit_logprobs,
)
from lightning_opd.config import LossConfig

if TYPE_CHECKING:
    from lightning_opd.align.pairing import TokenizerPair
    from lightning_opd.align.vocab import SharedVocab

LOG_HALF = -math.log(2.0)
MAX_CHUNK_LOGPROB = -1e-6  # cap on ℓ: keeps 1 − q > 0 when a model is certain of a chunk


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012): log(−expm1(x)) near 0,
    log1p(−exp(x)) below log ½. Each branch only sees inputs where it is finite, so the
    branch `where` discards cannot put NaN into the gradient."""
    near_zero = x > LOG_HALF
    upper = torch.log(-torch.expm1(torch.where(near_zero, x, LOG_HALF)))
    lower = torch.log1p(-torch.exp(torch.where(near_zero, LOG_HALF, x)))
    return torch.where(near_zero, upper, lower)


def binarised_kl(student_ll: torch.Tensor, teacher_ll: torch.Tensor, tau: float) -> torch.Tensor:
    """τ · KL(Bern(p_T^{1/τ}) ‖ Bern(p_S^{1/τ})) from chunk log-likelihoods; (R,) -> (R,)."""
    if not tau > 0:
        raise ValueError(f"alm_temperature must be > 0, got {tau}")
    x_s = student_ll.float().clamp(max=MAX_CHUNK_LOGPROB) / tau  # log q_S, (R,)
    x_t = teacher_ll.detach().float().clamp(max=MAX_CHUNK_LOGPROB) / tau  # log q_T, (R,)
    q_t, not_q_t = torch.exp(x_t), -torch.expm1(x_t)  # q_T and 1 − q_T, both without cancellation
    kl = q_t * (x_t - x_s) + not_q_t * (log1mexp(x_t) - log1mexp(x_s))
    return tau * kl


def chunk_loglik(side: ScoredSide, members: torch.Tensor, member_row: torch.Tensor, rows: int,
                 temperature: float, chunk: int) -> torch.Tensor:  # fmt: skip
    """Σ log p(token) per row, gathering at most `chunk` (chunk, V) logit rows at once: (rows,)."""
    device = side.logits.device  # rows are built on the CPU; index_add wants one device
    members, member_row = members.to(device), member_row.to(device)
    partial = chunked(
        int(members.numel()), chunk,
        lambda sl: unit_logprobs(side, members[sl], member_row[sl], rows, temperature)[None],
    )  # fmt: skip  # (n_chunks, rows): each chunk's contribution to every row
    return partial.sum(0)


@register_aligner("alm")
class ALMAligner(Aligner):
    def build_rows(self, seg: BatchSegments, batch: ScoredBatch | None) -> Rows:
        # every segment is a chunk: its row covers all its tokens on both sides (no logits needed)
        return rows_from_segments(seg)

    @property
    def tau(self) -> float:
        return self.options.alm_temperature

    def teacher_columns(self, vocab: SharedVocab, loss: LossConfig) -> torch.Tensor:
        """No column besides the response tokens': chunk likelihoods (and the sampled form) are
        sums of the sampled tokens' log-probabilities, their logit minus the full-vocabulary
        normaliser, both of which a restricted teacher keeps; there is no teacher mass."""
        return torch.zeros(0, dtype=torch.long)

    def full_row_losses(self, rows: Rows, batch: ScoredBatch, loss: LossConfig) -> torch.Tensor:
        n, temp, chunk = len(rows), loss.temperature, loss.chunk_rows
        student_ll = chunk_loglik(batch.student, rows.s_members, rows.s_member_row, n, temp, chunk)
        with torch.no_grad():  # the teacher is a fixed target
            t_members, t_row = rows.t_members, rows.t_member_row
            teacher_ll = chunk_loglik(batch.teacher, t_members, t_row, n, temp, chunk)
        return binarised_kl(student_ll, teacher_ll, self.tau)  # (R,)

    def teacher_mass(self, rows: Rows, batch: ScoredBatch, loss: LossConfig) -> None:
        """None: ALM compares chunk likelihoods, not distributions over alternatives."""
        return None

    def vocab_reached(self, pair: TokenizerPair) -> None:
        """None: no teacher id's probability is compared as an alternative (chunk likelihoods)."""
        return None
