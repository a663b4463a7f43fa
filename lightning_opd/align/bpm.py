"""`bpm`: byte-prefix marginalisation (BPM, arXiv 2607.22334), a mass-preserving aligner.

V∩ aligners (exact, simct) compare the two models over the shared vocabulary only: teacher
probability on tokens outside V∩ is dropped, and where the tokenizers cut numbers differently
that is most of the teacher's probability at exactly the positions that matter (the teacher's
`13` is not a student token). BPM instead carries every teacher token's probability over to
the student token a student would write first for the same bytes.

Notation. B(v) is the byte string of token v. LP(w) is the longest student token whose bytes
are a prefix of w (projection.py). q_k = softmax(z^T_k / τ) is the teacher's distribution at
teacher position k (predicting teacher token t_k), p_i = softmax(z^S_i / τ) the student's at
student position i (predicting s_i). A student token is *student-only* when no teacher token
has its bytes.

Rows. One row per student model token s_i (EOS included), wherever the segment holding it
covers the same bytes on both sides (align_batch's segments; a segment whose byte lengths
disagree, under a normalising teacher, stays unsupervised). s_i starts at some byte of the
teacher token t_k that covers that byte, `w` bytes into it (w = 0 when the two tokenizations
share the boundary; w > 0 when the teacher's token is longer and the student is inside it).

The target distribution over the student's vocabulary at row (i, k, w) is the teacher's
probability of each student token being the first one cut from the teacher's continuation:

    w = 0:  π(u) = Σ_{v : LP(B(v)) = u} q_k(v)                      (and EOS_T -> EOS_S)
    w > 0:  π(u) = Σ_{v : B(v) starts with r, LP(B(v)[w:]) = u} q_k(v) / M(r),
            r = B(t_k)[:w] (the bytes of t_k already written), M(r) = Σ_{v starts with r} q_k(v)

so the teacher's `13` (teacher token longer than the student's) gives its probability to the
student's `1`, and at the student's next position, inside the teacher's `13`, the teacher's
conditional belief about the next byte given `1` becomes the student's target for `3`.

The other direction (teacher token shorter than the student's: the student has `123`, the
teacher writes `1`, `2`, `3`) needs the teacher's probability of byte strings longer than one of
its tokens. BPM chains the teacher's distributions along its *realized* tokens: the mass q_k(t_k)
of the realized token, when a student-only token extends its bytes, is split by q_{k+1}
over what comes next, recursively:

    chain(P, m, j):  for each v' at teacher position j:  m·q_j(v') goes to the longest
        student-only u with B(u) = P + a prefix of B(v'), else to LP(P); the realized t_j, if
        P + B(t_j) is still extended by a student-only token, recurses: chain(P + B(t_j), m·q_j(t_j), j+1)

Mass a row cannot place (a teacher control token other than EOS, a teacher token with no
student prefix, the teacher's `1` at w > 0 when the realized token was `12`: its continuation
is not known) is the *residual*. Nothing is dropped silently: 1 − residual is the row's teacher
mass (`train/teacher_mass`), and the target is renormalised over the student's vocabulary.

Loss. The full form is `loss.divergence` (rkl, fkl or jsd, as for every aligner) between p_i
and π over the student's whole vocabulary, log π taken as log TARGET_FLOOR where π is 0, so that reverse
KL stays finite where the projection puts no mass; the sampled form's advantage is
log π(s_i) − log p_i(s_i), one unit per student token. Rows are reduced as every aligner's
(losses.reduce_rows): one row per student token, so coverage is the share of student tokens
in byte-consistent segments (≥ 0.99 on the fixture pairs).

Identical tokenizers: LP(B(v)) = v, w = 0 everywhere and no token is student-only, so π = q_k and
the loss is plain OPD (equal to exact and simct; tests/test_align_bpm.py).

Where this departs from the paper and its released code (K1XE/BPM):
- *Chaining only into student-only tokens.* BPM marginalises over every byte continuation, so
  with identical tokenizers the realized `th` followed by `e` would move mass to `the`; we keep
  the teacher's own token probabilities for tokens both sides have (the teacher says how likely
  `the` is itself), which makes identical tokenizers exactly plain OPD.
- *No truncation at the chunk end.* The released code gives 0 to byte strings that run past the
  chunk of the realized alignment, which folds a teacher alternative `12` into `1` when the
  realized token was `1`; we let alternatives reach their own student token.
- *Dense teacher distributions*, not top-k: the level-0 projection is one scatter over the
  teacher's vocabulary; only chains and w > 0 rows walk tokens in Python.
- *Any divergence*, with the floor; BPM trains with forward KL (`loss.divergence=fkl` here).
- The residual is renormalised away and reported; BPM keeps it as an explicit "other" bucket
  compared with the student's mass outside the target.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from lightning_opd import losses
from lightning_opd.align.base import (
    Aligner,
    BatchSegments,
    Rows,
    ScoredBatch,
    chunked,
    range_members,
    register_aligner,
    require_full_vocabulary,
)
from lightning_opd.align.projection import Projection, projection_of
from lightning_opd.config import LossConfig

TARGET_FLOOR = 1e-8  # π below this counts as this in log π (reverse KL needs a support)


def log_target(pi: torch.Tensor) -> torch.Tensor:
    """log π, with log TARGET_FLOOR where π is 0 (any shape)."""
    return torch.where(
        pi > 0, torch.log(pi.clamp_min(1e-45)), torch.full_like(pi, np.log(TARGET_FLOOR))
    )


@dataclass
class BPMRows(Rows):
    """Rows of `bpm`: one per student token, plus where it starts inside the teacher's token."""

    within: torch.Tensor  # (R,) long: bytes of teacher token t_k written before s_i starts
    seq: torch.Tensor  # (R,) long: the response of each row (chains stop at its end)


