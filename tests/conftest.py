"""Shared fixtures: tiny tokenizers trained on the spot, and tiny models sized to them."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_opd.config import TinyModelConfig, TokenizerConfig
from lightning_opd.models import tiny_model, train_tokenizer

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py imported as a module (the scripts folder is not a package), so tests
    can call its functions without running its main."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arithmetic_corpus(n: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        texts += [f"What is {a}+{b}?", f"{a % 10}+{b % 10}={a % 10 + b % 10} #### {a + b}"]
    return texts


@pytest.fixture(scope="session")
def split_tokenizer():
    """Byte-level BPE that puts every digit in its own token (like Llama-3 / Qwen)."""
    tok = train_tokenizer(arithmetic_corpus(), TokenizerConfig(digits="split"), teacher=False)
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def merge_tokenizer():
    """Byte-level BPE that merges digit runs (like GPT-2)."""
    tok = train_tokenizer(arithmetic_corpus(), TokenizerConfig(digits="merge"), teacher=True)
    tok.padding_side = "left"
    return tok


@pytest.fixture
def tiny_llama():
    def build(tokenizer, seed: int = 0, **kw):
        cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, **kw)
        return tiny_model(cfg, tokenizer, seed=seed)

    return build


@pytest.fixture(autouse=True)
def _restore_torch_state():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
