"""The alignment interface: segments -> supervision rows -> per-row losses, and the registry.

Vocabulary: a *response* is one sampled completion; a *segment* is a stretch of a response
where student and teacher tokens cover the same bytes (`SequenceSegments` for one response,
`BatchSegments` for a batch packed together); a *row* (`Rows`) is one supervision row.

One training batch, after scoring, is a `ScoredBatch`: for each side (student, teacher) the
logits at the response positions of every sequence, packed without padding into (N, V), and
the response token ids (N,). Position p of the packed tensor holds the logits that *predict*
token ids[p].

Alignment happens in two steps:
1. `align_batch` (pairing.py) turns each response into `SequenceSegments` (see offsets.py) and
   packs them (`pack_segments`) into one `BatchSegments`, with positions in packed coordinates.
2. An `Aligner` (registered by name) turns segments into `Rows` and rows into per-row losses.
   A row compares one student distribution with one teacher distribution over one support
   (for `exact`: V∩ at a shared-token position). `Rows.members` lists every student and
   teacher token a row covers, which gives the sampled form (sum of the unit's log-probs) and
   coverage (supervised student tokens) without knowing the aligner.

A new aligner is a file with `@register_aligner("name")` and a class implementing `build_rows`
(and `full_row_losses` when its comparison is not the default full form over V∩; then also
`teacher_mass` and `vocab_reached`, the diagnostics of how much of the teacher's probability its
comparison lets through, which default to the V∩ form). Its options
are typed fields of `AlignerConfig` (config.py), the one place their defaults are written; the
loss settings arrive as the `LossConfig`. An aligner that reads only some of the teacher's
vocabulary says which ids in `teacher_columns` (None by default: all of them), and the teacher is
then scored over those columns only (align/columns.py, `ScoredSide.restricted`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from lightning_opd import losses
from lightning_opd.align.offsets import SequenceSegments
from lightning_opd.align.vocab import SharedVocab
from lightning_opd.config import AlignerConfig, LossConfig
from lightning_opd.threads import cpu_threads

if TYPE_CHECKING:  # pairing.py imports this module
    from lightning_opd.align.pairing import TokenizerPair


@dataclass
class ScoredSide:
    """One model's view of the batch's responses, packed (no padding).

    A *restricted* side (`columns` set, align/columns.py) holds the logits of a few vocabulary
    ids only: (N, C), column j being id `columns[j]`, with the full vocabulary's log-normaliser
    at the loss temperature beside them (`normaliser`), so that the log-probabilities of the
    sampled tokens and the softmax share of any set of columns are still the full vocabulary's.
    Code that may see one reads the logits of a vocabulary id through `column`, and
    log-probabilities through `token_logprobs` and `log_normaliser`, which work on both kinds;
    an aligner that reads every column of a row (a softmax over V, a top-k) gets a full side
    (`Aligner.teacher_columns` returns None) and says so with `require_full_vocabulary`."""

    logits: torch.Tensor  # (N, V) logits predicting each response token; (N, C) when restricted
    ids: torch.Tensor  # (N,) long, the response tokens (EOS included where generated): vocabulary ids
    offsets: torch.Tensor  # (B+1,) long, sequence b owns packed positions [offsets[b], offsets[b+1])
    # restricted sides only: (C,) long ascending, the vocabulary id of each logit column
    columns: torch.Tensor | None = None
    # restricted sides only: (N,) float32, logsumexp over the FULL vocabulary of z / temperature
    normaliser: torch.Tensor | None = None
    temperature: float = 1.0  # the τ of `normaliser`

    @property
    def restricted(self) -> bool:
        return self.columns is not None

    def column(self, vocab_ids: torch.Tensor) -> torch.Tensor:
        """The logit column of each vocabulary id (any shape): the ids themselves on a full side.
        On a restricted side every id must be one of `columns`: the scorer keeps the ids the
        aligner declared (`Aligner.teacher_columns`) and every response token."""
        if self.columns is None:
            return vocab_ids
        return torch.searchsorted(self.columns, vocab_ids.to(self.columns.device))

    def log_normaliser(self, positions: torch.Tensor, temperature: float) -> torch.Tensor:
        """logsumexp over the full vocabulary of z_p / τ at each position, (r,) float32."""
        if self.normaliser is None:
            return torch.logsumexp(self.logits[positions].float() / temperature, dim=-1)
        if temperature != self.temperature:
            raise ValueError(f"this side's log-normaliser was computed at temperature {self.temperature}, "
                             f"not {temperature}: score it at the loss temperature")  # fmt: skip
        return self.normaliser[positions.to(self.normaliser.device)]

    def token_logprobs(self, positions: torch.Tensor, temperature: float) -> torch.Tensor:
        """log softmax(z_p / τ) over the full vocabulary at the sampled token ids[p], (r,) float32
        (differentiable w.r.t. the logits of a full side)."""
        if self.columns is None:
            return losses.token_logprobs(self.logits[positions], self.ids[positions], temperature)
        positions = positions.to(self.logits.device)
        chosen = self.logits[positions, self.column(self.ids[positions])].float() / temperature
        return chosen - self.log_normaliser(positions, temperature)


def require_full_vocabulary(side: ScoredSide, aligner: str) -> None:
    """Refuse a restricted side where every column of a row is read (a softmax over V, a top-k)."""
    if side.restricted:
        raise ValueError(f"aligner {aligner!r} reads the whole vocabulary of its rows, but got logits over "
                         f"{len(side.columns)} columns; its teacher_columns must return None")  # fmt: skip


@dataclass
class ScoredBatch:
    student: ScoredSide
    teacher: ScoredSide
    vocab: SharedVocab


@dataclass
class BatchSegments:
    """All segments of a batch, in packed positions. Segment g: student [s_lo, s_hi),
    teacher [t_lo, t_hi), of response `seq`. Only valid segments are kept."""

    seq: torch.Tensor  # (G,) long
    s_lo: torch.Tensor  # (G,) long
    s_hi: torch.Tensor
    t_lo: torch.Tensor
    t_hi: torch.Tensor
    # the model's own response tokens in the batch, EOS included, tool observations (loss mask 0)
    # not: the default loss normaliser and the coverage denominator
    n_student_tokens: int
    n_invalid_tokens: int = 0  # student tokens touching invalid UTF-8
    n_unaligned_sequences: int = 0  # responses whose texts disagreed (normalising tokenizers)
    # where segments close (`aligner.boundary`): match (1:1 tokens) | offset (common boundaries);
    # aligners that pick 1:1 matches read it here, from the segments they were given
    boundary: str = AlignerConfig.boundary
    # (G,) bool: the segment's last student token s_hi-1 and last teacher token t_hi-1 are a 1:1
    # match (same non-empty byte span, or EOS with EOS; `SequenceSegments.closes_on_match`).
    # None (hand-built segments) is filled from what the boundary alone guarantees: every segment
    # under "match" (true without observation edges), the one-token segments under "offset"
    closes_on_match: torch.Tensor | None = None
    # byte length of every packed student (N_S,) and teacher (N_T,) response token (EOS: 0), for
    # aligners that work at byte offsets inside segments (`bpm`); filled by `align_batch`
    s_token_bytes: torch.Tensor | None = None
    t_token_bytes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.closes_on_match is None:
            if self.boundary == "match":
                self.closes_on_match = torch.ones(len(self.seq), dtype=torch.bool)
            else:
                self.closes_on_match = self.is_shared_token

    @property
    def is_shared_token(self) -> torch.Tensor:  # (G,) bool: one token on each side
        return (self.s_hi - self.s_lo == 1) & (self.t_hi - self.t_lo == 1)

    def select(self, keep: torch.Tensor) -> BatchSegments:
        return replace(self, seq=self.seq[keep], s_lo=self.s_lo[keep], s_hi=self.s_hi[keep],
                       t_lo=self.t_lo[keep], t_hi=self.t_hi[keep],
                       closes_on_match=self.closes_on_match[keep])  # fmt: skip


@dataclass
class Rows:
    """Supervision rows. Row r compares the student distribution at packed position
    `student_pos[r]` with the teacher's at `teacher_pos[r]`; `s_members`/`t_members` list the
    tokens the row covers (flat, with `s_member_row`/`t_member_row` giving their row). Row
    weights are not part of the rows: they are passed to `losses.reduce_rows` as a value."""

    student_pos: torch.Tensor  # (R,) long
    teacher_pos: torch.Tensor  # (R,) long
    s_members: torch.Tensor  # (Ms,) long, packed student positions
    s_member_row: torch.Tensor  # (Ms,) long
    t_members: torch.Tensor  # (Mt,) long
    t_member_row: torch.Tensor  # (Mt,) long

    def __len__(self) -> int:
        return int(self.student_pos.numel())

    def to(self, device: torch.device | str) -> Rows:
        """The same rows with every index tensor on `device` (where the logits live)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)}
        return type(self)(**moved)  # subclasses (`BPMRows`) keep their extra fields

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