def bpm_rows(seg: BatchSegments) -> BPMRows:
    """One row per student token of every byte-consistent segment (module docstring)."""
    if seg.s_token_bytes is None or seg.t_token_bytes is None:
        raise ValueError("bpm needs the token byte lengths that align_batch puts on the segments")
    s_len, t_len = seg.s_token_bytes.numpy(), seg.t_token_bytes.numpy()
    s_cum = np.concatenate([[0], np.cumsum(s_len)])  # (N_S+1,) exclusive byte offsets, packed
    t_cum = np.concatenate([[0], np.cumsum(t_len)])  # (N_T+1,)
    s_lo, s_hi, t_lo, t_hi = (x.numpy() for x in (seg.s_lo, seg.s_hi, seg.t_lo, seg.t_hi))
    s_total, t_total = s_cum[s_hi] - s_cum[s_lo], t_cum[t_hi] - t_cum[t_lo]  # (G,) bytes
    consistent = np.flatnonzero(s_total == t_total)  # (G',) the byte-consistent segments
    # every student token of those segments: (M,) packed positions and the segment of each
    pos, member_of = (x.numpy() for x in range_members(seg.s_lo[consistent], seg.s_hi[consistent]))
    g = consistent[member_of]
    # a token without bytes predicts nothing, except the EOS that closes a segment with the
    # teacher's EOS (a zero-length token last on both sides): its row is EOS against EOS
    closing = (pos == s_hi[g] - 1) & (t_len[t_hi[g] - 1] == 0)
    keep = (s_len[pos] > 0) | closing
    g, pos, closing = g[keep], pos[keep], closing[keep]
    # byte offset of each student token in the teacher's packed byte stream, and its token there
    x = t_cum[t_lo[g]] + (s_cum[pos] - s_cum[s_lo[g]])
    # the last teacher token starting at or before x
    k = np.searchsorted(t_cum[:-1], x, side="right") - 1
    k = np.where(closing, t_hi[g] - 1, k)
    within = np.where(closing, 0, x - t_cum[k])
    student_pos, teacher_pos = pos, k
    seq = seg.seq.numpy()[g]
    order = np.argsort(student_pos, kind="stable")
    sp, tp = (
        torch.from_numpy(np.ascontiguousarray(a[order])).long() for a in (student_pos, teacher_pos)
    )
    row = torch.arange(len(sp))
    return BPMRows(sp, tp, sp.clone(), row, tp.clone(), row.clone(),
                   torch.from_numpy(within[order]).long(), torch.from_numpy(seq[order]).long())  # fmt: skip


