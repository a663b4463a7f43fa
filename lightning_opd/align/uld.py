"""`uld`: universal logit distillation (Boizard et al., 2024), a coarse baseline.

ULD needs no vocabulary correspondence at all (it works even if V∩ were empty): at an aligned
position it compares the two models' next-token distributions *as sorted lists of
probabilities*, forgetting which token holds which mass. With p = softmax(z^S_k / T) over the
student's full vocabulary V_S and q = softmax(z^T_l / T) over the teacher's V_T, both sorted
descending (p_(1) ≥ p_(2) ≥ ...), and K = min(`aligner.uld_top_k`, |V_S|, |V_T|):

    W1(p, q) = Σ_{i=1}^{K} |p_(i) − q_(i)| + |r_p − r_q|,    r = 1 − Σ_{i≤K} p_(i)  (tail bucket)

    L_r = λ · W1,   λ = `aligner.uld_weight`.

Because the two supports are unrelated, ULD takes the closed form of the Wasserstein-1
distance in which each sorted rank is transported to the same rank: the L1 distance between the
sorted vectors (the paper's form, and the released SimCT baseline `kdflow/algorithms/uld.py`,
which pads the smaller vocabulary with zeros before sorting). The tail bucket makes top-K
exact when K = the smaller vocabulary: the zero padding of the released full sort contributes
Σ_{i>K} q_(i) = r_q, which is what one bucket holds. Top-K (`torch.topk`) keeps the cost at
O(V) per row instead of a full sort; `aligner.uld_top_k` ≤ 0 means no truncation. The defaults
in `AlignerConfig` (K = 1024, λ = 1.5; T = `loss.temperature` = 1) are the released ones.

*Aligned positions.* The released code aligns the two token streams greedily and compares the
models only at 1:1 matches: a student and a teacher token with the same text that start at the
same place (equal prefixes). Both models then predict the same piece of text after the same
text, so comparing their distributions is meaningful; inside a span they would predict
different pieces (`1` vs `12`). Our rows are exactly those: every 1:1 match (`one_to_one_rows`,
the same positions as `exact`: shared-token positions and the matched token that closes each
span), each supervising that one student token.

`loss.divergence` does not apply; `loss.form=sampled` falls back to the base class's sampled
form on the same rows (per-token OPD at the matched tokens).

*Teacher mass.* The sorted comparison (top-K plus the tail bucket) uses all of the teacher's
probability, so `teacher_mass` is 1 on every row and `vocab_reached` is 1: nothing is dropped,
but nothing says which token holds which mass either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_opd.align.base import (
    Aligner,
    BatchSegments,
    Rows,
    ScoredBatch,
    chunked,
    one_to_one_rows,
    register_aligner,
    require_full_vocabulary,
)
from lightning_opd.config import LossConfig

if TYPE_CHECKING:
    from lightning_opd.align.pairing import TokenizerPair
    from lightning_opd.align.vocab import SharedVocab


def sorted_probs(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Top-k probabilities of softmax(logits / T), descending, plus the remaining mass as one
    last bucket: (r, V) -> (r, k+1), float32."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (r, V)
    if k < probs.shape[-1]:
        top = torch.topk(probs, k, dim=-1, sorted=True).values  # (r, k)
    else:
        top = torch.sort(probs, dim=-1, descending=True).values  # (r, V), k == V
    tail = (1.0 - top.sum(-1, keepdim=True)).clamp_min(0.0)  # (r, 1); ~0 when k == V
    return torch.cat([top, tail], dim=-1)


def sorted_w1(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int,
              temperature: float) -> torch.Tensor:  # fmt: skip
    """L1 distance between the sorted probability vectors, (r, V_S), (r, V_T) -> (r,).
    The teacher is detached; the vocabularies may differ in size."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    smaller = min(student_logits.shape[-1], teacher_logits.shape[-1])
    k = smaller if top_k <= 0 else min(int(top_k), smaller)
    p = sorted_probs(student_logits, k, temperature)  # (r, k+1)
    q = sorted_probs(teacher_logits.detach(), k, temperature)  # (r, k+1)
    return (p - q).abs().sum(-1)


@register_aligner("uld")
class ULDAligner(Aligner):
    def build_rows(self, seg: BatchSegments, batch: ScoredBatch | None) -> Rows:
        # the 1:1 matches, as exact's rows: a segment closed at a tool-observation edge by tokens
        # that start apart is not one (BatchSegments.closes_on_match)
        return one_to_one_rows(seg)

    def teacher_columns(self, vocab: SharedVocab, loss: LossConfig) -> torch.Tensor | None:
        """None for the full form: the sorted comparison takes the top-k of the teacher's whole
        softmax. The sampled form reads only the response tokens' log-probabilities, and the
        teacher mass is 1 without logits: no other column."""
        return torch.zeros(0, dtype=torch.long) if loss.form == "sampled" else None

    def full_row_losses(self, rows: Rows, batch: ScoredBatch, loss: LossConfig) -> torch.Tensor:
        require_full_vocabulary(batch.teacher, self.name)
        top_k, weight = self.options.uld_top_k, self.options.uld_weight

        def chunk_losses(sl: slice) -> torch.Tensor:  # (r,): at most (r, V) float32 per side alive
            zs = batch.student.logits[rows.student_pos[sl]]  # (r, V_S)
            zt = batch.teacher.logits[rows.teacher_pos[sl]]  # (r, V_T)
            return weight * sorted_w1(zs, zt, top_k, loss.temperature)

        return chunked(len(rows), loss.chunk_rows, chunk_losses)

    def teacher_mass(self, rows: Rows, batch: ScoredBatch, loss: LossConfig) -> torch.Tensor:
        """1 per row, (R,) float32: the sorted comparison takes the teacher's whole distribution."""
        return torch.ones(len(rows), dtype=torch.float32, device=batch.teacher.logits.device)

    def vocab_reached(self, pair: TokenizerPair) -> float:
        """1.0: every teacher id's probability enters the sorted list (or the tail bucket)."""
        return 1.0
