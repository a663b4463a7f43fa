"""Student rollouts with Hugging Face `generate`, and the forward passes that score them.

Prompts are rendered with the model's own chat template and left-padded, so every response
starts at the same column; `generate` samples with a KV cache until EOS or `max_new_tokens`.
Which cache (`rollout.cache`: dynamic or static) and how many CPU threads decode
(`rollout.cpu_threads`, `rollout_threads`) change the speed, not the tokens.
A response is cut after its first EOS; the masks tell prompt, response and padding apart.

Scoring lays each sequence out as [left padding | prompt | response | right padding], with
position ids counted from the first real token, and keeps logits only at the positions that
predict response tokens (never the prompt's): `response_logits` returns them packed (N, V).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lightning_opd.config import RolloutConfig
from lightning_opd.threads import cpu_threads

if TYPE_CHECKING:
    from lightning_opd.align.columns import ColumnHead


@dataclass
class Rollout:
    """Sampled responses of a batch: each prompt answered `samples_per_prompt` times, one entry
    per response in every list."""

    prompt_ids: list[list[int]]  # rendered prompt tokens of each response's prompt
    response_ids: list[list[int]]  # sampled tokens, EOS excluded
    ended_with_eos: list[bool]
    prompt_index: list[int]  # which input prompt each response answers
    # tool-integrated rollouts (rollout/tools.py) also fill these, aligned with response_ids:
    loss_mask: list[list[int]] | None = None  # 1 = model-generated token, 0 = observation/template
    step_ids: list[list[int]] | None = None  # SOD step of each token (0, 1, ...); -1 for masked tokens
    tool_calls: list[int] | None = None  # tool calls made per response
    tool_successes: list[int] | None = None  # of which ran with ok=True

    @property
    def response_lengths(self) -> list[int]:  # EOS included where generated
        return [len(r) + int(e) for r, e in zip(self.response_ids, self.ended_with_eos, strict=False)]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids, mask



@contextlib.contextmanager
def rollout_threads(cfg: RolloutConfig, model: torch.nn.Module):
    """torch's intra-op threads set to `cfg.cpu_threads` while a model on the CPU generates, and
    restored afterwards (0, a model on another device, or a torch without OpenMP: unchanged).

    Decoding is one forward pass per token over a handful of rows; each op is microseconds of
    work, and where the cores are shared every parallel region waits a scheduler slice for its
    other threads. Measured on 2 busy cores (docs/performance.md, "Rollout: KV cache and
    threads"): the tiny default's untrained student answering 64 prompts took 0.7-1.1 s with
    one thread and 4.9-24 s with two, the same tokens."""
    with cpu_threads(cfg.cpu_threads, _device(model)):
        yield


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def cache_kwargs(cfg: RolloutConfig) -> dict:
    """HF `generate` arguments of `rollout.cache`: none for the dynamic cache (HF's default),
    `cache_implementation="static"` for a cache preallocated to prompt + max_new_tokens."""
    return {} if cfg.cache == "dynamic" else {"cache_implementation": cfg.cache}


def sampling_kwargs(cfg: RolloutConfig, greedy: bool) -> dict:
    """HF `generate` arguments of the decoding rule: argmax, or sampling at cfg's temperature
    and top-p with no top-k cut. `rollout.temperature: 0` means argmax, as in vLLM (HF's sampler
    would refuse a zero temperature mid-step)."""
    if greedy or cfg.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    cfg: RolloutConfig,
    *,
    eos_id: int,
    pad_id: int,
    greedy: bool = False,
    synced_gpus: bool = False,
) -> Rollout:
    """Sample `cfg.samples_per_prompt` responses per prompt (greedy: one, argmax).

    The model is put in eval mode for sampling and returned to its previous mode afterwards.
    `cfg.cache` picks the KV cache (`cache_kwargs`); the thread count is the caller's
    (`tools.sample_responses` wraps every rollout in `rollout_threads`).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, pad_id)
    n = 1 if greedy else cfg.samples_per_prompt
    try:
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=n,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            use_cache=True,
            synced_gpus=synced_gpus,
            **cache_kwargs(cfg),
            **sampling_kwargs(cfg, greedy),
        )
    finally:
        model.train(was_training)
    responses = out[:, ids.shape[1] :].tolist()
    response_prompts = [p for p in prompt_ids for _ in range(n)]
    response_ids, ended = [], []
    for r in responses:
        cut = r.index(eos_id) if eos_id in r else None
        response_ids.append(r[:cut] if cut is not None else r)
        ended.append(cut is not None)
    index = [i for i in range(len(prompt_ids)) for _ in range(n)]
    return Rollout(response_prompts, response_ids, ended, index)


def response_logits(
    model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
    head: ColumnHead | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits predicting each response token, packed over the batch.

    prompts, responses: B lists of ids (responses include EOS where there is one).
    Returns (logits (N, V), ids (N,), offsets (B+1,)), N = total response tokens; sequence b
    owns packed positions offsets[b]:offsets[b+1]. Empty responses own no position.
    head: restricted scoring (align/columns.py): the LM head computes only `head.columns`, and
    the logits returned are (N, C), with the full-vocabulary normaliser left on `head`.
    """
    device = next(model.parameters()).device
    p_ids, p_mask = left_pad(prompts, pad_id)  # (B, P)
    width = max((len(r) for r in responses), default=0)
    r_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    r_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, r in enumerate(responses):
        r_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        r_mask[i, : len(r)] = 1
    ids = torch.cat([p_ids, r_ids], 1).to(device)  # (B, P+R)
    mask = torch.cat([p_mask, r_mask], 1).to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    # positions P-1 .. P+R-2 predict the response tokens: the last R+1 columns minus the final one
    keep = r_mask.bool().to(device)
    with head.installed(model, keep) if head is not None else contextlib.nullcontext():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=width + 1,
                    use_cache=False)  # scoring needs no KV cache; with one, a layer recomputed by activation checkpointing appends to it twice and backward fails
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    if head is not None and head.logits is not None:  # the head's hook ran: (N, C) already packed
        return head.logits, r_ids.to(device)[keep], offsets
    logits = out.logits[:, :-1]  # (B, R, V)
    return logits[keep], r_ids.to(device)[keep], offsets
