"""Supervised fine-tuning on a task's reference solutions.

Used to prepare the embedded default: the teacher is trained by SFT until it solves the task
(cached, see prepare.py), and the student gets a short SFT warm start so that on-policy
distillation begins from a weak but non-random policy, as in the papers. This is a plain
PyTorch loop (not Lightning): it runs once, before training, on one process.
"""

from __future__ import annotations

import time

import torch

from lightning_opd.config import SFTConfig
from lightning_opd.models import render_prompt
from lightning_opd.output import ProgressLines
from lightning_opd.schedule import warmup_cosine


def endless_examples(task, start: int = 0):
    """The task's training examples from `start` on, cycling over a finite file."""
    while True:
        count = 0
        for example in task.stream(shard=0, num_shards=1, start=start):
            count += 1
            yield example
        if count == 0 and start == 0:
            raise ValueError("the task has no training examples")
        start = 0


def sft_batch(tokenizer, examples, device, observation_spans=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) with the loss on solution + EOS tokens only.

    `observation_spans(solution) -> [(start, end), ...]` (tool tasks) marks character spans of
    tool output: tokens overlapping them are inputs, not targets (the model must not learn to
    invent tool output).
    """
    seqs, label_seqs = [], []
    for ex in examples:
        prompt = tokenizer(render_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
        enc = tokenizer(ex.solution, add_special_tokens=False, return_offsets_mapping=observation_spans is not None)
        answer = enc["input_ids"] + [tokenizer.eos_token_id]
        labels = list(answer)
        if observation_spans is not None:
            spans = observation_spans(ex.solution)
            for i, (a, b) in enumerate(enc["offset_mapping"]):
                if any(a < end and b > start for start, end in spans):
                    labels[i] = -100
        seqs.append(prompt + answer)
        label_seqs.append([-100] * len(prompt) + labels)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, label_seqs, strict=False)):
        ids[i, : len(s)], labels[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(lab), 1
    return ids.to(device), mask.to(device), labels.to(device)


def supervised_finetune(model, tokenizer, task, cfg: SFTConfig, *, log_every: int = 100,
                        log_every_s: float = 30.0) -> dict:  # fmt: skip
    """Train `model` for cfg.steps on task examples drawn from a stream of seed cfg.seed.

    Prints a progress line ("  sft step k/N  loss L  elapsed h:mm:ss  ETA h:mm:ss") every
    `log_every` steps and whenever `log_every_s` seconds passed since the last one (slow steps of
    a large model); 0 turns either off."""
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.steps, warmup, 0.05))
    stream = endless_examples(task, start=cfg.seed * 10_000_000)
    start, loss_value = time.time(), float("nan")
    progress = ProgressLines("sft step", cfg.steps, every_n=log_every, every_s=log_every_s, indent="  ")
    for step in range(cfg.steps):
        examples = [next(stream) for _ in range(cfg.batch_size)]
        ids, mask, labels = sft_batch(tokenizer, examples, device, getattr(task, "observation_spans", None))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        progress.update(step + 1, extra=f"loss {loss_value:.4f}")
    return {"sft_steps": cfg.steps, "sft_final_loss": loss_value, "sft_seconds": time.time() - start}
