"""Rollout speed options (`rollout.cache`, `rollout.cpu_threads`): the same tokens as before.

The static KV cache and a one-thread rollout are only ways of computing the same thing, so on
real tiny models (large random weights: free text that depends on its whole context; prompts of
different lengths, so rows are left-padded) they must give the dynamic cache's tokens, greedy and
sampled under one seed, with and without the tool loop; and the config must refuse what cannot run.
"""

from __future__ import annotations

import pytest
import torch

from lightning_opd.config import ConfigError, RolloutConfig, TinyModelConfig, ToolsConfig, load
from lightning_opd.models import tiny_model
from lightning_opd.rollout import generate as gen
from lightning_opd.rollout.tools import sample_responses
from lightning_opd.threads import _OPENMP

PROMPTS = ("12+34=", "What is 7-5? Think.", "9", "Add 123 and 456, then subtract 78.")


def noisy_model(tokenizer, arch: str, seed: int = 0) -> torch.nn.Module:
    cfg = TinyModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model = tiny_model(cfg, tokenizer, seed=seed).eval()
    with torch.no_grad():  # large random weights: every token depends on the context
        for weight in (p for p in model.parameters() if p.dim() > 1):
            weight.normal_(0, 0.3)
    return model


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def rollout_tuple(rollout) -> tuple:
    return (rollout.prompt_ids, rollout.response_ids, rollout.ended_with_eos, rollout.prompt_index,
            rollout.loss_mask, rollout.step_ids)  # fmt: skip


def sampled(fn, seed: int = 0):
    torch.manual_seed(seed)
    return fn()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_static_cache_gives_the_dynamic_cache_tokens(split_tokenizer, arch, greedy) -> None:
    tok = split_tokenizer
    model = noisy_model(tok, arch)
    prompts = prompt_ids(tok)
    assert len({len(p) for p in prompts}) > 1  # rows are left-padded
    outs = {}
    for cache in ("dynamic", "static"):
        cfg = RolloutConfig(max_new_tokens=24, samples_per_prompt=2, cache=cache)
        outs[cache] = sampled(lambda cfg=cfg: gen.generate(model, prompts, cfg, eos_id=tok.eos_token_id,
                                                           pad_id=tok.pad_token_id, greedy=greedy))  # fmt: skip
    assert rollout_tuple(outs["static"]) == rollout_tuple(outs["dynamic"])
    assert sum(len(r) for r in outs["dynamic"].response_ids) > 20  # real text, not all EOS at once
    if not greedy:  # sampling really sampled: the two samples of some prompt differ
        ids = outs["dynamic"].response_ids
        assert any(ids[2 * i] != ids[2 * i + 1] for i in range(len(prompts)))


def test_cache_kwargs_name_the_cache() -> None:
    assert gen.cache_kwargs(RolloutConfig()) == {}
    assert gen.cache_kwargs(RolloutConfig(cache="static")) == {"cache_implementation": "static"}


class ThreadSpy:
    """Wraps a model and records torch's thread count whenever generate runs."""

    def __init__(self, model) -> None:
        self.model, self.seen = model, []

    training = property(lambda self: self.model.training)

    def parameters(self):
        return self.model.parameters()

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def generate(self, **kwargs):
        self.seen.append(torch.get_num_threads())
        return self.model.generate(**kwargs)


@pytest.fixture
def two_threads():
    """torch at 2 intra-op threads for the test (the suite runs with OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    if torch.get_num_threads() != 2:
        pytest.skip("this torch cannot change its thread count")
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(not _OPENMP, reason="the thread count is only changed under OpenMP")
@pytest.mark.parametrize("tools", [False, True], ids=["plain", "tool_loop"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_one_rollout_thread_gives_the_same_tokens_and_restores_the_count(split_tokenizer, two_threads, tools,
                                                                          greedy) -> None:
    """sample_responses with cpu_threads=1 (the default) against 0 (torch's 2 threads): the same
    rollout, generate saw 1 thread, and 2 are back afterwards. The tool loop runs its turns (a
    noisy model writes no call, so no sandbox is needed) under the same setting."""
    tok = split_tokenizer
    model = noisy_model(tok, "llama", seed=1)
    tools_cfg = ToolsConfig(enabled=tools)
    outs, seen = {}, {}
    for threads in (1, 0):
        spy = ThreadSpy(model)
        cfg = RolloutConfig(max_new_tokens=24, samples_per_prompt=2, cpu_threads=threads)
        outs[threads] = sampled(lambda cfg=cfg, spy=spy: sample_responses(spy, tok, prompt_ids(tok), cfg, tools_cfg,
                                                                          greedy=greedy))  # fmt: skip
        seen[threads] = set(spy.seen)
        assert torch.get_num_threads() == 2
    assert rollout_tuple(outs[1]) == rollout_tuple(outs[0])
    assert seen == {1: {1}, 0: {2}}
    assert (outs[1].loss_mask is not None) == tools


@pytest.mark.skipif(not _OPENMP, reason="the thread count is only changed under OpenMP")
def test_thread_count_is_restored_when_generation_fails(split_tokenizer, two_threads) -> None:
    class Failing(ThreadSpy):
        def generate(self, **kwargs):
            self.seen.append(torch.get_num_threads())
            raise RuntimeError("boom")

    spy = Failing(noisy_model(split_tokenizer, "llama"))
    with pytest.raises(RuntimeError, match="boom"):
        sample_responses(spy, split_tokenizer, prompt_ids(split_tokenizer), RolloutConfig(cpu_threads=1), None)
    assert spy.seen == [1] and torch.get_num_threads() == 2


def test_rollout_threads_leave_other_devices_alone(two_threads) -> None:
    meta = torch.nn.Linear(2, 2, device="meta")  # not a CPU model: nothing to change
    with gen.rollout_threads(RolloutConfig(cpu_threads=1), meta):
        assert torch.get_num_threads() == 2
    with gen.rollout_threads(RolloutConfig(cpu_threads=0), torch.nn.Linear(2, 2)):
        assert torch.get_num_threads() == 2


# --- config ------------------------------------------------------------------------------------


def test_rollout_speed_defaults() -> None:
    cfg = load()
    assert cfg.rollout.cache == "dynamic" and cfg.rollout.cpu_threads == 1
    assert load(overrides=["rollout.cache=static", "rollout.cpu_threads=0"]).rollout.cache == "static"


@pytest.mark.parametrize("overrides, message", [
    (["rollout.cache=paged"], "rollout.cache='paged' is not one of"),
    (["rollout.cpu_threads=-1"], "rollout.cpu_threads must be >= 0"),
    (["rollout.cache=static", "tools.enabled=true"], "rollout.cache=static does not run tool calls"),
])  # fmt: skip
def test_rollout_speed_settings_are_validated(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load(overrides=overrides)
