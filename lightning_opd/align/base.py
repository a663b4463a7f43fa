"""The alignment interface: segments -> supervision rows -> per-row losses, and the registry.

One training batch, after scoring, is a `ScoredBatch`: for each side (student, teacher) the
logits at the response positions of every sequence, packed without padding into (N, V), and
the response token ids (N,). Position p of the packed tensor holds the logits that *predict*
token ids[p].

Alignment happens in two steps:
1. `align_batch` turns each response into `SequenceSegments` (see offsets.py) and packs them
   into one `Segments` of the batch, with positions already in packed coordinates.
2. An `Aligner` (registered by name) turns segments into `Rows` and rows into per-row losses.
   A row compares one student distribution with one teacher distribution over one support
   (for `exact`: V∩ at a shared-token position). `Rows.members` lists every student and
   teacher token a row covers, which gives the sampled form (sum of the unit's log-probs) and
   coverage (supervised student tokens) without knowing the aligner.

A new aligner is a file with `@register_aligner("name")` and a class implementing `build_rows`
(and `row_losses` when its comparison is not the default full/sampled form over V∩).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from lightning_opd import losses
from lightning_opd.align.offsets import SequenceSegments
from lightning_opd.align.vocab import SharedVocab


@dataclass
class ScoredSide:
    """One model's view of the batch's responses, packed (no padding)."""

    logits: torch.Tensor  # (N, V) logits predicting each response token
    ids: torch.Tensor  # (N,) long, the response tokens (EOS included where generated)
    offsets: torch.Tensor  # (B+1,) long, sequence b owns packed positions [offsets[b], offsets[b+1])


@dataclass
class ScoredBatch:
    student: ScoredSide
    teacher: ScoredSide
    vocab: SharedVocab


@dataclass
class Segments:
    """All segments of a batch, in packed positions. Segment g: student [s_lo, s_hi),
    teacher [t_lo, t_hi), of sequence `seq`. Only valid segments are kept."""

    seq: torch.Tensor  # (G,) long
    s_lo: torch.Tensor  # (G,) long
    s_hi: torch.Tensor
    t_lo: torch.Tensor
    t_hi: torch.Tensor
    # the model's own response tokens in the batch, EOS included, tool observations (loss mask 0)
    # not: the default loss normaliser and the coverage denominator
    n_student_tokens: int
    n_invalid_tokens: int = 0  # student tokens touching invalid UTF-8
    n_unaligned_sequences: int = 0  # sequences whose texts disagreed (normalising tokenizers)

    @property
    def is_shared_token(self) -> torch.Tensor:  # (G,) bool: one token on each side
        return (self.s_hi - self.s_lo == 1) & (self.t_hi - self.t_lo == 1)

    def select(self, keep: torch.Tensor) -> Segments:
        return Segments(
            self.seq[keep], self.s_lo[keep], self.s_hi[keep], self.t_lo[keep], self.t_hi[keep],
            self.n_student_tokens, self.n_invalid_tokens, self.n_unaligned_sequences,
        )  # fmt: skip


@dataclass
class Rows:
    """Supervision rows. Row r compares the student distribution at packed position
    `student_pos[r]` with the teacher's at `teacher_pos[r]`; `s_members`/`t_members` list the
    tokens the row covers (flat, with `s_member_row`/`t_member_row` giving their row)."""

    student_pos: torch.Tensor  # (R,) long
    teacher_pos: torch.Tensor  # (R,) long
    s_members: torch.Tensor  # (Ms,) long, packed student positions
    s_member_row: torch.Tensor  # (Ms,) long
    t_members: torch.Tensor  # (Mt,) long
    t_member_row: torch.Tensor  # (Mt,) long
    weight: torch.Tensor = field(default_factory=lambda: torch.ones(0))  # (R,) float

    def __post_init__(self) -> None:
        if self.weight.numel() != self.student_pos.numel():
            self.weight = torch.ones(self.student_pos.numel())

    def __len__(self) -> int:
        return int(self.student_pos.numel())

    def to(self, device: torch.device | str) -> Rows:
        """The same rows with every index tensor on `device` (where the logits live)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)}
        return Rows(**moved)

    @property
    def supervised_student_tokens(self) -> int:
        return int(self.s_members.numel())

    @property
    def is_span(self) -> torch.Tensor:  # (R,) bool: more than one token on either side
        rows = len(self)
        s_count = torch.bincount(self.s_member_row, minlength=rows)
        t_count = torch.bincount(self.t_member_row, minlength=rows)
        return (s_count > 1) | (t_count > 1)


