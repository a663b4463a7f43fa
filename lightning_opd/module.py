"""OPDModule: one on-policy distillation step = rollout -> score -> align -> weight -> loss.

1. rollout: the student samples responses to its own rendering of each prompt (no grad).
2. score: the response text is re-tokenized for the teacher (`align_batch`, which also cuts each
   response into segments), appended to the teacher's own rendering of the prompt, and scored
   by the frozen teacher (no grad); the student scores its own sampled ids (grad). Logits are
   kept only at response positions.
3. align: the aligner maps the segments of student and teacher tokens to supervision rows.
4. weight: with SOD, each row gets the weight of its reasoning step (`step_weights`).
5. loss: each row's divergence (full form over the row's support, or sampled form), weighted,
   summed and divided by the number of the student's own response tokens in the batch, EOS
   included and tool observations not (or by the number of supervised tokens). Coverage has
   the same denominator, so with identical tokenizers it is 1 whether or not the responses
   called tools. `train/teacher_mass` is the mean over the step's rows of the share of the
   teacher's probability at the row's anchor that reaches the student's side of the comparison
   (`Aligner.teacher_mass`: the V∩ share for V∩ aligners; not logged for aligners without one).

Prompts longer than `data.max_prompt_tokens` are skipped (`train/skipped_prompts`). With more
than one process, the ranks first agree (an all-reduce of "this rank admitted a prompt"), and a
rank that admitted none runs the step on a placeholder (the batch's first example with an empty
prompt) that counts 0 tokens in the global normaliser, 0 in coverage and reward, and whose loss
is multiplied by 0: it joins every collective (token count, metric syncs, FSDP forwards,
gradient sync) in the same order as the others and adds nothing to the gradient. If no rank
admitted a prompt, every rank runs the placeholder (Lightning refuses a None step with more than
one process), logs no step metrics, and drops the gradients before the optimizer step, so the
weights stay as in a skipped step. A single process skips the step at once, as before.

Micro-batches (`trainer.micro_batch_size` = m > 0; 0 = the whole batch, as above): the batch is
rolled out whole, then steps 2-5 run on m responses at a time and each micro-batch's loss is
back-propagated before the next one is scored, so the step holds the logits (and their
gradients) of m responses instead of the batch's. What needs the whole batch comes first, from
every micro-batch's segments and rows (no logits): the normaliser N (all ranks), the rewards, and
GRPO's group-normalised advantages (a prompt's responses may fall in different micro-batches);
SOD weights are per response, so per micro-batch. The summed gradient is the unsplit step's (up
to float rounding), and the metrics are the whole batch's, logged once. Micro-batches 1..k-1 are
back-propagated inside `training_step` (through the strategy, as Lightning's own backward) and
the last one's loss is returned, so Lightning's backward, clipping, `on_before_optimizer_step`
and optimizer step stay as they are. Lightning zeroes the gradients between `training_step` and
its backward, so with m > 0 the step zeroes them at its start instead (`optimizer_zero_grad`).
Under DDP the in-step backward passes accumulate locally and the returned loss's all-reduce
carries their sum (as in `no_sync`); under FSDP each backward reduce-scatters into the sharded
gradients, and every rank runs as many micro-batches (the most of any rank; a padding one repeats
the rank's first micro-batch with its loss multiplied by 0).

Validation answers the held-out prompts greedily before and after training (and every
`trainer.val_every_n_steps` steps), scored by the task's answer check.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from torchmetrics import MeanMetric

from lightning_opd import losses
from lightning_opd.align import (
    AlignedBatch,
    BatchSegments,
    Rows,
    ScoredBatch,
    ScoredSide,
    TokenizerPair,
    align_batch,
    build_aligner,
)
from lightning_opd.align.base import unit_logprobs
from lightning_opd.align.pairing import SegmentedResponses, unaligned_warning
from lightning_opd.config import Config
from lightning_opd.evaluation import evaluate_accuracy
from lightning_opd.metrics import AnswerAccuracy, Coverage
from lightning_opd.models import render_prompt
from lightning_opd.rollout.generate import Rollout, response_logits
from lightning_opd.rollout.tools import reward_texts, sample_responses
from lightning_opd.schedule import warmup_cosine
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


def response_of_rows(rows: Rows, scored: ScoredBatch) -> torch.Tensor:
    """(R,) index of the response each row's first student token belongs to."""
    offsets = scored.student.offsets.to(rows.student_pos.device)
    return torch.searchsorted(offsets, rows.student_pos, right=True) - 1


