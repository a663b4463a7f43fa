"""Build the Lightning strategy from `trainer.strategy` (auto | ddp | fsdp)."""

from __future__ import annotations

from lightning_opd.config import Config


def build_strategy(cfg: Config):
    name = cfg.trainer.strategy
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    raise ValueError(f"trainer.strategy={name!r} is not supported yet (auto | ddp)")
