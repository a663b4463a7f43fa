"""`random_span`: SimCT with coarser units, an ablation (DESIGN §3.3).

SimCT compares a span as one virtual token: V∩ logits at its first position plus one slot for
the mean logit of its tokens. This aligner asks what that approximation costs where no span is
needed: it takes SimCT's segments and merges a fraction `ratio` of the shared-token segments
into spans at random, then scores the result exactly like `simct` (same rows, same loss).

Merging: a chosen shared-token segment g is joined with the segment g+1 that follows it in the
same sequence (contiguous on both sides: nothing unsupervised between them), forming a longer
span; when g+1 is chosen too, the chain keeps growing, so a run of chosen segments closes at
the first segment that is not chosen (its "anchor", which may itself be a span). Only segments
with such a successor can be merged, so `ratio` is the fraction of those that is chosen:
round(ratio · n) of them, drawn uniformly without replacement.

The draw uses a `torch.Generator` seeded with the run's seed (`trainer.seed`) and advanced by every
call, so a run is reproducible and successive batches get different merges. Merging only
regroups tokens, so coverage is unchanged; ratio = 0 is `simct` exactly. Its rows are SimCT
rows, so it inherits SimCT's `teacher_mass` (V∩ plus the span anchor's probability).

Compared with the released ablation (kdflow/algorithms/simple_ctkd_random_span.py): it merges
the 1:1 positions of simple_ctkd (dropping the tokens between them, which belong to no row) and
uses Python's `random`; here the merges start from SimCT's segments, real spans included, so
ratio = 0 is SimCT rather than exact matching, and every merged unit covers contiguous text.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lightning_opd.align.base import (
    BatchSegments,
    Rows,
    ScoredBatch,
    register_aligner,
    rows_from_segments,
)
from lightning_opd.align.simct import SimCTAligner
from lightning_opd.config import AlignerConfig


def merge_into_spans(seg: BatchSegments, ratio: float, generator: torch.Generator) -> BatchSegments:
    """Join round(ratio · n) randomly chosen mergeable shared-token segments with their successor."""
    n_segments = len(seg.seq)
    if n_segments == 0 or ratio <= 0:
        return seg
    # g can merge with g+1: same sequence and contiguous on both sides, (G-1,)
    has_successor = (
        (seg.seq[1:] == seg.seq[:-1])
        & (seg.s_lo[1:] == seg.s_hi[:-1])
        & (seg.t_lo[1:] == seg.t_hi[:-1])
    )
    candidates = torch.nonzero(seg.is_shared_token[:-1] & has_successor).flatten()  # (n,)
    n_chosen = min(round(ratio * len(candidates)), len(candidates))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:n_chosen]]
    joins_next = torch.zeros(n_segments, dtype=torch.bool)
    joins_next[chosen] = True
    # a merged unit starts wherever the previous segment does not join its successor
    starts = torch.ones(n_segments, dtype=torch.bool)
    starts[1:] = ~joins_next[:-1]
    first = torch.nonzero(starts).flatten()  # (G',) first segment of each unit
    last = torch.cat([first[1:] - 1, torch.tensor([n_segments - 1])])  # (G',) its last segment
    # a unit closes where its last segment does, on that segment's closing pair
    return replace(seg, seq=seg.seq[first], s_lo=seg.s_lo[first], s_hi=seg.s_hi[last],
                   t_lo=seg.t_lo[first], t_hi=seg.t_hi[last],
                   closes_on_match=seg.closes_on_match[last])  # fmt: skip


@register_aligner("random_span")
class RandomSpanAligner(SimCTAligner):
    """SimCT rows after merging a fraction `ratio` of shared-token segments into spans."""

    def __init__(self, options: AlignerConfig, seed: int = 0) -> None:
        super().__init__(options, seed)
        self.ratio = options.ratio  # in [0, 1], checked by config.validate
        self.generator = torch.Generator().manual_seed(seed)

    def build_rows(self, seg: BatchSegments, batch: ScoredBatch | None = None) -> Rows:
        return rows_from_segments(merge_into_spans(seg, self.ratio, self.generator))
