"""Per-token weights of the distillation signal: SOD step weights, and GRPO outcome advantages.

SOD (Step-wise On-policy Distillation, DESIGN §4). A response is cut into steps k = 1..K
(the contiguous runs of model tokens between tool observations, or, tool-free, the stretches
between delimiters such as a blank line). For step k with sampled tokens T_k:

    d_k = mean_{t in T_k} | log π_S(y_t) − log π_T(y_t) |                  (detached)
    w_1 = 1,   w_k = min( Π_{u<k} (d_u + ε)/(d_{u+1} + ε), 1 + δ ) = min( (d_1 + ε)/(d_k + ε), 1 + δ )

and w_k multiplies the OPD term of every token of step k: a step whose divergence jumped
(after a bad tool call the teacher's signal is off-distribution) gets w < 1, so the teacher is
muted there; once the student is back on track the weight returns towards 1 (capped at 1 + δ).
Options (ours) for the reference in the numerator: `first` (the paper: d_1), `previous`
(d_{k−1}) and `running_mean` (mean of d_1..d_{k−1}).

Released code (YoungZ365/SOD, `compute_stepwise_opd_weights` in verl/trainer/ppo/ray_trainer.py),
checked against this module:
- the running product of adjacent ratios is *not* clipped as it goes; only the stored weight is
  `min(cum_prod, 1 + δ)`. The product therefore telescopes exactly to (d_1+ε)/(d_k+ε), which is
  what `reference="first"` computes in closed form.
- steps are the contiguous runs of `response_mask == 1` (assistant tokens; tool responses and
  padding are 0); d_k uses the rollout-time student log-probs (`old_log_probs`) and the
  reference (teacher) log-probs, as Python floats (so detached).
- the model's own tokens have response_mask 1, EOS included (the tool agent loop gives every
  generated id 1 and tool-response ids 0), so an EOS sampled right after a tool response is a
  run of its own: a step of one token, after the last. `eos_step_id` does the same here; an EOS
  that follows a model token joins that token's step.
- there is no lower bound on w_k; ε = 1e-6, δ = 0.2 in `examples/SOD/run_sod.sh` (the function's
  own default δ is 0.5). Nor is d_1 bounded below: only ε keeps the ratio finite.
- the advantage is A_t = A_GRPO + opd_coef · w_k · (log π_T(y_t) − log π_S(y_t)) · mask_t.

Collapse, and two floors (options, ours; both 0 = off = the paper's weights, bit for bit). With
`first`, a trivial first step (d_1 ≈ 0: student and teacher agree on it) sends every later
weight to ≈ ε/(d_k + ε) ≈ 0: the teacher is muted for the whole rest of the response (reported
on such a task: train/sod/w_min 0.0, w_mean 0.61). The released code has no guard against it
(above: no lower bound on w_k or d_1).

- `min_reference` (sod.min_reference = r): ref_k ← max(ref_k, r) before the ratio, so
  w_k = min((max(ref_k, r) + ε)/(d_k + ε), 1 + δ). It removes the cause: a step is compared
  with at least the divergence r, so a later step with d_k ≤ r keeps its full weight (≥ 1) and
  only a real jump above r is muted. Scale-dependent: r is in units of |log π_S − log π_T|.
- `min_weight` (sod.min_weight = m, 0 ≤ m ≤ 1 + δ): w_k ← max(w_k, m) for k ≥ 2 (w_1 = 1
  anyway), so no step's teacher signal drops below the fraction m, whatever the reference.
  Scale-free, but it also lifts the weights of steps that are muted for a good reason.

Applied in that order (floor the reference, take the ratio, clip to [m, 1 + δ]).

Mixing (the module applies it; `RLConfig`): for response i of a group g and token t of step k

    A_t = outcome_coef · Â_i + opd_coef · w_k · (log π_T(y_t) − log π_S(y_t)),
    Â_i = (r_i − mean_g r) / (std_g r + 1e-6)      (`grpo_advantages`)

and the sampled-form loss is −A_t · log π_S(y_t) with A_t detached. SOD's run is outcome_coef = 1.

Cross-tokenizer: the "tokens" below may be any supervision units (shared-token rows or spans)
tagged with the SOD step of their student tokens; d_k is then the mean over the units of step k.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

REFERENCES = ("first", "previous", "running_mean")


def _check_floors(delta: float, min_weight: float, min_reference: float) -> None:
    """The floors must be >= 0, and the weight floor must not exceed the cap 1 + δ."""
    if min_reference < 0:
        raise ValueError(f"min_reference must be >= 0, got {min_reference}")
    if not 0 <= min_weight <= 1.0 + delta:
        raise ValueError(f"min_weight must be in [0, 1 + delta] = [0, {1.0 + delta}], got {min_weight}")


def _weights_from_steps(
    d: torch.Tensor, is_first: torch.Tensor, start: torch.Tensor, delta: float, eps: float,
    reference: str, min_weight: float = 0.0, min_reference: float = 0.0,
) -> torch.Tensor:
    """w for M steps laid out sequence after sequence, each sequence's steps in order.

    d (M,) divergences; is_first (M,) bool, True at a sequence's first step; start (M,) index
    of that first step for every step. min_weight, min_reference: the floors of the module
    docstring (0 = off). Returns w (M,), 1 at first steps.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference={reference!r} is not one of {list(REFERENCES)}")
    _check_floors(delta, min_weight, min_reference)
    if reference == "first":
        ref = d[start]
    elif reference == "previous":
        ref = torch.cat([d[:1], d[:-1]])  # d_{k-1}; garbage at first steps, overwritten below
    else:  # running_mean of the earlier steps of the same sequence
        csum = torch.cat([d.new_zeros(1), d.cumsum(0)])  # (M+1,), csum[i] = sum of d[:i]
        idx = torch.arange(len(d), device=d.device)
        n_before = (idx - start).clamp(min=1)
        ref = (csum[idx] - csum[start]) / n_before
    # the floors are applied only when set, so that the default is the paper's computation, op for op
    if min_reference > 0:
        ref = ref.clamp(min=min_reference)
    w = ((ref + eps) / (d + eps)).clamp(max=1.0 + delta)
    if min_weight > 0:
        w = w.clamp(min=min_weight)
    return torch.where(is_first, torch.ones_like(w), w)