def rows_from_segments(seg: BatchSegments) -> Rows:
    """One row per segment, anchored at the first token of each side, covering all its tokens."""
    s_members, s_row = range_members(seg.s_lo, seg.s_hi)
    t_members, t_row = range_members(seg.t_lo, seg.t_hi)
    return Rows(seg.s_lo, seg.t_lo, s_members, s_row, t_members, t_row)


def one_to_one_rows(seg: BatchSegments) -> Rows:
    """One row per 1:1 match: the last student and last teacher token of every segment that
    closes on one (`BatchSegments.closes_on_match`), each row covering just those two tokens.
    Every 1:1 match of a response closes a segment (offsets.py), under either boundary, so these
    are all of them: the shared-token positions."""
    closing = seg.select(seg.closes_on_match)
    student_pos, teacher_pos = closing.s_hi - 1, closing.t_hi - 1  # (R,) each
    row = torch.arange(len(student_pos))  # (R,): one member token per side per row
    return Rows(
        student_pos, teacher_pos, student_pos.clone(), row, teacher_pos.clone(), row.clone()
    )


class Aligner:
    """Base aligner: full form over V∩ at the row's anchor positions, or the sampled form.

    `options` is the `aligner` section of the config (validated there, see config.validate);
    `seed` seeds aligners that draw at random."""

    name: str = "base"

    def __init__(self, options: AlignerConfig, seed: int = 0) -> None:
        self.options = options
        self.seed = seed

    def build_rows(self, seg: BatchSegments, batch: ScoredBatch | None) -> Rows:
        raise NotImplementedError

    def row_losses(self, rows: Rows, batch: ScoredBatch, loss: LossConfig) -> torch.Tensor:
        """Per-row loss (R,), differentiable w.r.t. the student logits."""
        if loss.form == "sampled":
            return sampled_row_losses(rows, batch, loss.temperature)
        return self.full_row_losses(rows, batch, loss)

    def full_row_losses(self, rows: Rows, batch: ScoredBatch, loss: LossConfig) -> torch.Tensor:
        return shared_vocab_divergence(rows, batch, loss)

    # --- diagnostics: where V∩ drops the teacher's probability ----------------------------------
    def teacher_mass(self, rows: Rows, batch: ScoredBatch, loss: LossConfig) -> torch.Tensor | None:
        """Per row, (R,) float32, no grad: the share of the teacher's full-vocabulary probability
        q = softmax(z^T / τ) at the row's teacher anchor that reaches the student's side of the
        comparison. Here (a comparison over V∩): Σ_{v ∈ V∩} q(v), exactly 1 with identical
        tokenizers. None where the aligner compares no distributions over alternatives."""
        return shared_vocab_mass(rows, batch, loss)

    def vocab_reached(self, pair: TokenizerPair) -> float | None:
        """Structural, no models: the share of the teacher's vocabulary ids whose probability can
        reach the student, for a `TokenizerPair`. Here |V∩| / |V_T| (1.0 for identical
        tokenizers); None where the aligner compares no distributions over alternatives."""
        if pair.vocab.identity:
            return 1.0
        return len(pair.vocab) / max(len(pair.teacher_bytes.table), 1)

    # --- what the teacher's logits are needed for (align/columns.py) ----------------------------
    def teacher_columns(self, vocab: SharedVocab, loss: LossConfig) -> torch.Tensor | None:
        """The teacher vocabulary ids whose logits this aligner's loss and `teacher_mass` read,
        besides the response tokens' own (always kept) and the full-vocabulary log-normaliser
        (always computed): (C,) long, or None for every id. With a tensor the frozen teacher is
        scored over those columns only (`loss.restrict_teacher_columns`), (N, C) instead of (N, V_T).

        None here, which is always right: an aligner declares less only when every teacher
        quantity it reads goes through `ScoredSide.column` / `token_logprobs` /
        `log_normaliser` (tests/test_teacher_columns.py checks each declaring aligner against
        the full vocabulary)."""
        return None


