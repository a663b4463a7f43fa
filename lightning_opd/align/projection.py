"""The byte-prefix projection of a tokenizer pair: where each teacher token's probability goes
on the student's side (used by the `bpm` aligner, bpm.py, which explains the algorithm).

Everything here depends only on the two vocabularies' canonical bytes (vocab.py), so it is
built once per tokenizer pair and cached on its `SharedVocab` (`projection_of`).

Notation: B(v) is the byte string of token v; LP(w) is the *longest student token whose bytes
are a prefix of w* (the first token a greedy longest-match student tokenizer would cut from w;
None when no student token is a prefix of w). A student token is *student-only* when no
teacher token has its bytes (it lies outside V∩); only those are reached by chaining the
teacher's realized tokens (bpm.py), which keeps identical tokenizers an exact identity.

Tables (V_T = len(teacher table); flat index f = flat_off[v] + w for 0 <= w < |B(v)|):

    first_lp[v]   = LP(B(v)), the student EOS for the teacher EOS, -1 (residual) otherwise
    flat_lp[f]    = LP(B(v)[w:])                         the continuation after w realized bytes
    flat_ext[f]   = B(v)[w:] is a proper prefix of a student-only token  (chaining may apply)
    sorted_bytes  = the teacher's non-empty byte strings in byte order, sorted_ids their ids:
                    the tokens that start with a prefix r are one contiguous range (`prefix_range`)
    extensions[P] = the student-only tokens u with P a proper prefix of B(u), as (B(u)[|P|:], u),
                    shortest suffix first
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np

from lightning_opd.align.vocab import SharedVocab, TokenBytes


def _byte_successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string that starts with `prefix`
    (None: no such string, the prefix is all 0xff)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


@dataclass
class Projection:
    """Byte-prefix tables of one (student, teacher) tokenizer pair (module docstring)."""

    n_student: int  # student vocabulary size (its byte table)
    first_lp: np.ndarray  # (V_T,) int64, student id or -1
    flat_off: np.ndarray  # (V_T+1,) int64
    flat_lp: np.ndarray  # (Σ|B(v)|,) int64, student id or -1
    flat_ext: np.ndarray  # (Σ|B(v)|,) bool
    sorted_bytes: list[bytes]  # (n,) the teacher's non-empty byte strings, sorted
    sorted_ids: np.ndarray  # (n,) int64 teacher ids in that order
    extensions: dict[bytes, list[tuple[bytes, int]]]
    student_index: dict[bytes, int]  # bytes -> student id (lowest id, V∩ partner preferred)
    max_student_len: int
    teacher_table: list[bytes]
    teacher_lengths: np.ndarray  # (V_T,) int64, |B(v)|

    def longest_prefix(self, data: bytes) -> int:
        """LP(data): the longest student token that is a prefix of `data`, -1 if none."""
        index = self.student_index
        for length in range(min(len(data), self.max_student_len), 0, -1):
            u = index.get(data[:length])
            if u is not None:
                return u
        return -1

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """[lo, hi) in sorted order: the teacher tokens whose bytes start with `prefix`."""
        lo = bisect_left(self.sorted_bytes, prefix)
        upper = _byte_successor(prefix)
        hi = len(self.sorted_bytes) if upper is None else bisect_left(self.sorted_bytes, upper)
        return lo, hi

    def candidate_map(self, prefix: bytes) -> tuple[np.ndarray, np.ndarray]:
        """For a chain at `prefix` (bpm.py): (ids, assign), the teacher ids in the union of the
        ranges of the candidate suffixes (`extensions[prefix]`) and, for each, the longest
        student-only token u with B(u) = prefix + a prefix of its bytes (-1: none). Computed
        once per prefix and kept: chains revisit the same prefixes at every step."""
        cache = self.__dict__.setdefault("_candidate_maps", {})
        if prefix not in cache:
            ranges = [(self.prefix_range(suffix), u) for suffix, u in self.extensions[prefix]]
            lo_all = min(lo for (lo, _), _ in ranges)
            hi_all = max(hi for (_, hi), _ in ranges)
            assign = np.full(max(hi_all - lo_all, 0), -1, np.int64)
            for (lo, hi), u in ranges:  # shortest suffix first; nested or disjoint: longer overwrites
                assign[lo - lo_all : hi - lo_all] = u
            cache[prefix] = (self.sorted_ids[lo_all:hi_all], assign)
        return cache[prefix]

    @property
    def vocab_reached(self) -> float:
        """The share of teacher ids whose probability lands on a student token (not residual)."""
        return float(np.count_nonzero(self.first_lp >= 0)) / max(len(self.first_lp), 1)


def build_projection(student: TokenBytes, teacher: TokenBytes, student_eos: int | None,
                     teacher_eos: int | None, teacher_of_student: np.ndarray | None = None,
                     ) -> Projection:  # fmt: skip
    """The tables for this pair (module docstring). Cost: one dictionary lookup per (teacher
    token, byte offset, candidate length), a few seconds for a 150k vocabulary, once per pair."""
    student_index: dict[bytes, int] = {}
    partner = (
        teacher_of_student if teacher_of_student is not None else np.full(len(student.table), -1)
    )
    for s_id, b in enumerate(student.table):
        # the V∩ partner wins a duplicate, so shared tokens project onto their partners
        if b and (b not in student_index or (partner[s_id] >= 0 > partner[student_index[b]])):
            student_index[b] = s_id
    teacher_set = {b for b in teacher.table if b}
    extensions: dict[bytes, list[tuple[bytes, int]]] = {}
    for b, u in student_index.items():
        if b in teacher_set:
            continue  # a shared token: the teacher emits it itself, no chaining needed
        for cut in range(1, len(b)):
            extensions.setdefault(b[:cut], []).append((b[cut:], u))
    for items in extensions.values():
        items.sort(key=lambda item: len(item[0]))
    max_len = max((len(b) for b in student_index), default=0)

    lengths = teacher.lengths
    flat_off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat_lp = np.full(int(flat_off[-1]), -1, np.int64)
    flat_ext = np.zeros(int(flat_off[-1]), bool)
    tables = Projection(len(student.table), np.full(len(teacher.table), -1, np.int64), flat_off,
                        flat_lp, flat_ext, [], np.zeros(0, np.int64), extensions, student_index,
                        max_len, teacher.table, teacher.lengths)  # fmt: skip
    for v, b in enumerate(teacher.table):
        at = int(flat_off[v])
        for w in range(len(b)):
            rest = b[w:]
            flat_lp[at + w] = tables.longest_prefix(rest)
            flat_ext[at + w] = rest in extensions
        if b:
            tables.first_lp[v] = flat_lp[at]
    if teacher_eos is not None and student_eos is not None:
        tables.first_lp[teacher_eos] = student_eos  # stopping maps to stopping
    order = sorted((b, v) for v, b in enumerate(teacher.table) if b)
    tables.sorted_bytes = [b for b, _ in order]
    tables.sorted_ids = np.fromiter((v for _, v in order), np.int64, len(order))
    return tables


def projection_of(vocab: SharedVocab) -> Projection:
    """The pair's projection, built on first use and kept on the SharedVocab (one per run)."""
    cached = vocab.__dict__.get("_projection")
    if cached is None:
        if vocab.student_bytes is None or vocab.teacher_bytes is None:
            raise ValueError("this SharedVocab was built without the tokenizers' bytes; "
                             "build it with vocab.build_shared_vocab")  # fmt: skip
        cached = build_projection(vocab.student_bytes, vocab.teacher_bytes, vocab.student_eos,
                                  vocab.teacher_eos, vocab.teacher_of_student)  # fmt: skip
        vocab.__dict__["_projection"] = cached
    return cached