def sod_weights(
    step_divergences: torch.Tensor, delta: float = 0.2, eps: float = 1e-6, reference: str = "first",
    min_weight: float = 0.0, min_reference: float = 0.0,
) -> torch.Tensor:
    """SOD weights of one trajectory's steps.

    step_divergences: (K,) d_1..d_K >= 0. Returns w (K,), detached, with w_1 = 1 and
    w_k = min((ref_k + ε)/(d_k + ε), 1 + δ), ref_k = d_1 (first) | d_{k-1} (previous) |
    mean(d_1..d_{k-1}) (running_mean). `first` equals the released code's unclipped running
    product of adjacent ratios, clipped once per step (see the module docstring).
    min_weight, min_reference (ours, 0 = off): w_k >= min_weight, and ref_k raised to at least
    min_reference (module docstring: a trivial first step otherwise mutes every later step).
    """
    d = step_divergences.detach().to(torch.promote_types(step_divergences.dtype, torch.float32))
    if d.dim() != 1:
        raise ValueError(f"step_divergences must be 1-D (K,), got shape {tuple(d.shape)}")
    k = len(d)
    is_first = torch.zeros(k, dtype=torch.bool, device=d.device)
    is_first[:1] = True
    start = torch.zeros(k, dtype=torch.long, device=d.device)
    return _weights_from_steps(d, is_first, start, delta, eps, reference, min_weight, min_reference)


