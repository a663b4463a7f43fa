"""`simct`: Simple Cross-Tokenizer OPD (Sun, Zheng, Song et al., 2026), and `simct_1to1`.

Notation (as in the paper): a response is cut into *segments* (offsets.py): student tokens
s_c … s_{d-1} and teacher tokens t_a … t_{b-1} covering the same bytes, closed by a 1:1 match
(the last token of each side has the same byte span; EOS with EOS). z^S_k are the student's
logits predicting s_k, z^T_l the teacher's predicting t_l, and V∩ the shared vocabulary
(pairs of ids with equal canonical bytes, EOS with EOS).

The unit is the segment: SimCT keeps one row per segment, where `exact` keeps one row per 1:1
match (the pair that closes a segment) and discards every other token of a span. The support
of a row is V∩ plus one slot for the segment's own span, U = |V∩| + 1:

    student row   [ z^S_c[V∩_S] , ū^S ]      ū^S = 1/(d-c) Σ_{k=c}^{d-1} z^S_k[s_k]
    teacher row   [ z^T_a[V∩_T] , ū^T ]      ū^T = 1/(b-a) Σ_{l=a}^{b-1} z^T_l[t_l]

The V∩ logits come from the segment's FIRST position (the span is one virtual token competing
with the shared tokens there); the span slot is the mean of the raw logits of the span's
sampled tokens (after the softmax, a geometric mean of per-token scores, so a span's weight
does not decay with its length). On a shared-token row the slot is -inf on both sides, which
makes the row exactly the `exact` row. The loss is the full-form divergence over the U slots,

    ℓ_g = Σ_u p_S(u) [log p_S(u) − log p_T(u)],   p = softmax(row / τ)   (reverse KL by default)

summed over rows and divided by the number of student response tokens (losses.reduce_rows).
In the sampled form (base class) a segment is one unit: its advantage is
Σ_l log π_T(t_l) − Σ_k log π_S(s_k), from the rows' member tokens.

Following the released code (kdflow/algorithms/span_ctkd.py, loss/reverse_kl_div.py):
- the row holds one slot per span of the *sequence*, every slot but the segment's own set to
  -1e9 on both sides. Those slots carry exactly zero mass in float32, so one slot is the same
  loss at a fraction of the width;
- the temperature divides the whole row, span slot included, after the slot is built: the slot
  is mean(z_k[s_k]) / τ, which is what we compute (full_divergence divides by τ).
Where we follow DESIGN instead: segments come from byte spans of canonical bytes (the released
code decodes token by token and compares strings) and V∩ from canonical bytes (it compares
vocabulary strings with Ġ→▁); the reduction over rows is the module's (losses.reduce_rows).
Ours, an ablation: `span_logit: mean_logprob` puts the length-normalised log-probability
m = mean_k log softmax(z_k/τ)[s_k] in the slot, and then (a choice of ours, beyond DESIGN's
one line) the V∩ part must be on the same scale: the row is [log softmax(z_c/τ)[V∩], m]. Raw
logits next to a log-probability would leave the slot ~e^-lse(z_c) of the mass, i.e. no
signal. Shifting the V∩ part by its log-normaliser is invisible to shared-token rows (softmax
is shift-invariant), so those rows stay the exact rows. Both parts are stored times τ, because
full_divergence divides the row by τ.

`simct_1to1` (the released span_ctkd_1to1 ablation): rows at SimCT's 1:1 matches only, over V∩.
This is now `exact` (exact.py), whose rows are every 1:1 match, the one that closes a span
included (the "+" of [1 2 +]|[12 +]); `SimCT1to1Aligner` subclasses `ExactAligner` and stays
registered under its name for old configs. (Before, `exact` kept only segments that are a single
match, and simct_1to1 was the wider of the two.) With identical tokenizers both are plain OPD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_opd import losses
from lightning_opd.align.base import (
    Aligner,
    BatchSegments,
    Rows,
    ScoredBatch,
    ScoredSide,
    chunked,
    register_aligner,
    rows_from_segments,
    shared_vocab_divergence,
    shared_vocab_logits,
    shared_vocab_mass,
)
from lightning_opd.align.exact import ExactAligner
from lightning_opd.config import LossConfig

if TYPE_CHECKING:
    from lightning_opd.align.pairing import TokenizerPair
    from lightning_opd.align.vocab import SharedVocab


def span_slot(side: ScoredSide, members: torch.Tensor, member_row: torch.Tensor,
              is_span: torch.Tensor, span_logit: str, temperature: float,
              chunk_rows: int) -> torch.Tensor:  # fmt: skip
    """The span slot of every row, (R,) float32: the mean over the row's member tokens of the
    raw logit of the sampled token (`mean_logit`) or of τ·log softmax(z/τ) there
    (`mean_logprob`); -inf on rows that are not spans."""
    device = side.logits.device
    is_span = is_span.to(device)
    member_row = member_row.to(device)
    in_span = is_span[member_row]  # (M,) only span members are needed
    pos, row = members.to(device)[in_span], member_row[in_span]  # (Ms,)
    if span_logit == "mean_logit":
        # two index tensors pick one logit per member: (Ms,), no (Ms, V) copy
        values = side.logits[pos, side.column(side.ids[pos])].float()
    else:  # (chunk, V) float32 at a time for the logsumexp (a restricted side has it stored)
        values = chunked(
            len(pos), chunk_rows, lambda sl: temperature * side.token_logprobs(pos[sl], temperature)
        )  # fmt: skip
    n_rows = len(is_span)
    sums = torch.zeros(n_rows, dtype=torch.float32, device=device).index_add(0, row, values)
    counts = torch.bincount(row, minlength=n_rows).clamp_min(1)  # (R,)
    return torch.where(is_span, sums / counts, float("-inf"))  # (R,)


def log_normaliser(side: ScoredSide, positions: torch.Tensor, temperature: float) -> torch.Tensor:
    """logsumexp(z_p / τ) over the full vocabulary at each position, (r, 1) float32."""
    return side.log_normaliser(positions, temperature)[:, None]


@register_aligner("simct")
class SimCTAligner(Aligner):
    """One row per segment over V∩ plus the segment's span slot (module docstring).

    Teacher mass: V∩'s share, plus on a span row the probability of the teacher's anchor token
    t_a when it is outside V∩ (the span slot stands for it), capped at 1 (`teacher_mass`)."""

    @property
    def span_logit(self) -> str:  # mean_logit | mean_logprob (checked by config.validate)
        return self.options.span_logit

    def build_rows(self, seg: BatchSegments, batch: ScoredBatch | None = None) -> Rows:
        return rows_from_segments(seg)  # every segment, anchored at its first tokens

    def teacher_columns(self, vocab: SharedVocab, loss: LossConfig) -> torch.Tensor | None:
        """V∩_T: the rows' V∩ part and `teacher_mass` read V∩ at the anchors; the span slot reads
        the span tokens' own logits (response tokens, always kept) and, for `mean_logprob`, the
        full-vocabulary normaliser (always computed). None with identical tokenizers (V∩ = V)."""
        return None if vocab.identity else vocab.teacher_ids

    def span_slots(self, rows: Rows, batch: ScoredBatch,
                   loss: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(ū^S, ū^T), each (R,) float32; the teacher's detached."""
        is_span = rows.is_span  # (R,)
        args = (self.span_logit, loss.temperature, loss.chunk_rows)
        student = span_slot(batch.student, rows.s_members, rows.s_member_row, is_span, *args)
        with torch.no_grad():
            teacher = span_slot(batch.teacher, rows.t_members, rows.t_member_row, is_span, *args)
        return student, teacher

    def full_row_losses(
        self, rows: Rows, batch: ScoredBatch, loss: LossConfig
    ) -> torch.Tensor:
        student_slot, teacher_slot = self.span_slots(rows, batch, loss)  # (R,) each
        tau = loss.temperature
        if self.span_logit == "mean_logit":  # the rows [z[V∩], ū], gathered a few at a time
            return shared_vocab_divergence(rows, batch, loss, student_slot, teacher_slot)

        def chunk_loss(sl: slice) -> torch.Tensor:
            zs, zt = shared_vocab_logits(rows, batch, sl)  # (r, |V∩|) each
            zs, zt = zs.float(), zt.float()  # float32 rows: full_divergence would copy anyway
            if self.span_logit == "mean_logprob":  # the whole row on the log-probability scale
                zs = zs - tau * log_normaliser(batch.student, rows.student_pos[sl], tau)
                zt = zt - tau * log_normaliser(batch.teacher, rows.teacher_pos[sl], tau)
            zs = torch.cat([zs, student_slot[sl, None]], dim=1)  # (r, U)
            zt = torch.cat([zt, teacher_slot[sl, None]], dim=1)  # (r, U)
            return losses.full_divergence(
                zs, zt, divergence=loss.divergence, beta=loss.beta, temperature=tau
            )

        return chunked(len(rows), loss.chunk_rows, chunk_loss)

    def teacher_mass(self, rows: Rows, batch: ScoredBatch, loss: LossConfig) -> torch.Tensor:
        """(R,) float32, no grad: Σ_{V∩} q at the anchor, plus on span rows q(t_a), the teacher's
        probability of its anchor token t_a = ids[teacher_pos] when t_a ∉ V∩ (the slot stands
        for the span that starts with it; t_a ∈ V∩ is already counted), capped at 1."""
        mass = shared_vocab_mass(rows, batch, loss)  # (R,)
        if batch.vocab.identity:  # V∩ is the whole vocabulary: nothing is left for the slot
            return mass
        teacher = batch.teacher
        span_rows = torch.nonzero(rows.is_span.to(mass.device)).flatten()  # (Rs,)
        anchor_pos = rows.teacher_pos.to(mass.device)[span_rows]  # (Rs,)
        anchor_ids = teacher.ids[anchor_pos]  # (Rs,) t_a
        outside = ~torch.isin(anchor_ids, batch.vocab.teacher_ids.to(mass.device))  # (Rs,) only these add mass
        span_rows, anchor_pos = span_rows[outside], anchor_pos[outside]
        tau = loss.temperature
        with torch.no_grad():  # log q(t_a) from (chunk, V_T) float32 at a time (restricted: stored)
            anchor_lp = chunked(
                len(anchor_pos), loss.chunk_rows, lambda sl: teacher.token_logprobs(anchor_pos[sl], tau)
            )  # fmt: skip
        return mass.index_add(0, span_rows, anchor_lp.float().exp()).clamp(max=1.0)

    def vocab_reached(self, pair: TokenizerPair) -> float | None:
        """|V∩| / |V_T|, as the base: the span slot reaches only the span that was sampled, not
        the teacher's other ids outside V∩."""
        return super().vocab_reached(pair)


@register_aligner("simct_1to1")
class SimCT1to1Aligner(ExactAligner):
    """Rows at SimCT's 1:1 matches only, over V∩: the same rows and loss as `exact`, whose row
    builder it inherits (module docstring); the name is kept for old configs."""
