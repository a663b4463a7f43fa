"""`exact`: shared-vocabulary OPD, the baseline that SimCT improves on (DESIGN §3.3).

Rows exist only at shared-token positions: segments with one student token s_k and one
teacher token t_l covering the same bytes (a 1:1 match with nothing unmatched before it).
Each row compares z^S_k[V∩_S] with z^T_l[V∩_T], the two models' logits restricted to the shared
vocabulary. Every token inside a span (where the tokenizations disagree) is discarded.
With identical tokenizers every token is a shared-token position and V∩ = V, so this is
ordinary full-vocabulary OPD.
"""

from __future__ import annotations

from lightning_opd.align.base import (
    Aligner,
    BatchSegments,
    Rows,
    ScoredBatch,
    register_aligner,
    rows_from_segments,
)


@register_aligner("exact")
class ExactAligner(Aligner):
    def build_rows(self, seg: BatchSegments, batch: ScoredBatch) -> Rows:
        return rows_from_segments(seg.select(seg.is_shared_token))
