"""The strategy flags: every config builds its strategy without a GPU and without downloading."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from lightning_opd.config import TinyModelConfig, load
from lightning_opd.models import tiny_model
from lightning_opd.strategy import build_strategy, decoder_layer_classes

ROOT = Path(__file__).resolve().parent.parent
PAPER = ["simct_qwen7b_gemma2b", "simct_qwen7b_phi4mini", "simct_phi4mini_gemma2b"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_validate_and_build_an_fsdp_strategy(name):
    cfg = load(ROOT / "configs" / "experiment" / f"{name}.yaml")
    assert cfg.optim.lr == 5e-7 and cfg.rollout.temperature == 0.6 and cfg.rollout.max_new_tokens == 4096
    assert cfg.data.batch_size * cfg.trainer.devices == 64
    assert cfg.trainer.activation_checkpointing and cfg.trainer.precision.startswith("bf16")
    strategy = build_strategy(cfg)
    assert isinstance(strategy, ModelParallelStrategy)


def test_strategy_flags_map_to_lightning_strategies():
    assert build_strategy(load(overrides=["trainer.strategy=auto"])) == "auto"
    assert isinstance(build_strategy(load(overrides=["trainer.strategy=ddp"])), DDPStrategy)
    with pytest.raises(Exception, match="trainer.strategy"):
        load(overrides=["trainer.strategy=deepspeed"])


@pytest.mark.parametrize("arch,layer", [("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer")])
def test_decoder_layers_are_found_from_no_split_modules(split_tokenizer, arch, layer):
    model = tiny_model(TinyModelConfig(arch=arch, hidden_size=16, num_layers=2, num_heads=2,
                                       intermediate_size=32), split_tokenizer)  # fmt: skip
    assert {c.__name__ for c in decoder_layer_classes(model)} == {layer}
    with pytest.raises(ValueError, match="fsdp_layer_classes"):
        decoder_layer_classes(model, ["NoSuchLayer"])


def test_sod_paper_config_validates_without_downloading():
    cfg = load(ROOT / "configs" / "experiment" / "sod_qwen3.yaml")
    assert (cfg.teacher.path, cfg.student.path) == ("Qwen/Qwen3-4B", "Qwen/Qwen3-0.6B")
    assert cfg.tools.format == "hermes" and cfg.rollout.samples_per_prompt == 16
    assert cfg.optim.lr == 1e-6 and cfg.rollout.max_new_tokens == 20480 and cfg.sod.delta == 0.2
    assert isinstance(build_strategy(cfg), DDPStrategy)