def as_dataclass(section):
    """A config section as its schema dataclass (an OmegaConf node is converted)."""
    return OmegaConf.to_object(section) if OmegaConf.is_config(section) else section


def rollout_slice(rollout: Rollout, lo: int, hi: int) -> Rollout:
    """Responses lo..hi-1 of a rollout (every per-response list cut; `prompt_index` keeps the
    batch's prompt numbers, so GRPO groups stay those of the whole batch)."""
    cut = {f.name: getattr(rollout, f.name)[lo:hi] for f in fields(rollout) if isinstance(getattr(rollout, f.name), list)}
    return replace(rollout, **cut)


@dataclass
class MicroBatch:
    """Responses lo.. of a step taken together (`trainer.micro_batch_size`): their rollout,
    segments and rows; no logits yet."""

    lo: int  # the index of its first response in the step's rollout
    rollout: Rollout
    aligned: AlignedBatch
    rows: Rows

    @property
    def hi(self) -> int:
        return self.lo + len(self.rollout.response_ids)


@dataclass
class StepCounts:
    """What the step's metrics read of its rows and segments, summed over its micro-batches
    (`_log_step` takes it for both)."""

    n_rows: int
    supervised_student_tokens: int
    n_student_tokens: int
    n_unaligned_sequences: int
    n_invalid_tokens: int

    def __len__(self) -> int:
        return self.n_rows


def cat_step_weights(parts: list[tuple[int, StepWeights | None]]) -> StepWeights | None:
    """The SOD weights of micro-batches (first response, weights) as one batch's: steps
    concatenated, their sequences numbered in the whole batch. None when no part has any."""
    parts = [(lo, sod) for lo, sod in parts if sod is not None]
    if not parts:
        return None
    return StepWeights(
        token_weights=torch.cat([sod.token_weights for _, sod in parts]),
        step_sequence=torch.cat([sod.step_sequence + lo for lo, sod in parts]),
        step_id=torch.cat([sod.step_id for _, sod in parts]),
        divergence=torch.cat([sod.divergence for _, sod in parts]),
        weight=torch.cat([sod.weight for _, sod in parts]),
    )


