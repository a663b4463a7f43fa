"""Aligners: how the student's and the teacher's tokens of one response become loss rows.

Every module in this package is imported here, so an aligner registers itself just by being a
file with `@register_aligner("name")`: nothing else changes to add one.
"""

import importlib
import pkgutil

from lightning_opd.align.base import (
    ALIGNERS,
    Aligner,
    BatchSegments,
    Rows,
    ScoredBatch,
    ScoredSide,
    build_aligner,
    register_aligner,
)
from lightning_opd.align.pairing import AlignedBatch, TokenizerPair, align_batch, segment_responses
from lightning_opd.config import REGISTRY_CHECKS, Config, ConfigError

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def _check_aligner_name(cfg: Config) -> None:
    names = sorted(ALIGNERS)
    if cfg.aligner.name not in names:
        raise ConfigError(f"aligner.name={cfg.aligner.name!r} is not registered; choose from {names}")


REGISTRY_CHECKS.append(_check_aligner_name)  # `config.validate` runs it

__all__ = [
    "ALIGNERS", "AlignedBatch", "Aligner", "BatchSegments", "Rows", "ScoredBatch", "ScoredSide",
    "TokenizerPair", "align_batch", "build_aligner", "register_aligner", "segment_responses",
]  # fmt: skip