def _runs(keys: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group tokens by equal key: the dense group index per token (-1 where not valid) and the
    sorted unique keys (M,)."""
    unique, inverse = torch.unique(keys[valid], sorted=True, return_inverse=True)
    index = torch.full_like(keys, -1)
    index[valid] = inverse
    return index, unique


def _run_mean(values: torch.Tensor, index: torch.Tensor, m: int) -> torch.Tensor:
    """Mean of values (N,) over each of m groups; index (N,) in [0, m) or -1 (ignored)."""
    valid = index >= 0
    total = values.new_zeros(m).index_add_(0, index[valid], values[valid])
    count = values.new_zeros(m).index_add_(0, index[valid], torch.ones_like(values[valid]))
    return total / count.clamp(min=1)


def step_divergences(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, step_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """d_k of one trajectory.

    student_logprobs, teacher_logprobs: (T,) log-probs of the sampled tokens; step_ids: (T,)
    long, the step of each token, -1 = ignored (observation, template, unsupervised).
    Returns (d (K,), step_index (T,)): d over the K distinct step ids in increasing order, and
    for each token the row of d its step is (-1 for ignored tokens), so `w[step_index]`
    broadcasts step weights back to tokens. Detached.
    """
    s, t = student_logprobs.detach(), teacher_logprobs.detach()
    step_ids = torch.as_tensor(step_ids, dtype=torch.long, device=s.device)
    index, unique = _runs(step_ids, step_ids >= 0)
    diff = (s - t).abs().to(torch.promote_types(s.dtype, torch.float32))
    return _run_mean(diff, index, len(unique)), index


@dataclass
class StepWeights:
    """SOD weights of a batch of trajectories, per token and per step (for logging)."""

    token_weights: torch.Tensor  # (N,) weight of each token's step; 0 for ignored tokens
    step_sequence: torch.Tensor  # (M,) sequence of each step
    step_id: torch.Tensor  # (M,) its step id within the sequence
    divergence: torch.Tensor  # (M,) d_k
    weight: torch.Tensor  # (M,) w_k


def batched_step_weights(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, step_ids: torch.Tensor,
    sequence_ids: torch.Tensor, delta: float = 0.2, eps: float = 1e-6, reference: str = "first",
    min_weight: float = 0.0, min_reference: float = 0.0,
) -> StepWeights:
    """SOD over many trajectories packed into flat (N,) tensors, with grouped (index_add) ops only.

    student_logprobs, teacher_logprobs: (N,); step_ids: (N,) long, -1 = ignored;
    sequence_ids: (N,) long, the trajectory of each token (any non-negative ids).
    A step is a (sequence, step id) pair; steps are ordered by step id within a sequence.
    min_weight, min_reference: the floors of `sod_weights` (0 = off).
    """
    s, t = student_logprobs.detach(), teacher_logprobs.detach()
    step_ids = torch.as_tensor(step_ids, dtype=torch.long, device=s.device)
    sequence_ids = torch.as_tensor(sequence_ids, dtype=torch.long, device=s.device)
    valid = step_ids >= 0
    width = max(int(step_ids.max().item()) if len(step_ids) else 0, 0) + 1
    keys = sequence_ids * width + step_ids.clamp(min=0)  # sorts by (sequence, step)
    index, unique = _runs(keys, valid)
    m = len(unique)
    diff = (s - t).abs().to(torch.promote_types(s.dtype, torch.float32))
    d = _run_mean(diff, index, m)  # (M,)
    seq, step = unique // width, unique % width
    is_first = torch.ones(m, dtype=torch.bool, device=d.device)
    is_first[1:] = seq[1:] != seq[:-1]
    pos = torch.arange(m, device=d.device)
    start = torch.where(is_first, pos, torch.zeros_like(pos)).cummax(0).values  # (M,)
    w = _weights_from_steps(d, is_first, start, delta, eps, reference, min_weight, min_reference)
    token_w = diff.new_zeros(len(diff))
    token_w[valid] = w[index[valid]]
    return StepWeights(token_w, seq, step, d, w)


def batched_sod_weights(
    per_token_student_lp: torch.Tensor, per_token_teacher_lp: torch.Tensor, step_ids: torch.Tensor,
    sequence_ids: torch.Tensor, delta: float = 0.2, eps: float = 1e-6, reference: str = "first",
    min_weight: float = 0.0, min_reference: float = 0.0,
) -> torch.Tensor:
    """Per-token SOD weights (N,) of packed trajectories (see `batched_step_weights`)."""
    return batched_step_weights(
        per_token_student_lp, per_token_teacher_lp, step_ids, sequence_ids, delta, eps, reference,
        min_weight, min_reference,
    ).token_weights


def eos_step_id(step_ids: list[int], loss_mask: list[int] | None = None) -> int:
    """SOD step of the EOS that ends a response whose tokens have `step_ids` (T,) (-1 = none).

    EOS joins the step of the last token when that token is the model's; right after an
    observation (loss mask 0, or step id -1 without a mask) it is a step of its own, numbered
    after the last, as in the released code (module docstring). An EOS alone is step 0.
    """
    if not step_ids:
        return 0
    after_observation = loss_mask[-1] == 0 if loss_mask else step_ids[-1] < 0
    if after_observation:
        return max(step_ids) + 1
    return max(step_ids[-1], 0)


def delimiter_step_ids(
    token_byte_lengths: np.ndarray | list[int], text: str, delimiter: str = "\n\n"
) -> list[int]:
    """Step id of each token of a tool-free response cut at `delimiter`.

    token_byte_lengths: (T,) UTF-8 bytes of each token, summing to len(text.encode()).
    A new step starts right after each (non-overlapping) occurrence of the delimiter; the
    token holding its last byte stays in the earlier step. Token i, starting at byte s_i, is
    in step #{occurrences ending at or before s_i}; ids are then made dense (0, 1, ...), so a
    token swallowing two delimiters does not leave a gap.
    """
    lengths = np.asarray(token_byte_lengths, dtype=np.int64)
    data, sep = text.encode("utf-8"), delimiter.encode("utf-8")
    if int(lengths.sum()) != len(data):
        raise ValueError(
            f"token byte lengths sum to {int(lengths.sum())}, text has {len(data)} bytes"
        )
    if not sep:
        raise ValueError("delimiter must be non-empty")
    ends = np.fromiter((m.end() for m in re.finditer(re.escape(sep), data)), dtype=np.int64)
    starts = np.cumsum(lengths) - lengths  # (T,) first byte of each token
    raw = np.searchsorted(ends, starts, side="right")  # occurrences with end <= start
    return np.unique(raw, return_inverse=True)[1].reshape(-1).tolist()


def grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Group-normalised outcome advantage Â_i = (r_i − mean_g) / (std_g + eps).

    rewards: (N,) float; group_ids: (N,) long (responses to the same prompt share an id).
    std is the population std (correction 0), so a one-response group, or a group of identical
    rewards, gets Â = 0. (verl's GRPO uses the unbiased std and special-cases one-response
    groups to mean 0, std 1.) Combined in the module as
    A_t = outcome_coef · Â_i + opd_coef · w_k · (log π_T − log π_S).
    """
    r = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
    group_ids = torch.as_tensor(group_ids, dtype=torch.long, device=r.device)
    _, index = torch.unique(group_ids, return_inverse=True)
    m = int(index.max().item()) + 1 if len(index) else 0
    mean = _run_mean(r, index, m)[index]
    var = _run_mean((r - mean) ** 2, index, m)[index]
    return (r - mean) / (var.sqrt() + eps)