class _TeacherRows:
    """softmax(z^T_j / τ) of single teacher positions as float64 numpy, computed once each."""

    def __init__(self, logits: torch.Tensor, temperature: float) -> None:
        self.logits, self.temperature, self.cache = logits, temperature, {}

    def __call__(self, j: int) -> np.ndarray:
        if j not in self.cache:
            row = torch.softmax(self.logits[j].detach().double() / self.temperature, dim=-1)
            self.cache[j] = row.cpu().numpy()
        return self.cache[j]


def _chain(proj: Projection, q: _TeacherRows, t_ids: np.ndarray, prefix: bytes, mass: float,
           j: int, t_end: int, out: dict[int, float]) -> None:  # fmt: skip
    """Spread `mass` (the teacher's probability of the bytes `prefix`) over the student tokens
    the continuation starts with, through the teacher's distributions from position j on
    (module docstring, chain). Adds into out[student id]; -1 is the residual."""
    fallback = proj.longest_prefix(prefix)
    candidates = proj.extensions.get(prefix)
    nxt = int(t_ids[j]) if j < t_end else -1
    if not candidates or nxt < 0 or not proj.teacher_table[nxt]:
        out[fallback] = out.get(fallback, 0.0) + mass  # the continuation stops here (or is unknown)
        return
    q_j = q(j)
    ids, assign = proj.candidate_map(prefix)  # teacher ids -> the student-only token they extend to
    probs = q_j[ids] if len(ids) else np.zeros(0)
    probs = np.where(assign >= 0, probs, 0.0)
    extended = prefix + proj.teacher_table[nxt]
    through = extended in proj.extensions  # the realized token keeps a student-only token open
    if through:
        probs = np.where(ids == nxt, 0.0, probs)
    placed = probs > 0
    if placed.any():  # one sum per candidate, not one Python step per teacher token
        candidate, which = np.unique(assign[placed], return_inverse=True)
        sums = np.bincount(which, weights=probs[placed])
        for u, p in zip(candidate.tolist(), sums.tolist(), strict=True):
            out[u] = out.get(u, 0.0) + mass * p
    rest = 1.0 - float(probs.sum()) - (float(q_j[nxt]) if through else 0.0)
    out[fallback] = out.get(fallback, 0.0) + mass * max(rest, 0.0)
    if through:
        _chain(proj, q, t_ids, extended, mass * float(q_j[nxt]), j + 1, t_end, out)


def special_row_target(proj: Projection, q: _TeacherRows, t_ids: np.ndarray, k: int, w: int,
                       t_end: int) -> tuple[bool, dict[int, float]]:  # fmt: skip
    """The target of a row that the one-scatter projection does not give: (replace, entries).
    replace=True: the target is `entries` alone (w > 0); False: `entries` are corrections added
    to the scattered q_k (w = 0 with a chain). Keys are student ids, -1 the residual."""
    tv = int(t_ids[k])
    data = proj.teacher_table[tv]
    out: dict[int, float] = {}
    at = int(proj.flat_off[tv]) + w
    if w > 0:
        lo, hi = proj.prefix_range(data[:w])
        ids = proj.sorted_ids[lo:hi]
        q_k = q(k)[ids]
        total = float(q_k.sum())
        if total <= 0.0:
            return True, {-1: 1.0}
        inside = proj.teacher_lengths[ids] > w  # tokens equal to r: what follows them is not known (residual)
        lp = np.full(len(ids), -1, np.int64)
        lp[inside] = proj.flat_lp[proj.flat_off[ids[inside]] + w]
        sums = np.bincount(lp + 1, weights=q_k / total, minlength=1)
        nonzero = np.flatnonzero(sums)  # a few ids: no Python loop over the vocabulary
        out = dict(zip((nonzero - 1).tolist(), sums[nonzero].tolist(), strict=True))
        realized = float(q(k)[tv]) / total
    else:
        realized = float(q(k)[tv])
    if at < int(proj.flat_off[tv + 1]) and proj.flat_ext[at]:  # chain the realized token
        first = int(proj.flat_lp[at])
        out[first] = out.get(first, 0.0) - realized
        _chain(proj, q, t_ids, data[w:], realized, k + 1, t_end, out)
    return w > 0, out


