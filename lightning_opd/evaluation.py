"""Greedy answer accuracy on held-out prompts: OPD validation, and the teacher check after SFT."""

from __future__ import annotations

import math

import torch

from lightning_opd.config import RolloutConfig, ToolsConfig
from lightning_opd.metrics import AnswerAccuracy
from lightning_opd.models import render_prompt
from lightning_opd.output import Heartbeat
from lightning_opd.rollout.tools import reward_texts, sample_responses


@torch.no_grad()
def evaluate_accuracy(model, tokenizer, examples, task, *, max_new_tokens: int, batch_size: int = 256,
                      metric: AnswerAccuracy | None = None, synced_gpus: bool = False,
                      num_batches: int | None = None, tools: ToolsConfig | None = None,
                      progress_every_s: float = 10.0) -> float:  # fmt: skip
    """Greedy answers to `examples`, scored by the task's answer check; returns accuracy.

    The metric's compute() synchronises across ranks. With `synced_gpus` (sharded models) all
    ranks must call generate equally often: pass the same `num_batches` on every rank.
    An evaluation that lasts longer than `progress_every_s` prints a progress line (prompts
    answered, elapsed, ETA) that often (rank 0; 0 = never): a quick one prints nothing.
    """
    metric = metric or AnswerAccuracy()
    rollout_cfg = RolloutConfig(max_new_tokens=max_new_tokens)
    num_batches = num_batches or max(1, math.ceil(len(examples) / batch_size))
    per_batch = max(1, math.ceil(len(examples) / num_batches))
    with Heartbeat("validation", len(examples), every_s=progress_every_s, unit="prompts") as progress:
        for i in range(num_batches):
            chunk = examples[i * per_batch : (i + 1) * per_batch]
            if not chunk and not synced_gpus:
                continue
            chunk = chunk or examples[:1]  # a rank with nothing left still joins the collective
            prompts = [tokenizer(render_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
                       for ex in chunk]  # fmt: skip
            # the tool task is answered with the interpreter
            out = sample_responses(model, tokenizer, prompts, rollout_cfg, tools, greedy=True, synced_gpus=synced_gpus)
            texts = reward_texts(out, tokenizer.batch_decode(out.response_ids, skip_special_tokens=True), tokenizer,
                                 skip_special_tokens=True)  # observations are not the model's answer
            if i * per_batch < len(examples):
                metric.update(texts, chunk)
            progress.done = min(len(examples), (i + 1) * per_batch)
    return float(metric.compute())
