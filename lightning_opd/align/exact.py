"""`exact`: shared-vocabulary OPD, the baseline that SimCT improves on (DESIGN §3.3).

Rows exist at every shared-token position: every 1:1 match, a student token s_k and a teacher
token t_l with the same non-empty byte span in the response text (the same bytes starting at the
same offset), and EOS with EOS. Each row compares z^S_k[V∩_S] with z^T_l[V∩_T], the two models'
logits restricted to the shared vocabulary, and covers those two tokens only. Every token inside
a span (where the tokenizations disagree) is discarded; the match that closes a span is not: in
[1 2 +]|[12 +] the "+" is a row (an earlier version kept only segments that are a single match
and dropped it, which covered 0.41 of Qwen2.5's tokens against GPT-2 on GSM8K answers instead
of 0.58, docs/coverage.md). A shared-token baseline should supervise every position where the two
sides hold the same token: the narrower one handicaps it.

The matches are read off the segments (offsets.py): each 1:1 match closes one, as its last token
on both sides, under `boundary: match` and `boundary: offset` alike, and
`BatchSegments.closes_on_match` tells those closures apart from the ones an observation edge or a
common byte boundary makes between tokens that start apart (see `base.one_to_one_rows`). Segments
marked invalid (broken UTF-8, tool observations, text the teacher rewrote) are dropped before, so
their closing match is not a row either.

`simct_1to1` (simct.py, the released span_ctkd_1to1 ablation: SimCT's 1:1 matches, over V∩) is
the same rows, a subclass of this one kept under its own name for old configs. With identical
tokenizers every token is a shared-token position and V∩ = V, so this is ordinary
full-vocabulary OPD.
"""

from __future__ import annotations

import torch

from lightning_opd.align.base import (
    Aligner,
    BatchSegments,
    Rows,
    ScoredBatch,
    one_to_one_rows,
    register_aligner,
)
from lightning_opd.align.vocab import SharedVocab
from lightning_opd.config import LossConfig


@register_aligner("exact")
class ExactAligner(Aligner):
    """One row per 1:1 match (module docstring), compared over V∩ by the base class's full form."""

    def build_rows(self, seg: BatchSegments, batch: ScoredBatch | None = None) -> Rows:
        """Rows at the closing pair (s_hi-1, t_hi-1) of every segment that closes on a 1:1
        match: R ≤ G rows, each with one member token per side."""
        return one_to_one_rows(seg)

    def teacher_columns(self, vocab: SharedVocab, loss: LossConfig) -> torch.Tensor | None:
        """V∩_T: the full form and `teacher_mass` read the teacher's V∩ logits at the anchors, the
        sampled form (and SOD) the response tokens' own log-probabilities, which the scorer
        always keeps with the full-vocabulary normaliser. None with identical tokenizers, where
        V∩ is the whole vocabulary."""
        return None if vocab.identity else vocab.teacher_ids