@register_aligner("bpm")
class BPMAligner(Aligner):
    """Byte-prefix marginalisation: the teacher's whole distribution projected onto the
    student's vocabulary at every student token (module docstring)."""

    def build_rows(self, seg: BatchSegments, batch: ScoredBatch | None = None) -> BPMRows:
        return bpm_rows(seg)

    def target_of(self, rows: BPMRows, batch: ScoredBatch, temperature: float):
        """A function slice -> (π, reached): π (r, V_S) float32, the projected teacher
        distribution of rows[sl] renormalised over the student's vocabulary, and reached (r,),
        the teacher mass it kept (1 - residual). The rows that need more than the one scatter
        (w > 0, chains) are worked out here once, as sparse corrections, so the function is
        cheap to call again (activation checkpointing recomputes it in backward)."""
        # the loss and `teacher_mass` of one step share the corrections; the memo holds weak
        # references only, so nothing of a finished step (its logits above all) is kept alive
        memo = getattr(self, "_memo", None)
        if memo is not None and memo[0]() is rows and memo[1]() is batch and memo[2] == temperature:
            return memo[3]
        fn = self._target_of(rows, batch, temperature)
        self._memo = (weakref.ref(rows), weakref.ref(batch), temperature, fn)
        return fn

    def _target_of(self, rows: BPMRows, batch: ScoredBatch, temperature: float):
        # every teacher id's probability is projected: a full side (teacher_columns is None)
        require_full_vocabulary(batch.teacher, self.name)
        tau = temperature
        zt_all = batch.teacher.logits
        zt_ref = weakref.ref(zt_all)  # the returned function must not keep the logits alive
        device = zt_all.device
        n_student = batch.student.logits.shape[-1]
        teacher_pos = rows.teacher_pos  # (R,): the returned functions keep only this of the rows
        if batch.vocab.identity:

            def identical(sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
                q = torch.softmax(zt_ref()[teacher_pos[sl]].float() / tau, dim=-1)
                return q, torch.ones(q.shape[0], device=device)

            return identical
        proj = projection_of(batch.vocab)
        n_teacher = zt_all.shape[-1]
        column = torch.full((n_teacher,), n_student, dtype=torch.long)  # residual column = V_S
        first = torch.from_numpy(proj.first_lp[:n_teacher])
        ok = (first >= 0) & (first < n_student)
        column[: len(first)][ok] = first[ok]
        column = column.to(device)
        t_ids = batch.teacher.ids.cpu().numpy()
        t_end = batch.teacher.offsets.cpu()[rows.seq.cpu() + 1].numpy()
        tp, within = rows.teacher_pos.cpu().numpy(), rows.within.cpu().numpy()
        realized = t_ids[tp]
        has_bytes = proj.flat_off[realized + 1] > proj.flat_off[realized]
        chains = np.zeros(len(tp), bool)
        chains[has_bytes] = proj.flat_ext[proj.flat_off[realized[has_bytes]]]
        special = np.flatnonzero((within > 0) | chains)
        q_rows = _TeacherRows(zt_all, tau)
        replace = torch.zeros(len(tp), dtype=torch.bool)
        c_row, c_col, c_val = [], [], []
        for r in special:
            rep, entries = special_row_target(
                proj, q_rows, t_ids, int(tp[r]), int(within[r]), int(t_end[r])
            )
            replace[r] = rep
            for u, value in entries.items():
                c_row.append(r)
                c_col.append(u if 0 <= u < n_student else n_student)
                c_val.append(value)
        c_row_t = torch.tensor(c_row, dtype=torch.long)
        c_col_t = torch.tensor(c_col, dtype=torch.long).to(device)
        c_val_t = torch.tensor(c_val, dtype=torch.float32).to(device)
        replace = replace.to(device)

        def target(sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
            q = torch.softmax(zt_ref()[teacher_pos[sl]].float() / tau, dim=-1)  # (r, V_T)
            out = torch.zeros(q.shape[0], n_student + 1, device=device)  # (r, V_S + residual)
            out.index_add_(1, column, q)  # each teacher id's mass onto its student token
            out[replace[sl]] = 0.0
            lo, hi = np.searchsorted(c_row_t.numpy(), [sl.start, sl.stop])
            if hi > lo:  # corrections of rows in this slice (c_row is ascending)
                local = (c_row_t[lo:hi] - sl.start).to(device)
                out.index_put_((local, c_col_t[lo:hi]), c_val_t[lo:hi], accumulate=True)
            out = out[:, :n_student].clamp_min(0.0)
            reached = out.sum(-1)  # (r,)
            return out / reached.clamp_min(1e-12)[:, None], reached.clamp(max=1.0)

        return target

    def full_row_losses(self, rows: BPMRows, batch: ScoredBatch, loss: LossConfig) -> torch.Tensor:
        target = self.target_of(rows, batch, loss.temperature)
        tau = loss.temperature

        def chunk_loss(sl: slice) -> torch.Tensor:
            with torch.no_grad():
                if batch.vocab.identity:  # π = q: the teacher's own logits, plain OPD to the bit
                    zt = batch.teacher.logits[rows.teacher_pos[sl]]
                else:  # as logits (full_divergence divides by τ); zeros of π at the floor
                    pi, _ = target(sl)  # (r, V_S)
                    zt = tau * log_target(pi)
            zs = batch.student.logits[rows.student_pos[sl]]  # (r, V_S)
            return losses.full_divergence(
                zs, zt, divergence=loss.divergence, beta=loss.beta, temperature=tau
            )

        return chunked(len(rows), loss.chunk_rows, chunk_loss)

    def row_losses(self, rows: BPMRows, batch: ScoredBatch, loss: LossConfig) -> torch.Tensor:
        if loss.form != "sampled":
            return self.full_row_losses(rows, batch, loss)
        # sampled: one unit per student token, advantage log π(s_i) − log p_i(s_i)
        tau = loss.temperature
        ids = batch.student.ids[rows.student_pos]  # (R,)
        student_lp = chunked(len(rows), loss.chunk_rows, lambda sl: losses.token_logprobs(
            batch.student.logits[rows.student_pos[sl]], ids[sl], tau))  # fmt: skip
        with torch.no_grad():
            target = self.target_of(rows, batch, tau)

            def picked(sl: slice) -> torch.Tensor:
                pi, _ = target(sl)
                return log_target(pi.gather(1, ids[sl, None].to(pi.device))[:, 0])

            teacher_lp = chunked(len(rows), loss.chunk_rows, picked)
        return losses.sampled_policy_gradient(student_lp, teacher_lp)

    def teacher_mass(self, rows: BPMRows, batch: ScoredBatch, loss: LossConfig) -> torch.Tensor:
        """(R,) 1 − residual: the teacher's probability the projection placed on student tokens."""
        with torch.no_grad():
            target = self.target_of(rows, batch, loss.temperature)
            return chunked(len(rows), loss.chunk_rows, lambda sl: target(sl)[1])

    def vocab_reached(self, pair) -> float:
        """The share of teacher ids whose probability lands on a student token at w = 0."""
        if pair.identical:
            return 1.0
        return projection_of(pair.vocab).vocab_reached