def shared_vocab_mass(rows: Rows, batch: ScoredBatch, loss: LossConfig) -> torch.Tensor:
    """Σ_{v ∈ V∩_T} softmax(z^T / τ)(v) at each row's teacher anchor, (R,) float32, no grad.

    Computed as exp(logsumexp over V∩ − logsumexp over V_T), a few rows at a time
    (`losses.gathered_logsumexp`): never an (R, V_T) float32 copy; a restricted side has the
    full-vocabulary logsumexp stored. With identical tokenizers V∩ is the whole
    vocabulary, so the mass is 1 without reading the logits."""
    teacher = batch.teacher
    device = teacher.logits.device
    if batch.vocab.identity:
        return torch.ones(len(rows), dtype=torch.float32, device=device)
    shared_columns = teacher.column(batch.vocab.teacher_ids.to(device))  # (|V∩|,)
    tau = loss.temperature

    pos = rows.teacher_pos.to(device)
    with torch.no_grad():  # a diagnostic; a few rows of (r, |V∩|) at a time (losses.BLOCK_BYTES)
        shared = losses.gathered_logsumexp(teacher.logits, pos, shared_columns, tau)  # (R,)
        # a restricted side's columns are not the whole vocabulary: its normaliser comes with it
        total = teacher.log_normaliser(pos, tau) if teacher.restricted else losses.gathered_logsumexp(teacher.logits, pos, None, tau)
        return torch.exp(shared - total).clamp(max=1.0)


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


