"""OPDModule: one on-policy distillation step = rollout -> score -> align -> loss.

1. rollout: the student samples responses to its own rendering of each prompt (no grad).
2. score: the response text is re-tokenized for the teacher, appended to the teacher's own
   rendering of the prompt, and scored by the frozen teacher (no grad); the student scores its
   own sampled ids (grad). Logits are kept only at response positions.
3. align: the aligner maps student and teacher tokens of the same text to supervision rows.
4. loss: each row's divergence (full form over the row's support, or sampled form), summed and
   divided by the number of the student's own response tokens in the batch, EOS included and
   tool observations not (or by the number of supervised tokens). Coverage has the same
   denominator, so with identical tokenizers it is 1 whether or not the responses called tools.

Validation answers the held-out prompts greedily before and after training (and every
`trainer.val_every_n_steps` steps), scored by the task's answer check.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from torchmetrics import MeanMetric

from lightning_opd import losses
from lightning_opd.align import LossSettings, ScoredBatch, ScoredSide, TokenizerPair, build_aligner
from lightning_opd.align.base import pack_segments, unit_logprobs
from lightning_opd.align.pairing import segment_responses
from lightning_opd.config import Config
from lightning_opd.metrics import AnswerAccuracy, Coverage
from lightning_opd.models import render_prompt
from lightning_opd.rollout.generate import Rollout, response_logits
from lightning_opd.rollout.tools import reward_texts, sample_responses
from lightning_opd.sft import evaluate_accuracy, warmup_cosine
from lightning_opd.weighting import (
    StepWeights,
    batched_step_weights,
    delimiter_step_ids,
    eos_step_id,
    grpo_advantages,
)

MAX_RECORDED_UIDS = 100_000


def rng_state() -> dict:
    """Every RNG that sampling can touch, as tensors and plain values (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}  # fmt: skip


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_value(metric, *update_args) -> float:
    """This step's value of a torchmetrics Metric over all ranks (compute() synchronises)."""
    metric.update(*update_args)
    value = float(metric.compute())
    metric.reset()
    return value


def sequence_of_rows(rows, scored: ScoredBatch) -> torch.Tensor:
    """(R,) index of the response each row's first student token belongs to."""
    offsets = scored.student.offsets.to(rows.student_pos.device)
    return torch.searchsorted(offsets, rows.student_pos, right=True) - 1