def range_members(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position of the ranges [lo[g], hi[g]) in order, and the g it belongs to: two (M,) long
    tensors, M = Σ (hi - lo). In numpy, which never opens a parallel region: torch's
    repeat_interleave does for any size (see `single_threaded`)."""
    lo_np, hi_np = lo.cpu().numpy(), hi.cpu().numpy()
    count = hi_np - lo_np  # (G,)
    row = np.repeat(np.arange(len(count), dtype=np.int64), count)  # (M,)
    first = np.repeat(lo_np - np.cumsum(count) + count, count)  # (M,) lo[g] - (members before g)
    return torch.from_numpy(first + np.arange(len(row), dtype=np.int64)), torch.from_numpy(row)


def rows_from_segments(seg: Segments) -> Rows:
    """One row per segment, anchored at the first token of each side, covering all its tokens."""
    s_members, s_row = range_members(seg.s_lo, seg.s_hi)
    t_members, t_row = range_members(seg.t_lo, seg.t_hi)
    return Rows(seg.s_lo, seg.t_lo, s_members, s_row, t_members, t_row)


@dataclass
class LossSettings:
    """What the aligner needs from `LossConfig`, as plain values (losses take no config)."""

    form: str = "full"  # full | sampled
    divergence: str = "rkl"
    beta: float = 0.5
    temperature: float = 1.0
    chunk_rows: int = 512


class Aligner:
    """Base aligner: full form over V∩ at the row's anchor positions, or the sampled form."""

    name: str = "base"

    def __init__(self, **options) -> None:
        self.options = options

    def build_rows(self, seg: Segments, batch: ScoredBatch) -> Rows:
        raise NotImplementedError

    def row_losses(self, rows: Rows, batch: ScoredBatch, settings: LossSettings) -> torch.Tensor:
        """Per-row loss (R,), differentiable w.r.t. the student logits."""
        if settings.form == "sampled":
            return sampled_row_losses(rows, batch, settings.temperature)
        return self.full_row_losses(rows, batch, settings)

    def full_row_losses(self, rows: Rows, batch: ScoredBatch, settings: LossSettings) -> torch.Tensor:
        return chunked(
            len(rows), settings.chunk_rows,
            lambda sl: losses.full_divergence(
                *shared_vocab_logits(rows, batch, sl),
                kind=settings.divergence, beta=settings.beta, temperature=settings.temperature,
            ),
        )  # fmt: skip


def chunked(n_rows: int, chunk: int, fn: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """Apply fn to row slices of at most `chunk` rows and concatenate: bounds the (chunk, U)
    row-logit tensors alive at once, in the forward pass and in the backward pass.

    With more than one chunk and autograd on, each chunk runs under activation checkpointing:
    autograd would otherwise keep every chunk's saved (chunk, U) tensors (log-softmaxes, exps)
    until backward, so memory would grow with the number of rows whatever the chunk size. Each
    chunk is recomputed in backward instead, one at a time (one extra forward of the loss, which
    is cheap next to the models). The values and gradients are the same (tests/test_chunked_loss.py).
    """
    if n_rows == 0:
        return fn(slice(0, 0))
    step = max(int(chunk), 1)
    slices = [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]
    if len(slices) == 1 or not torch.is_grad_enabled():
        return torch.cat([fn(sl) for sl in slices])
    from torch.utils.checkpoint import checkpoint

    return torch.cat([checkpoint(fn, sl, use_reentrant=False) for sl in slices])


def shared_vocab_logits(
    rows: Rows, batch: ScoredBatch, sl: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits over V∩ at the anchors of rows[sl]: two (r, |V∩|) tensors."""
    zs = batch.student.logits[rows.student_pos[sl]]  # (r, V_S)
    zt = batch.teacher.logits[rows.teacher_pos[sl]]  # (r, V_T)
    if batch.vocab.identity:
        return zs, zt
    return zs[:, batch.vocab.student_ids], zt[:, batch.vocab.teacher_ids]


def unit_logprobs(side: ScoredSide, members: torch.Tensor, member_row: torch.Tensor, rows: int,
                  temperature: float) -> torch.Tensor:  # fmt: skip
    """Σ of log π(token) over each row's member tokens, full vocabulary: (rows,)."""
    token_lp = losses.token_logprobs(side.logits[members], side.ids[members], temperature)
    return torch.zeros(rows, dtype=token_lp.dtype, device=token_lp.device).index_add(
        0, member_row, token_lp
    )


def sampled_row_losses(rows: Rows, batch: ScoredBatch, temperature: float) -> torch.Tensor:
    """Sampled form: advantage = log π_T(unit) − log π_S(unit), each the sum over the unit's
    tokens under its own model's full vocabulary."""
    n = len(rows)
    student_lp = unit_logprobs(batch.student, rows.s_members, rows.s_member_row, n, temperature)
    with torch.no_grad():
        teacher_lp = unit_logprobs(batch.teacher, rows.t_members, rows.t_member_row, n, temperature)
    return losses.sampled_policy_gradient(student_lp, teacher_lp)


ALIGNERS: dict[str, type[Aligner]] = {}


_OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()


def single_threaded(fn: Callable) -> Callable:
    """Run `fn` with one torch intra-op thread. Row building is bookkeeping on index tensors of a
    few thousand entries, where torch still opens parallel regions (advanced indexing from ~4k
    entries, repeat_interleave always); when the cores are busy each region waits a scheduler
    slice for its second thread: 5 ms for a 4k-entry gather instead of 0.02 ms (measured on 2
    loaded cores, docs/performance.md). The thread count is restored afterwards. Only with the
    OpenMP backend (Linux and macOS wheels): torch's native backend cannot change it once used."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1 or not _OPENMP:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def register_aligner(name: str) -> Callable[[type[Aligner]], type[Aligner]]:
    """Register an aligner class under `name`; its own `build_rows` runs `single_threaded`."""

    def decorator(cls: type[Aligner]) -> type[Aligner]:
        if name in ALIGNERS:
            raise ValueError(f"aligner '{name}' registered twice")
        cls.name = name
        if "build_rows" in vars(cls):
            cls.build_rows = single_threaded(vars(cls)["build_rows"])
        ALIGNERS[name] = cls
        return cls

    return decorator


def build_aligner(name: str, **options) -> Aligner:
    from lightning_opd import align  # noqa: F401  (imports every aligner module, filling ALIGNERS)

    if name not in ALIGNERS:
        raise ValueError(f"aligner.name={name!r} is not registered; choose from {sorted(ALIGNERS)}")
    return ALIGNERS[name](**options)


def pack_segments(per_sequence: list[SequenceSegments | None], s_offsets: np.ndarray,
                  t_offsets: np.ndarray, model_tokens: list[int] | None = None) -> Segments:  # fmt: skip
    """Stack per-sequence segments (None = unaligned sequence) into packed positions.

    s_offsets, t_offsets: (B+1,) packed offsets of each side's responses. model_tokens: (B,) the
    model's own tokens of each response (`SegmentedResponses.model_tokens`); without it, an
    aligned sequence counts its `n_model` and an unaligned one all its positions.
    """
    parts: list[np.ndarray] = []
    n_student = n_invalid = n_unaligned = 0
    for b, ss in enumerate(per_sequence):
        if model_tokens is not None:
            n_student += int(model_tokens[b])
        else:
            n_student += ss.n_model if ss is not None else int(s_offsets[b + 1] - s_offsets[b])
        if ss is None:
            n_unaligned += 1
            continue
        n_invalid += ss.n_invalid
        keep = ss.valid
        g = int(keep.sum())
        parts.append(
            np.stack([
                np.full(g, b),
                ss.s_bounds[:-1][keep] + s_offsets[b], ss.s_bounds[1:][keep] + s_offsets[b],
                ss.t_bounds[:-1][keep] + t_offsets[b], ss.t_bounds[1:][keep] + t_offsets[b],
            ])
        )  # fmt: skip
    cols = torch.from_numpy(np.concatenate(parts, axis=1) if parts else np.zeros((5, 0), np.int64))
    cols = cols.long()
    return Segments(cols[0], cols[1], cols[2], cols[3], cols[4], n_student, n_invalid, n_unaligned)
