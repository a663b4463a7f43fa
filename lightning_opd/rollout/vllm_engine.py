"""`rollout.engine: vllm` — student sampling with a vLLM engine colocated with the trainer (GPU only).

HF `generate` is the default everywhere and is what the test suite runs. At scale, rollouts are
most of a step (docs/performance.md: 74% of the tiny default's step on CPU), and vLLM's paged
attention and continuous batching make them several times faster on a GPU. This module keeps
the rest of the pipeline unchanged: it returns the same `Rollout` as `generate.generate`.

How (one engine per student model, in this process, sharing the student's GPU):
1. The first call saves the student's config, tokenizer and current weights to a temporary
   directory and starts `vllm.LLM` on it, in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), with
   `gpu_memory_utilization` = `VLLM_GPU_MEMORY_UTILIZATION` (default 0.3: the trainer's own
   model, optimizer state and activations need the rest).
2. Every call first copies the student's current weights into the engine
   (`LLM.apply_model(model.load_weights(...))`, gathering sharded FSDP parameters with
   `full_tensor()`), then resets the prefix cache, which holds keys/values of the old weights.
3. Prompts go in as token ids (each model renders its own chat template upstream); sampling
   uses `rollout.temperature`, `rollout.top_p`, `samples_per_prompt` and `max_new_tokens`, stops
   at the student's EOS, and the response is cut at its first EOS as in `generate.generate`.

Not supported: tool-integrated rollouts (`tools.enabled`), which stop generation at a tool
call; use `rollout.engine: hf` for those. Without the `vllm` package (`pip install
'lightning_opd[vllm]'`) or a CUDA GPU, `require_vllm` raises `VLLMUnavailableError` saying which
is missing, before anything else happens.

What is and is not tested: the checks and the error are (tests/test_vllm_engine.py); the engine
itself needs a GPU and vLLM, which the machines this project is developed on do not have, so the
code below it has not been run.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import torch

from lightning_opd.config import RolloutConfig, ToolsConfig
from lightning_opd.rollout.generate import Rollout

GPU_MEMORY_ENV = "VLLM_GPU_MEMORY_UTILIZATION"


class VLLMUnavailableError(RuntimeError):
    """rollout.engine=vllm on a machine without the vllm package or without a CUDA GPU."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def require_vllm() -> None:
    """Raise VLLMUnavailableError naming everything that is missing for rollout.engine=vllm."""
    missing = []
    if not vllm_installed():
        missing.append("the vllm package is not installed (pip install 'lightning_opd[vllm]')")
    if not cuda_available():
        missing.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if missing:
        raise VLLMUnavailableError(
            "rollout.engine=vllm cannot run here: " + "; ".join(missing) + ". Use rollout.engine=hf."
        )


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter as one tensor: sharded (FSDP2 DTensor) parameters are gathered first."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class ColocatedVLLM:
    """A vLLM engine sampling with the current weights of one student model (module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights copy in memory
        try:
            from vllm import LLM
        except ImportError as err:  # installed but broken (CUDA/driver mismatch, ...)
            raise VLLMUnavailableError(f"rollout.engine=vllm: importing vllm failed ({err}). Use rollout.engine=hf.") from None
        self.directory = tempfile.TemporaryDirectory(prefix="lightning_opd_vllm_")
        state = {name: _full(p).detach().cpu() for name, p in model.state_dict().items()}
        model.save_pretrained(self.directory.name, state_dict=state)
        tokenizer.save_pretrained(self.directory.name)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.llm = LLM(
            model=self.directory.name,
            dtype=dtype,
            gpu_memory_utilization=float(os.environ.get(GPU_MEMORY_ENV, "0.3")),
            max_model_len=int(getattr(model.config, "max_position_embeddings", 4096)),
            enable_prefix_caching=True,
            seed=0,
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the student's current parameters into the engine (every rank gathers its shards)."""
        weights = [(name, _full(p).detach()) for name, p in model.state_dict().items()]
        self.llm.apply_model(lambda engine_model: engine_model.load_weights(weights))
        self.llm.reset_prefix_cache()  # cached keys/values were computed with the old weights

    def generate(self, prompt_ids: list[list[int]], cfg: RolloutConfig, *, eos_id: int,
                 greedy: bool = False) -> Rollout:  # fmt: skip
        from vllm import SamplingParams

        n = 1 if greedy else cfg.samples_per_prompt
        params = SamplingParams(
            n=n, temperature=0.0 if greedy else cfg.temperature, top_p=1.0 if greedy else cfg.top_p,
            max_tokens=cfg.max_new_tokens, stop_token_ids=[eos_id],
        )  # fmt: skip
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        response_ids, ended = [], []
        for request in outputs:  # in prompt order; each holds its n samples
            for sample in request.outputs:
                ids = list(sample.token_ids)
                cut = ids.index(eos_id) if eos_id in ids else None
                response_ids.append(ids[:cut] if cut is not None else ids)
                ended.append(cut is not None)
        response_prompts = [p for p in prompt_ids for _ in range(n)]
        index = [i for i in range(len(prompt_ids)) for _ in range(n)]
        return Rollout(response_prompts, response_ids, ended, index)


_ENGINES: dict[int, ColocatedVLLM] = {}  # id(student model) -> its engine, built on first use


def vllm_sample(model: torch.nn.Module, tokenizer, prompt_ids: list[list[int]], rollout_cfg: RolloutConfig,
                tools_cfg: ToolsConfig | None, *, greedy: bool = False) -> Rollout:  # fmt: skip
    """`sample_responses` for rollout.engine=vllm: check, build the engine once, sync, sample."""
    require_vllm()
    if tools_cfg is not None and tools_cfg.enabled:
        raise ValueError("rollout.engine=vllm does not run tool calls (tools.enabled=true); use rollout.engine=hf")
    engine = _ENGINES.get(id(model))
    if engine is None:
        engine = _ENGINES[id(model)] = ColocatedVLLM(model, tokenizer)
    engine.sync_weights(model)
    return engine.generate(prompt_ids, rollout_cfg, eos_id=tokenizer.eos_token_id, greedy=greedy)