def shared_vocab_divergence(rows: Rows, batch: ScoredBatch, loss: LossConfig, student_slot: torch.Tensor | None = None,
                            teacher_slot: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The full-form divergence of every row over V∩ at its anchors, (R,): `full_divergence` of the
    rows of `shared_vocab_logits`, each with the row's extra slot appended when slots are given
    ((R,) each, -inf = masked; simct's span slot), computed by `losses.gathered_divergence`, which
    gathers the rows a few at a time and never holds the (R, |V∩|) logit rows.

    Memory: fkl and rkl keep one (R, |V∩|) float32 tensor for the backward pass (the gradient of
    the rows). When that fits in `loss.keep_rows_mib` every row runs at once and nothing is
    recomputed; above it the rows run in chunks of `loss.chunk_rows`, each recomputed in backward
    (`chunked`), so the kept memory is a chunk's. jsd goes through `full_divergence` per chunk."""
    student, teacher = batch.student, batch.teacher
    device = student.logits.device
    s_cols = t_cols = None
    if not (batch.vocab.identity and not (student.restricted or teacher.restricted)):
        s_cols = student.column(batch.vocab.student_ids.to(device)).to(device)
        t_cols = teacher.column(batch.vocab.teacher_ids.to(teacher.logits.device)).to(teacher.logits.device)
    width = student.logits.shape[-1] if s_cols is None else len(s_cols)

    def run(sl: slice) -> torch.Tensor:
        return losses.gathered_divergence(
            student.logits, rows.student_pos[sl], s_cols, teacher.logits, rows.teacher_pos[sl].to(teacher.logits.device),
            t_cols, divergence=loss.divergence, beta=loss.beta, temperature=loss.temperature,
            student_slot=None if student_slot is None else student_slot[sl],
            teacher_slot=None if teacher_slot is None else teacher_slot[sl],
        )  # fmt: skip

    n = len(rows)
    if n and loss.divergence in ("fkl", "rkl") and n * width * 4 <= loss.keep_rows_mib * 2**20:
        return run(slice(0, n))
    return chunked(n, loss.chunk_rows, run)


def shared_vocab_logits(
    rows: Rows, batch: ScoredBatch, sl: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits over V∩ at the anchors of rows[sl]: two (r, |V∩|) tensors."""
    student, teacher = batch.student, batch.teacher
    zs = student.logits[rows.student_pos[sl]]  # (r, V_S)
    zt = teacher.logits[rows.teacher_pos[sl]]  # (r, V_T), or (r, C) on a restricted side
    if batch.vocab.identity and not (student.restricted or teacher.restricted):
        return zs, zt
    return zs[:, student.column(batch.vocab.student_ids)], zt[:, teacher.column(batch.vocab.teacher_ids)]


def unit_logprobs(side: ScoredSide, members: torch.Tensor, member_row: torch.Tensor, rows: int,
                  temperature: float) -> torch.Tensor:  # fmt: skip
    """Σ of log π(token) over each row's member tokens, full vocabulary: (rows,)."""
    token_lp = side.token_logprobs(members, temperature)  # (M,)
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



def single_threaded(fn: Callable) -> Callable:
    """Run `fn` with one torch intra-op thread. Row building is bookkeeping on index tensors of a
    few thousand entries, where torch still opens parallel regions (advanced indexing from ~4k
    entries, repeat_interleave always); when the cores are busy each region waits a scheduler
    slice for its second thread: 5 ms for a 4k-entry gather instead of 0.02 ms (measured on 2
    loaded cores, docs/performance.md). The thread count is restored afterwards. Only with the
    OpenMP backend (Linux and macOS wheels): torch's native backend cannot change it once used."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with cpu_threads(1):
            return fn(*args, **kwargs)

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


def registered_aligners() -> dict[str, type[Aligner]]:
    """Every registered aligner by name (importing the package registers them all)."""
    from lightning_opd import align  # noqa: F401  (imports every aligner module, filling ALIGNERS)

    return ALIGNERS


def build_aligner(options: AlignerConfig | str, seed: int = 0) -> Aligner:
    """The aligner `options.name` with these options; a bare name takes every default of
    `AlignerConfig`, as the config schema writes them."""
    if isinstance(options, str):
        options = AlignerConfig(name=options)
    aligners = registered_aligners()
    if options.name not in aligners:
        raise ValueError(f"aligner.name={options.name!r} is not registered; choose from {sorted(aligners)}")
    return aligners[options.name](options, seed)


def pack_segments(per_response: list[SequenceSegments | None], s_offsets: np.ndarray,
                  t_offsets: np.ndarray, model_tokens: list[int] | None = None,
                  boundary: str = AlignerConfig.boundary) -> BatchSegments:  # fmt: skip
    """Stack each response's segments (None = unaligned response) into packed positions.

    s_offsets, t_offsets: (B+1,) packed offsets of each side's responses. model_tokens: (B,) the
    model's own tokens of each response (`SegmentedResponses.model_tokens`); without it, an
    aligned response counts its `n_model` and an unaligned one all its positions. boundary:
    where the segments were closed (recorded for the aligners).
    """
    parts: list[np.ndarray] = []
    n_student = n_invalid = n_unaligned = 0
    for b, ss in enumerate(per_response):
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
    closes = [ss.closes_on_match[ss.valid] for ss in per_response if ss is not None]  # (g,) each
    closes_on_match = torch.from_numpy(np.concatenate(closes) if closes else np.zeros(0, bool))
    return BatchSegments(cols[0], cols[1], cols[2], cols[3], cols[4], n_student, n_invalid, n_unaligned,
                         boundary, closes_on_match)  # fmt: skip
