"""`rollout.engine: vllm` is a config choice that fails early and clearly where it cannot run.

The engine itself needs vLLM and a CUDA GPU; these tests check the choice, the checks and the
messages, with the two probes (`vllm_installed`, `cuda_available`) set either way."""

from __future__ import annotations

import pytest

from lightning_opd.config import ConfigError, RolloutConfig, ToolsConfig, load
from lightning_opd.rollout import vllm_engine
from lightning_opd.rollout.tools import sample_responses
from lightning_opd.rollout.vllm_engine import VLLMUnavailableError, require_vllm


def probes(monkeypatch, *, installed: bool, cuda: bool) -> None:
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: installed)
    monkeypatch.setattr(vllm_engine, "cuda_available", lambda: cuda)


def test_rollout_engine_accepts_hf_and_vllm_only():
    assert load(overrides=["rollout.engine=vllm"]).rollout.engine == "vllm"
    assert load().rollout.engine == "hf"
    with pytest.raises(ConfigError, match="rollout.engine"):
        load(overrides=["rollout.engine=sglang"])


@pytest.mark.parametrize(
    ("installed", "cuda", "says"),
    [
        (False, False, ["vllm package is not installed", "lightning_opd[vllm]", "no CUDA GPU"]),
        (False, True, ["vllm package is not installed", "lightning_opd[vllm]"]),
        (True, False, ["no CUDA GPU"]),
    ],
)
def test_missing_vllm_or_gpu_names_what_is_missing_and_the_way_out(monkeypatch, installed, cuda, says):
    probes(monkeypatch, installed=installed, cuda=cuda)
    with pytest.raises(VLLMUnavailableError) as err:
        require_vllm()
    message = str(err.value)
    assert message.startswith("rollout.engine=vllm cannot run here")
    assert message.endswith("Use rollout.engine=hf.")
    for part in says:
        assert part in message
    if installed:
        assert "not installed" not in message
    if cuda:
        assert "CUDA" not in message


def test_nothing_is_missing_when_both_are_there(monkeypatch):
    probes(monkeypatch, installed=True, cuda=True)
    require_vllm()  # no error


def test_sample_responses_with_vllm_fails_before_generating(monkeypatch):
    probes(monkeypatch, installed=False, cuda=False)

    class NoModel:  # generation would touch the model; the check must come first
        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name}) before the check")

    class Tok:
        eos_token_id, pad_token_id = 0, 0

    with pytest.raises(VLLMUnavailableError, match="rollout.engine=hf"):
        sample_responses(NoModel(), Tok(), [[1, 2]], RolloutConfig(engine="vllm"), None)


def test_vllm_with_tool_calls_is_refused(monkeypatch):
    probes(monkeypatch, installed=True, cuda=True)
    with pytest.raises(ValueError, match="tool calls"):
        vllm_engine.vllm_sample(object(), object(), [[1]], RolloutConfig(engine="vllm"), ToolsConfig(enabled=True))