class PhaseTimer:
    """Wall-clock seconds of each phase of one step, summed over the phase's blocks:
    `with timer("rollout"): ...` records `perf/rollout_s`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"perf/{phase}_s": seconds for phase, seconds in self.seconds.items()}


class OPDModule(L.LightningModule):
    def __init__(self, cfg: Config, student, teacher, student_tokenizer, teacher_tokenizer, task) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.task = task
        self.pair = TokenizerPair.build(student_tokenizer, teacher_tokenizer)
        self.aligner = build_aligner(as_dataclass(cfg.aligner), seed=cfg.trainer.seed)
        self.loss_cfg = as_dataclass(cfg.loss)
        self.val_accuracy = AnswerAccuracy()
        # per-step coverage and reward, synchronised across ranks by torchmetrics
        self.train_coverage = Coverage()
        self.train_reward = MeanMetric()
        self.train_teacher_mass = MeanMetric()  # mean over the rows of every rank
        self.accuracy_history: list[tuple[int, float]] = []
        self.skipped_prompts = 0
        self.run_dir: Path | None = None  # set by train(): where per-sample records go
        self.seen_uids: list[str] = []  # prompts this rank trained on (first MAX_RECORDED_UIDS)
        self._update_start = 0.0
        self.start_step = 0
        self._sharded = False  # configure_model has sharded the models (fsdp)
        self._pending_rng: dict | None = None  # a checkpoint's RNG state, restored before the first step
        self._warned_unaligned = False  # the unaligned-responses warning is given once per run
        self._drop_update = False  # no rank admitted a prompt this step: its (zero) gradients are dropped
        self.outcome_term: torch.Tensor | None = None  # GRPO mixing: mean |outcome_coef·Â| of the step
        self._first_response = 0  # micro-batches: the step index of the first response being weighted (SOD records)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the frozen teacher always scores in eval mode
        return self

    def configure_model(self) -> None:
        """Under `trainer.strategy=fsdp`, shard student and teacher (see strategy.py)."""
        if self.cfg.trainer.strategy != "fsdp" or self._sharded:
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

    @property
    def _single_process(self) -> bool:
        """No other rank to agree with (also outside a Trainer, as in tests)."""
        return self._trainer is None or self.trainer.world_size == 1

    def _global_token_count(self, count: int) -> float:
        """Tokens in the global batch divided by world size: DDP/FSDP average gradients over
        ranks, so dividing each rank's sum by this gives the token mean of the global batch."""
        if self._single_process:
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

    def _admit(self, batch) -> tuple[list, list[list[int]]]:
        """The batch's examples and their student prompt ids, without prompts longer than
        `data.max_prompt_tokens` (counted in `skipped_prompts`)."""
        examples = list(batch)
        if len(self.seen_uids) < MAX_RECORDED_UIDS:
            self.seen_uids += [ex.uid for ex in examples]
        prompts = self._prompt_ids(self.student_tokenizer, examples)
        keep = [i for i, p in enumerate(prompts) if len(p) <= self.cfg.data.max_prompt_tokens]
        self.skipped_prompts += len(examples) - len(keep)
        return [examples[i] for i in keep], [prompts[i] for i in keep]

    def _any_rank_admitted(self, admitted: bool) -> bool:
        """Whether some rank admitted a prompt this step (no collective with one process)."""
        if self._single_process:
            return admitted
        total = self.trainer.strategy.reduce(torch.tensor(float(admitted), device=self.device), reduce_op="sum")
        return float(total) > 0

    def _placeholder(self, batch) -> tuple[list, list[list[int]]]:
        """A stand-in for a rank that admitted no prompt while others did: the batch's first
        example with an empty prompt (its loss and counts are zeroed in the step)."""
        examples = [replace(next(iter(batch)), prompt="")]
        return examples, self._prompt_ids(self.student_tokenizer, examples)

    # --- the step ----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        if self.cfg.trainer.micro_batch_size > 0:  # backward runs in the step: Lightning's zero_grad comes too late
            self._zero_student_grads()
        examples, prompts = self._admit(batch)
        admitted_anywhere = self._any_rank_admitted(bool(examples))  # a collective only with >1 process
        placeholder = not examples
        if placeholder:  # every prompt was too long
            if self._single_process:
                self.log("train/skipped_prompts", float(self.skipped_prompts), on_step=True)
                return None  # skip the step, training goes on
            # Lightning refuses None with >1 process: join the collectives with a zero loss
            examples, prompts = self._placeholder(batch)
        self._drop_update = not admitted_anywhere  # no rank admitted a prompt: no optimizer update
        timer = PhaseTimer()

        # 1. rollout: the student answers each prompt (no grad)
        with timer("rollout"):
            rollout = self.rollout(prompts)
        answered = [examples[i] for i in rollout.prompt_index]  # the example of each response
        if self.cfg.trainer.micro_batch_size > 0:  # steps 2-5 a micro-batch at a time
            return self._micro_batched_step(rollout, answered, timer, placeholder=placeholder,
                                            admitted_anywhere=admitted_anywhere)  # fmt: skip

        # 2. score: the teacher's tokens of each response text (with its segments), then logits
        with timer("align"):
            aligned = align_batch(self.pair, rollout.response_ids, rollout.ended_with_eos,
                                  boundary=self.aligner.options.boundary, loss_mask=rollout.loss_mask)  # fmt: skip
            if not self._warned_unaligned and (message := unaligned_warning(aligned)):
                warnings.warn(message, RuntimeWarning, stacklevel=1)
                self._warned_unaligned = True
        scored = self.score(rollout, aligned, answered, timer)

        # 3. align: supervision rows; 4. weight: SOD step weights of the rows (None = all 1)
        with timer("align"):
            rows = self.aligner.build_rows(aligned.segments, scored).to(scored.student.logits.device)
            sod = self.step_weights(rows, scored, rollout, aligned.texts)

        # 5. loss: per-row losses, weighted and reduced over the batch's tokens
        with timer("loss"):
            rewards = self.rewards(rollout, aligned.texts, answered)
            loss = self.distillation_loss(rows, scored, sod, rewards, rollout.prompt_index, aligned.segments,
                                          placeholder=placeholder)  # fmt: skip
        with timer("teacher_mass"):  # a diagnostic: no grad, a few rows of (R, |V∩|) at a time
            teacher_mass = self.aligner.teacher_mass(rows, scored, self.loss_cfg)  # (R,) or None

        if admitted_anywhere:  # the metric syncs inside are collectives: every rank or none
            self._log_step(loss, rows, aligned.segments, rollout, rewards, sod, timer, placeholder=placeholder,
                           teacher_mass=teacher_mass)  # fmt: skip
        else:
            self.log("train/skipped_prompts", float(self.skipped_prompts), on_step=True)
        self._update_start = time.perf_counter()
        return loss

    # --- the phases --------------------------------------------------------------------------
    def rollout(self, prompts: list[list[int]], greedy: bool = False) -> Rollout:
        """Student sampling: plain, or with tool calls executed in the sandbox."""
        return sample_responses(self.student, self.student_tokenizer, prompts, self.cfg.rollout, self.cfg.tools,
                                greedy=greedy, synced_gpus=self.synced_generation)  # fmt: skip

    def score(self, rollout: Rollout, aligned: AlignedBatch, answered: list, timer: PhaseTimer) -> ScoredBatch:
        """Logits at the response positions: the frozen teacher's on its own tokens of each
        response text after its own rendering of the prompt (no grad), the student's on its
        sampled ids, EOS included where generated (grad). With `loss.restrict_teacher_columns`, the
        teacher's logits cover only the columns the aligner reads (`Aligner.teacher_columns`)
        and its response tokens, with the full-vocabulary normaliser (align/columns.py)."""
        from lightning_opd.align.columns import score_side

        restrict = self.loss_cfg.restrict_teacher_columns
        columns = self.aligner.teacher_columns(self.pair.vocab, self.loss_cfg) if restrict else None
        with timer("teacher"), torch.no_grad():
            t_prompts = self._prompt_ids(self.teacher_tokenizer, answered)
            teacher = score_side(self.teacher, t_prompts, aligned.teacher_ids, self.teacher_tokenizer.pad_token_id,
                                 columns=columns, temperature=self.loss_cfg.temperature,
                                 chunk=self.loss_cfg.chunk_rows)  # fmt: skip
        eos = self.student_tokenizer.eos_token_id
        s_responses = [ids + ([eos] if e else []) for ids, e in zip(rollout.response_ids, rollout.ended_with_eos, strict=True)]
        with timer("student_forward"):
            student = response_logits(self.student, rollout.prompt_ids, s_responses, self.student_tokenizer.pad_token_id)
        return ScoredBatch(ScoredSide(*student), teacher, self.pair.vocab)

    def rewards(self, rollout: Rollout, texts: list[str], answered: list) -> list[float]:
        """The task's answer check of each response, on the text the model itself wrote."""
        checked = reward_texts(rollout, texts, self.student_tokenizer)
        return [float(self.task.check(text, example)) for text, example in zip(checked, answered, strict=True)]

    def distillation_loss(self, rows: Rows, scored: ScoredBatch, sod: StepWeights | None, rewards: list[float],
                          groups: list[int], segments: BatchSegments, placeholder: bool = False,
                          normalizer: float | None = None, outcome: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Σ_r w_r · ℓ_r / N: w the SOD weights (1 without SOD), N the batch's response tokens
        (`loss.normalizer=response_tokens`) or supervised tokens, averaged over ranks. A
        placeholder step counts 0 tokens and its loss is multiplied by 0 (the graph stays).
        A micro-batch passes the whole step's N (`normalizer`) and, with GRPO mixing, its
        responses' advantages Â computed over the whole step's groups (`outcome`)."""
        weights = sod.token_weights if sod is not None else None  # (R,)
        if self.cfg.rl.outcome_coef > 0:  # the weights go into the advantage, not the reduction
            row_losses, weights = self.mixed_policy_gradient(rows, scored, weights, rewards, groups, outcome), None
        else:
            row_losses = self.aligner.row_losses(rows, scored, self.loss_cfg)
        if normalizer is None:
            count = segments.n_student_tokens if self.cfg.loss.normalizer == "response_tokens" else rows.supervised_student_tokens
            normalizer = self._global_token_count(0 if placeholder else count)
        loss = losses.reduce_rows(row_losses, weights, normalizer)
        return loss * 0.0 if placeholder else loss

    def _log_step(self, loss: torch.Tensor, rows: Rows, segments: BatchSegments, rollout: Rollout,
                  rewards: list[float], sod: StepWeights | None, timer: PhaseTimer,
                  placeholder: bool = False, teacher_mass: torch.Tensor | None = None) -> None:  # fmt: skip
        n_responses = max(len(rollout.response_ids), 1)
        # the metric syncs are collectives: a placeholder step joins them and adds nothing
        supervised, total = (0, 0) if placeholder else (rows.supervised_student_tokens, segments.n_student_tokens)
        reward = torch.tensor(rewards or [0.0], device=self.device)
        self._log_train({
            **self.tool_and_sod_metrics(rollout, sod),
            "train/loss": loss.detach(),
            "train/coverage": step_value(self.train_coverage, supervised, total),
            **self.teacher_mass_metric(teacher_mass, placeholder),
            "train/rows": float(len(rows)),
            "train/response_len": sum(rollout.response_lengths) / n_responses,
            "train/eos_rate": sum(rollout.ended_with_eos) / n_responses,
            "train/reward": step_value(self.train_reward, reward, torch.zeros_like(reward) if placeholder else 1.0),
            "train/unaligned_sequences": float(segments.n_unaligned_sequences),
            "train/invalid_utf8_tokens": float(segments.n_invalid_tokens),
            "train/skipped_prompts": float(self.skipped_prompts),
            "train/bad_lines": float(self._bad_lines()),
            **({"train/outcome_term": self.outcome_term} if self.cfg.rl.outcome_coef > 0 else {}),
            **timer.metrics(),
        }, batch_size=n_responses)  # fmt: skip

    def teacher_mass_metric(self, mass: torch.Tensor | None, placeholder: bool = False) -> dict:
        """{"train/teacher_mass": mean of the rows' teacher mass (R,) over every rank's rows}, or {}
        when the aligner has no teacher mass (None, the same on every rank) or no rank has a row.
        The sync is a collective, as coverage's; a placeholder step joins it with weight 0."""
        if mass is None:
            return {}
        weight = torch.zeros_like(mass) if placeholder else torch.ones_like(mass)
        value = step_value(self.train_teacher_mass, mass, weight)
        return {} if math.isnan(value) else {"train/teacher_mass": value}

    def _bad_lines(self) -> int:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return int(getattr(datamodule, "bad_lines", 0) or 0)

    # --- SOD step weights and GRPO mixing ----------------------------------------------------
    def packed_step_ids(self, rollout: Rollout, texts: list[str], offsets: torch.Tensor) -> torch.Tensor:
        """(N,) SOD step of every packed student position; -1 = none. EOS joins the step of the
        token before it, or after an observation is a step of its own (`eos_step_id`)."""
        per_response = []
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
            per_response.append(steps)
        flat = torch.tensor([s for steps in per_response for s in steps], dtype=torch.long)
        assert flat.numel() == int(offsets[-1]), "step ids must cover every response token"
        return flat

    def step_weights(self, rows: Rows, scored: ScoredBatch, rollout: Rollout, texts: list[str]) -> StepWeights | None:
        """SOD: each row gets the weight w_k of the step its first student token is in, from the
        step divergences d_k = mean over the step's rows of |log π_S(unit) − log π_T(unit)|.
        None without SOD (every weight 1); the row weights are `.token_weights`, (R,). With
        `sod.record` and SOD off, d_k is computed and recorded and every weight is 1 (plain OPD)."""
        if not (self.cfg.sod.enabled or self.cfg.sod.record) or len(rows) == 0:
            return None
        device = scored.student.logits.device
        step_of_token = self.packed_step_ids(rollout, texts, scored.student.offsets).to(device)
        row_step = step_of_token[rows.student_pos]
        row_response = response_of_rows(rows, scored)
        n, tau = len(rows), self.cfg.loss.temperature
        with torch.no_grad():
            student_lp = unit_logprobs(scored.student, rows.s_members, rows.s_member_row, n, tau)
            teacher_lp = unit_logprobs(scored.teacher, rows.t_members, rows.t_member_row, n, tau)
        sod = self.cfg.sod
        stats = batched_step_weights(student_lp, teacher_lp, row_step, row_response,
                                     delta=sod.delta, eps=sod.eps, reference=sod.reference,
                                     min_weight=sod.min_weight, min_reference=sod.min_reference)  # fmt: skip
        if not sod.enabled:  # sod.record: the d_k are kept, the weights are plain OPD's 1
            stats = replace(stats, token_weights=torch.ones_like(stats.token_weights), weight=torch.ones_like(stats.weight))
        self._write_sod_record(stats)
        return stats

    def mixed_policy_gradient(self, rows: Rows, scored: ScoredBatch, weights: torch.Tensor | None,
                              rewards: list[float], groups: list[int],
                              outcome: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """GRPO mixing (SOD's training signal): per row, A = outcome_coef·Â_i + opd_coef·w_r·
        (log π_T − log π_S) on the sampled unit, w the row weights ((R,), None = 1);
        loss = −A·log π_S, (R,). The weights are folded into A, so the reduction takes none.
        `outcome`: the responses' Â when computed beforehand over more responses (a micro-batch's,
        from the whole step's groups); None = from `rewards` and `groups`."""
        n, tau, rl = len(rows), self.cfg.loss.temperature, self.cfg.rl
        device = scored.student.logits.device
        student_lp = unit_logprobs(scored.student, rows.s_members, rows.s_member_row, n, tau)
        with torch.no_grad():
            teacher_lp = unit_logprobs(scored.teacher, rows.t_members, rows.t_member_row, n, tau)
            if outcome is None:
                outcome = grpo_advantages(torch.tensor(rewards, device=device), torch.tensor(groups, device=device))
            weight = weights.float() if weights is not None else 1.0
            advantage = rl.outcome_coef * outcome[response_of_rows(rows, scored)] + rl.opd_coef * weight * (teacher_lp - student_lp)
            self.outcome_term = (rl.outcome_coef * outcome).abs().mean()  # logged: train/outcome_term
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
                f.write(json.dumps({"step": int(self.global_step), "sequence": seq + self._first_response,
                                    "d": stats.divergence[sel].tolist(), "w": stats.weight[sel].tolist()}) + "\n")  # fmt: skip

    def _log_train(self, values: dict, batch_size: int) -> None:
        for name, value in values.items():
            self.log(name, value, on_step=True, on_epoch=False, prog_bar=name in ("train/loss", "train/coverage"),
                     batch_size=batch_size, sync_dist=False)  # fmt: skip

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._drop_update:  # as a skipped step: no gradients, so AdamW leaves every weight as is
            for param in self.student.parameters():
                param.grad = None

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        """Lightning zeroes the gradients between `training_step` and its backward: with
        micro-batches the step has back-propagated all but its last micro-batch by then, and
        zeroed the gradients itself at its start (`_zero_student_grads`)."""
        if self.cfg.trainer.micro_batch_size > 0:
            return
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def _zero_student_grads(self) -> None:
        for param in self.student.parameters():  # the optimizer's parameters: optimizer.zero_grad()
            param.grad = None

    # --- micro-batches -----------------------------------------------------------------------
    def micro_batches(self, rollout: Rollout, timer: PhaseTimer) -> list[MicroBatch]:
        """The step's responses cut into `trainer.micro_batch_size` at a time, each aligned and
        its rows built (no aligner needs logits for its rows), with the unaligned warning of the
        whole batch."""
        m, n = self.cfg.trainer.micro_batch_size, len(rollout.response_ids)
        parts = []
        with timer("align"):
            for lo in range(0, n, m):
                part = rollout_slice(rollout, lo, min(lo + m, n))
                aligned = align_batch(self.pair, part.response_ids, part.ended_with_eos,
                                      boundary=self.aligner.options.boundary, loss_mask=part.loss_mask)  # fmt: skip
                parts.append(MicroBatch(lo, part, aligned, self.aligner.build_rows(aligned.segments, None)))
            # the batch's per-response lists, joined: the warning is about the whole batch
            whole = SegmentedResponses(**{f.name: [x for p in parts for x in getattr(p.aligned, f.name)]
                                          for f in fields(SegmentedResponses)})  # fmt: skip
            if not self._warned_unaligned and (message := unaligned_warning(whole)):
                warnings.warn(message, RuntimeWarning, stacklevel=1)
                self._warned_unaligned = True
        return parts

    def _micro_batch_count(self, count: int) -> int:
        """How many micro-batches this rank runs: its own count, or under fsdp with several
        processes the most of any rank (there every forward pass is a collective)."""
        if not self.synced_generation:
            return count
        return int(self.trainer.strategy.reduce(torch.tensor(float(count), device=self.device), reduce_op="max"))

    def _micro_batched_step(self, rollout: Rollout, answered: list, timer: PhaseTimer, *, placeholder: bool,
                            admitted_anywhere: bool) -> torch.Tensor:  # fmt: skip
        """Steps 2-5 a micro-batch at a time (module docstring): every micro-batch but the last is
        back-propagated here; the last one's loss is returned for Lightning's backward."""
        parts = self.micro_batches(rollout, timer)
        texts = [text for p in parts for text in p.aligned.texts]
        with timer("loss"):
            rewards = self.rewards(rollout, texts, answered)
            # the whole batch's normaliser and GRPO advantages, before any micro-batch's loss
            if self.cfg.loss.normalizer == "response_tokens":
                count = sum(p.aligned.segments.n_student_tokens for p in parts)
            else:
                count = sum(p.rows.supervised_student_tokens for p in parts)
            normalizer = self._global_token_count(0 if placeholder else count)
            outcome = None
            if self.cfg.rl.outcome_coef > 0:
                outcome = grpo_advantages(torch.tensor(rewards, device=self.device),
                                          torch.tensor(rollout.prompt_index, device=self.device))  # fmt: skip
        k = self._micro_batch_count(len(parts))
        total, sods, masses = None, [], []
        for i in range(k):
            padding = i >= len(parts)  # fsdp: a rank with fewer micro-batches joins the others' forwards
            part = parts[0] if padding else parts[i]
            loss, sod, mass = self._micro_batch_loss(part, answered, rewards, outcome, normalizer, timer,
                                                     zeroed=placeholder or padding, padding=padding)  # fmt: skip
            if i < k - 1:
                with timer("backward"):
                    self._backward_micro_batch(loss)
            if padding:
                continue
            total = loss.detach() if total is None else total + loss.detach()
            sods.append((part.lo, sod))
            masses.append(mass)
        if outcome is not None:
            self.outcome_term = (self.cfg.rl.outcome_coef * outcome).abs().mean()  # logged: train/outcome_term
        if admitted_anywhere:  # the metric syncs inside are collectives: every rank or none
            segments = [p.aligned.segments for p in parts]
            counts = StepCounts(
                n_rows=sum(len(p.rows) for p in parts),
                supervised_student_tokens=sum(p.rows.supervised_student_tokens for p in parts),
                n_student_tokens=sum(s.n_student_tokens for s in segments),
                n_unaligned_sequences=sum(s.n_unaligned_sequences for s in segments),
                n_invalid_tokens=sum(s.n_invalid_tokens for s in segments),
            )
            teacher_mass = None if any(m is None for m in masses) else torch.cat(masses)
            self._log_step(total, counts, counts, rollout, rewards, cat_step_weights(sods), timer,  # type: ignore[arg-type]
                           placeholder=placeholder, teacher_mass=teacher_mass)  # fmt: skip
        else:
            self.log("train/skipped_prompts", float(self.skipped_prompts), on_step=True)
        self._update_start = time.perf_counter()
        return loss

    def _micro_batch_loss(self, part: MicroBatch, answered: list, rewards: list[float], outcome: torch.Tensor | None,
                          normalizer: float, timer: PhaseTimer, *, zeroed: bool, padding: bool,
                          ) -> tuple[torch.Tensor, StepWeights | None, torch.Tensor | None]:  # fmt: skip
        """One micro-batch's steps 2-5: (its loss, a share of the step's under the whole step's
        normaliser; its SOD weights; its rows' teacher mass). A `zeroed` loss (placeholder or
        padding) is multiplied by 0; a padding micro-batch records no SOD steps."""
        lo, hi = part.lo, part.hi
        scored = self.score(part.rollout, part.aligned, answered[lo:hi], timer)
        with timer("align"):
            rows = part.rows.to(scored.student.logits.device)
            self._first_response = lo
            try:
                sod = None if padding else self.step_weights(rows, scored, part.rollout, part.aligned.texts)
            finally:
                self._first_response = 0
        with timer("loss"):
            loss = self.distillation_loss(rows, scored, sod, rewards[lo:hi], part.rollout.prompt_index,
                                          part.aligned.segments, placeholder=zeroed, normalizer=normalizer,
                                          outcome=outcome[lo:hi] if outcome is not None else None)  # fmt: skip
        with timer("teacher_mass"):
            mass = self.aligner.teacher_mass(rows, scored, self.loss_cfg)
        return loss, sod, mass

    def _backward_micro_batch(self, loss: torch.Tensor) -> None:
        """Back-propagates a micro-batch's loss inside the step as Lightning back-propagates the
        returned one: through the strategy (precision plugin, backward hooks), outside autocast.
        Under DDP this runs inside the wrapped forward, before DDP expects a backward: the
        gradients accumulate locally and the returned loss's backward all-reduces their sum."""
        with torch.autocast(self.device.type, enabled=False):
            if self._trainer is None:
                loss.backward()
            else:
                self.trainer.strategy.backward(loss, None)

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
