"""Aligners: how the student's and the teacher's tokens of one response become loss rows."""

from lightning_opd.align import exact  # noqa: F401  (registers "exact")
from lightning_opd.align.base import (
    ALIGNERS,
    Aligner,
    LossSettings,
    Rows,
    ScoredBatch,
    ScoredSide,
    Segments,
    build_aligner,
    register_aligner,
)
from lightning_opd.align.pairing import TokenizerPair, segment_responses

__all__ = [
    "ALIGNERS", "Aligner", "LossSettings", "Rows", "ScoredBatch", "ScoredSide", "Segments",
    "TokenizerPair", "build_aligner", "register_aligner", "segment_responses",
]  # fmt: skip