class OPDModule(L.LightningModule):
    def __init__(self, cfg: Config, student, teacher, student_tokenizer, teacher_tokenizer, task) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.task = task
        self.pair = TokenizerPair.build(student_tokenizer, teacher_tokenizer)
        aligner_options = OmegaConf.to_container(cfg.aligner) if OmegaConf.is_config(cfg.aligner) else vars(cfg.aligner)
        self.aligner = build_aligner(**aligner_options, seed=cfg.trainer.seed)
        self.loss_settings = LossSettings(
            form=cfg.loss.form, divergence=cfg.loss.divergence, beta=cfg.loss.beta,
            temperature=cfg.loss.temperature, chunk_rows=cfg.loss.chunk_rows,
        )  # fmt: skip
        self.val_accuracy = AnswerAccuracy()
        # per-step coverage and reward, synchronised across ranks by torchmetrics
        self.train_coverage = Coverage()
        self.train_reward = MeanMetric()
        self.accuracy_history: list[tuple[int, float]] = []
        self.skipped_prompts = 0
        self.run_dir: Path | None = None  # set by train(): where per-sample records go
        self.seen_uids: list[str] = []  # prompts this rank trained on (first MAX_RECORDED_UIDS)
        self._update_start = 0.0
        self.start_step = 0

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the frozen teacher always scores in eval mode
        return self

    def configure_model(self) -> None:
        """Under `trainer.strategy=fsdp`, shard student and teacher (see strategy.py)."""
        if self.cfg.trainer.strategy != "fsdp" or getattr(self, "_sharded", False):
            return
        from lightning_opd.strategy import shard_model

        mesh = self.device_mesh["data_parallel"]
        on_gpu = self.device.type == "cuda"
        shard_model(self.student, mesh, self.cfg, on_gpu=on_gpu)
        shard_model(self.teacher, mesh, self.cfg, on_gpu=on_gpu)
        self._sharded = True

    @property
    def synced_generation(self) -> bool:
        """Sharded models need every rank in every forward pass, finished or not."""
        return self.cfg.trainer.strategy == "fsdp" and self._trainer is not None and self.trainer.world_size > 1

    def setup(self, stage: str) -> None:
        if self.synced_generation and self.cfg.tools.enabled:
            # each rank's tool loop runs a data-dependent number of generate calls, and sharded
            # models need every rank in every forward: that would hang, so refuse up front
            raise ValueError(
                "tools.enabled=true with trainer.strategy=fsdp on more than one device is not supported "
                "(tool rollouts are not synchronised across ranks); use trainer.strategy=ddp"
            )

    def _global_token_count(self, count: int) -> float:
        """Tokens in the global batch divided by world size: DDP/FSDP average gradients over
        ranks, so dividing each rank's sum by this gives the token mean of the global batch."""
        if self._trainer is None or self.trainer.world_size == 1:
            return float(count)
        total = self.trainer.strategy.reduce(torch.tensor(float(count), device=self.device), reduce_op="sum")
        return float(total) / self.trainer.world_size

    # --- tokenization ------------------------------------------------------------------------
    @property
    def student_tokenizer(self):
        return self.pair.student

    @property
    def teacher_tokenizer(self):
        return self.pair.teacher

    def _prompt_ids(self, tokenizer, examples) -> list[list[int]]:
        return [
            tokenizer(render_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
            for ex in examples
        ]

    # --- the step ----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        examples = list(batch)
        if len(self.seen_uids) < MAX_RECORDED_UIDS:
            self.seen_uids += [ex.uid for ex in examples]
        s_prompts = self._prompt_ids(self.student_tokenizer, examples)
        keep = [i for i, p in enumerate(s_prompts) if len(p) <= self.cfg.data.max_prompt_tokens]
        self.skipped_prompts += len(examples) - len(keep)
        examples, s_prompts = [examples[i] for i in keep], [s_prompts[i] for i in keep]
        if not examples:  # every prompt was too long: skip the step, training goes on
            self.log("train/skipped_prompts", float(self.skipped_prompts), on_step=True)
            return None

        t0 = time.perf_counter()
        rollout = self.rollout(s_prompts)
        t1 = time.perf_counter()
        segmented = segment_responses(
            self.pair, rollout.response_ids, rollout.ended_with_eos, boundary=self.cfg.aligner.boundary,
            loss_mask=rollout.loss_mask,
        )  # fmt: skip
        t2 = time.perf_counter()

        s_responses = [
            r + ([self.student_tokenizer.eos_token_id] if e else [])
            for r, e in zip(rollout.response_ids, rollout.ended_with_eos, strict=False)
        ]
        with torch.no_grad():
            row_examples = [examples[i] for i in rollout.prompt_index]
            t_prompts = self._prompt_ids(self.teacher_tokenizer, row_examples)
            t_logits, t_ids, t_offsets = response_logits(
                self.teacher, t_prompts, segmented.teacher_ids, self.teacher_tokenizer.pad_token_id
            )
        t3 = time.perf_counter()
        s_logits, s_ids, s_offsets = response_logits(
            self.student, rollout.prompt_ids, s_responses, self.student_tokenizer.pad_token_id
        )
        t4 = time.perf_counter()

        segments = pack_segments(
            segmented.segments, s_offsets.numpy(), t_offsets.numpy(), model_tokens=segmented.model_tokens
        )
        scored = ScoredBatch(
            ScoredSide(s_logits, s_ids, s_offsets), ScoredSide(t_logits, t_ids, t_offsets), self.pair.vocab
        )
        rows = self.aligner.build_rows(segments, scored).to(s_logits.device)
        texts = segmented.texts
        sod_stats = self.weight_rows(rows, scored, rollout, texts)
        t5 = time.perf_counter()
        rewards = [float(self.task.check(t, row_examples[i])) for i, t in enumerate(reward_texts(rollout, texts, self.student_tokenizer))]
        if self.cfg.rl.outcome_coef > 0:
            per_row = self.mixed_policy_gradient(rows, scored, rewards, rollout.prompt_index)
        else:
            per_row = self.aligner.row_losses(rows, scored, self.loss_settings)
        supervised = rows.supervised_student_tokens
        local_count = segments.n_student_tokens if self.cfg.loss.normalizer == "response_tokens" else supervised
        normalizer = self._global_token_count(local_count)
        loss = losses.reduce_rows(per_row, rows.weight, normalizer)
        t6 = time.perf_counter()

        n_batch = len(texts)
        extra = self.tool_and_sod_metrics(rollout, sod_stats)
        self._log_train({
            **extra,
            "train/loss": loss.detach(),
            "train/coverage": step_value(self.train_coverage, supervised, segments.n_student_tokens),
            "train/rows": float(len(rows)),
            "train/response_len": sum(rollout.response_lengths) / max(n_batch, 1),
            "train/eos_rate": sum(rollout.ended_with_eos) / max(n_batch, 1),
            "train/reward": step_value(self.train_reward, torch.tensor(rewards or [0.0], device=self.device)),
            "train/unaligned_sequences": float(segments.n_unaligned_sequences),
            "train/invalid_utf8_tokens": float(segments.n_invalid_tokens),
            "train/skipped_prompts": float(self.skipped_prompts),
            "train/bad_lines": float(self._bad_lines()),
            "perf/rollout_s": t1 - t0,
            "perf/align_s": (t2 - t1) + (t5 - t4),
            "perf/teacher_s": t3 - t2,
            "perf/student_forward_s": t4 - t3,
            "perf/loss_s": t6 - t5,
        }, batch_size=max(n_batch, 1))  # fmt: skip
        self._update_start = time.perf_counter()
        return loss

    def _bad_lines(self) -> int:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return int(getattr(datamodule, "bad_lines", 0) or 0)

    # --- rollout, weighting, metrics ---------------------------------------------------------
    def rollout(self, prompts: list[list[int]], greedy: bool = False) -> Rollout:
        """Student sampling: plain, or with tool calls executed in the sandbox."""
        return sample_responses(self.student, self.student_tokenizer, prompts, self.cfg.rollout, self.cfg.tools,
                                greedy=greedy, synced_gpus=self.synced_generation)  # fmt: skip

    def packed_step_ids(self, rollout: Rollout, texts: list[str], offsets: torch.Tensor) -> torch.Tensor:
        """(N,) SOD step of every packed student position; -1 = none. EOS joins the step of the
        token before it, or after an observation is a step of its own (`eos_step_id`)."""
        per_row = []
        for b, ids in enumerate(rollout.response_ids):
            if self.cfg.sod.split == "delimiter":
                lengths = self.pair.student_bytes.lengths[ids] if ids else np.zeros(0, np.int64)
                if int(lengths.sum()) == len(texts[b].encode()):
                    steps = delimiter_step_ids(lengths, texts[b], self.cfg.sod.delimiter)
                else:  # broken UTF-8 was repaired, so bytes and text differ: one step
                    steps = [0] * len(ids)
            elif rollout.step_ids is not None:
                steps = list(rollout.step_ids[b])
            else:
                steps = [0] * len(ids)
            if rollout.ended_with_eos[b]:
                mask = rollout.loss_mask[b] if rollout.loss_mask is not None else None
                steps.append(eos_step_id(steps, mask))
            per_row.append(steps)
        flat = torch.tensor([s for row in per_row for s in row], dtype=torch.long)
        assert flat.numel() == int(offsets[-1]), "step ids must cover every response token"
        return flat

    def weight_rows(self, rows, scored: ScoredBatch, rollout: Rollout, texts: list[str]) -> StepWeights | None:
        """SOD: each row gets the weight w_k of the step its first student token is in, from the
        step divergences d_k = mean over the step's rows of |log π_S(unit) − log π_T(unit)|."""
        if not self.cfg.sod.enabled or len(rows) == 0:
            return None
        device = scored.student.logits.device
        step_of_token = self.packed_step_ids(rollout, texts, scored.student.offsets).to(device)
        row_step = step_of_token[rows.student_pos]
        row_sequence = sequence_of_rows(rows, scored)
        n, tau = len(rows), self.cfg.loss.temperature
        with torch.no_grad():
            student_lp = unit_logprobs(scored.student, rows.s_members, rows.s_member_row, n, tau)
            teacher_lp = unit_logprobs(scored.teacher, rows.t_members, rows.t_member_row, n, tau)
        sod = self.cfg.sod
        stats = batched_step_weights(student_lp, teacher_lp, row_step, row_sequence,
                                     delta=sod.delta, eps=sod.eps, reference=sod.reference)  # fmt: skip
        rows.weight = stats.token_weights.to(rows.weight.dtype)
        self._write_sod_record(stats)
        return stats

    def mixed_policy_gradient(self, rows, scored: ScoredBatch, rewards: list[float],
                              groups: list[int]) -> torch.Tensor:  # fmt: skip
        """GRPO mixing (SOD's training signal): per row, A = outcome_coef·Â_i + opd_coef·w_k·
        (log π_T − log π_S) on the sampled unit; loss = −A·log π_S. The row weights are folded
        into A here, so they are reset to 1 for the reduction."""
        n, tau, rl = len(rows), self.cfg.loss.temperature, self.cfg.rl
        device = scored.student.logits.device
        student_lp = unit_logprobs(scored.student, rows.s_members, rows.s_member_row, n, tau)
        with torch.no_grad():
            teacher_lp = unit_logprobs(scored.teacher, rows.t_members, rows.t_member_row, n, tau)
            outcome = grpo_advantages(torch.tensor(rewards, device=device), torch.tensor(groups, device=device))
            row_sequence = sequence_of_rows(rows, scored)
            advantage = rl.outcome_coef * outcome[row_sequence] + rl.opd_coef * rows.weight * (teacher_lp - student_lp)
        rows.weight = torch.ones_like(rows.weight)
        return -advantage.detach() * student_lp

    def tool_and_sod_metrics(self, rollout: Rollout, sod: StepWeights | None) -> dict:
        out: dict = {}
        if rollout.tool_calls is not None:
            calls = sum(rollout.tool_calls)
            out["train/tool_calls"] = calls / max(len(rollout.tool_calls), 1)
            out["train/tool_success_rate"] = sum(rollout.tool_successes or []) / max(calls, 1)
        if sod is not None and sod.weight.numel():
            out["train/sod/d_mean"] = float(sod.divergence.mean())
            out["train/sod/w_mean"] = float(sod.weight.mean())
            out["train/sod/w_min"] = float(sod.weight.min())
            out["train/sod/steps"] = float(sod.weight.numel()) / max(len(rollout.response_ids), 1)
        return out

    def _write_sod_record(self, stats: StepWeights) -> None:
        """One JSON line per trajectory: its step divergences d_k and weights w_k."""
        if self.run_dir is None:
            return
        path = self.run_dir / f"sod_steps.rank{self.global_rank}.jsonl"
        with path.open("a") as f:
            for seq in stats.step_sequence.unique().tolist():
                sel = stats.step_sequence == seq
                f.write(json.dumps({"step": int(self.global_step), "sequence": seq,
                                    "d": stats.divergence[sel].tolist(), "w": stats.weight[sel].tolist()}) + "\n")  # fmt: skip

    def _log_train(self, values: dict, batch_size: int) -> None:
        for name, value in values.items():
            self.log(name, value, on_step=True, on_epoch=False, prog_bar=name in ("train/loss", "train/coverage"),
                     batch_size=batch_size, sync_dist=False)  # fmt: skip

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if getattr(self, "_pending_rng", None) is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # backward + optimizer step happened between the end of training_step and here
        self.log("perf/update_s", time.perf_counter() - self._update_start, on_step=True, on_epoch=False)
        every = self.cfg.trainer.val_every_n_steps
        if every and self.global_step % every == 0 and self.global_step < self.cfg.trainer.max_steps:
            self.run_validation()

    # --- validation --------------------------------------------------------------------------
    def run_validation(self) -> float:
        """Greedy accuracy on this rank's share of the held-out prompts (synced across ranks)."""
        examples = self.task.validation_set()
        world = self.trainer.world_size if self._trainer is not None else 1
        num_batches = max(1, math.ceil(math.ceil(len(examples) / world) / 256))
        if world > 1:
            examples = examples[self.trainer.global_rank :: world]
        self.val_accuracy.reset()
        accuracy = evaluate_accuracy(
            self.student, self.student_tokenizer, examples, self.task,
            max_new_tokens=self.cfg.rollout.max_new_tokens, metric=self.val_accuracy,
            synced_gpus=self.synced_generation, num_batches=num_batches, tools=self.cfg.tools,
        )  # fmt: skip
        self.accuracy_history.append((int(self.global_step), accuracy))
        if self._trainer is not None and self.trainer.logger is not None:
            self.trainer.logger.log_metrics({"val/accuracy": accuracy}, step=self.global_step)
        return accuracy

    def on_train_start(self) -> None:
        if not self.accuracy_history:  # a resumed run already measured "before"
            self.run_validation()

    def on_train_end(self) -> None:
        self.run_validation()

    # --- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg.optim
        opt = torch.optim.AdamW(
            self.student.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas)
        )
        total = max(1, self.cfg.trainer.max_steps)
        warmup = int(o.warmup_ratio * total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["opd_accuracy_history"] = self.accuracy_history
        checkpoint["opd_rng"] = rng_state()
        # the teacher is frozen and rebuilt from its cache: keep it out of the checkpoint, except
        # for sharded (distributed) checkpoints, whose load plan expects every module key
        if self.cfg.trainer.strategy != "fsdp":
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.accuracy_history = [tuple(x) for x in checkpoint.get("opd_accuracy_history", [])]
        self.start_step = int(checkpoint.get("global_step", 0))  # the steps this call will not train
        # sampling continues exactly where the saved run was: the RNG is restored right before the
        # first step, because starting the DataLoader iterator draws from the global RNG
        self._pending_rng = checkpoint.get("opd_rng")
        state = checkpoint.get("state_dict")
        if state is not None and not any(k.startswith("teacher.") for k in state):
            state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
