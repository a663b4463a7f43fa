"""Token byte spans and segments (DESIGN §3.1–3.2), vectorised with numpy.

Both tokenizations are of one response string. A token's byte span comes from the cumulative
lengths of the tokens' canonical bytes — never from decoding token by token, which breaks on a
multi-byte character split over several byte-level tokens. The student's tokens are the ids it
*sampled*; their bytes may not even be valid UTF-8 (half a character). Such a stretch becomes
U+FFFD in the shared text, and the student tokens touching it are marked invalid: they are never
matched and the segment holding them is left unsupervised, without shifting anything after it.

A 1:1 match is a student token and a teacher token with the same (non-empty) byte span. A segment
closes at each match: the tokens of both sides since the previous match, up to and including it.
Both sides of a segment cover the same bytes. EOS on both sides is a final match.
`SequenceSegments.closes_on_match` records, per segment, whether its last token on each side is
such a match: always under `boundary="match"` except at an observation edge (below); under
`boundary="offset"` exactly where the two last tokens also start together. Those closing pairs
are every 1:1 match of the response (a match's tokens are the only non-empty ones ending at its
end offset), which is what `exact` supervises.

Tool observations: a segment also closes at every *edge* given to `segment` (the byte offsets
where an observation starts or ends) at which a token of each side ends. The caller makes that
true on both sides: the student's observation tokens were tokenized apart from the model's, and
the teacher tokenizes the text piece by piece (pairing.py). So no segment mixes model tokens with
observation tokens: the observation's segments are dropped and the model tokens next to it keep
their supervision. An edge at which one side has no token ending (in practice only where the
student's tokens split a character across the edge) forces nothing; the segment then runs on
past it, holds an observation token, and is dropped.

`boundary="offset"` (an ablation, ALM/GOLD-style chunks) closes a segment instead at every
*common byte boundary*: an offset where a non-empty student token and a non-empty teacher token
both end. A 1:1 match ends at such an offset, so these segments refine the match segments.
"""

from __future__ import annotations

import difflib
import unicodedata
from dataclasses import dataclass

import numpy as np

from lightning_opd.config import AlignerConfig

REPLACEMENT = "\ufffd".encode()
BOUNDARIES = ("match", "offset")


def _utf8_char_len(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0  # a continuation byte or an invalid lead


def repair_utf8(data: bytes) -> tuple[str, np.ndarray, np.ndarray]:
    """Decode bytes that may hold invalid UTF-8, keeping a map back to the original offsets.

    Returns (text, offset_map, bad) where offset_map[o] (len(data)+1 entries) is the offset in
    text.encode() of original byte offset o, and bad[o] marks bytes that were replaced by U+FFFD.
    Valid input (the usual case) takes the fast path: identity map, nothing bad.
    """
    try:
        text = data.decode("utf-8")
        return text, np.arange(len(data) + 1), np.zeros(len(data), bool)
    except UnicodeDecodeError:
        pass
    out = bytearray()
    offset_map = np.zeros(len(data) + 1, np.int64)
    bad = np.zeros(len(data), bool)
    i = 0
    while i < len(data):  # slow path, only for sequences that hold broken characters
        n = _utf8_char_len(data[i])
        chunk = data[i : i + n] if n else b""
        try:
            ok = n > 0 and len(chunk) == n and chunk.decode("utf-8") is not None
        except UnicodeDecodeError:
            ok = False
        offset_map[i] = len(out)
        if ok:
            offset_map[i : i + n] = len(out)
            out += chunk
            i += n
        else:  # one bad byte becomes one U+FFFD
            bad[i] = True
            out += REPLACEMENT
            i += 1
    offset_map[len(data)] = len(out)
    return out.decode("utf-8"), offset_map, bad


def byte_spans(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of consecutive tokens with the given byte lengths; each (n,) int64."""
    ends = np.cumsum(lengths, dtype=np.int64)
    return ends - lengths, ends


@dataclass
class SequenceSegments:
    """Segments of one response. Segment g covers student tokens [s_bounds[g], s_bounds[g+1])
    and teacher tokens [t_bounds[g], t_bounds[g+1]); `valid[g]` is False where the student side
    touches invalid bytes. Tokens past the last boundary are unsupervised."""

    s_bounds: np.ndarray  # (G+1,) int64, starts at 0
    t_bounds: np.ndarray  # (G+1,) int64, starts at 0
    valid: np.ndarray  # (G,) bool
    n_student: int  # student response tokens, EOS included
    n_invalid: int  # student tokens touching invalid bytes
    n_excluded: int = 0  # of the n_student, tokens that are not the model's (tool observations)
    n_unmapped: int = 0  # student tokens over text that the teacher changed beyond a normal form
    # (G,) bool: segment g's last student token and last teacher token are a 1:1 match (same
    # non-empty byte span, or EOS with EOS). None (a hand-built instance) is filled with True:
    # what `segment` gives under boundary="match" without edges
    closes_on_match: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.closes_on_match is None:
            self.closes_on_match = np.ones(len(self.valid), bool)

    @property
    def n_model(self) -> int:
        """The model's own tokens, EOS included: what the loss normaliser and coverage count."""
        return self.n_student - self.n_excluded


def segment(
    s_lengths: np.ndarray,
    t_lengths: np.ndarray,
    *,
    s_bad_bytes: np.ndarray | None = None,
    s_offset_map: np.ndarray | None = None,
    eos: bool = False,
    boundary: str = AlignerConfig.boundary,
    s_excluded: np.ndarray | None = None,
    edges: np.ndarray | None = None,
    t_map: ByteMap | None = None,
) -> SequenceSegments:
    """Close a segment at every 1:1 match of student and teacher byte spans (`boundary="match"`)
    or at every common byte boundary (`boundary="offset"`), and at every edge in `edges`.

    s_lengths: (n_s,) byte length of each student token (EOS excluded).
    t_lengths: (n_t,) byte length of each teacher token (EOS excluded).
    s_bad_bytes / s_offset_map: from `repair_utf8` of the student's bytes (None = valid UTF-8).
    eos: both sides end with EOS after these tokens (a final 1:1 match).
    s_excluded: (n_s,) bool, student tokens that are not the model's (tool observations): a
        segment holding one is dropped (marked invalid) — observations are never supervised —
        and they are counted in `n_excluded`.
    edges: (E,) byte offsets in the shared text (the repaired one, where the student's bytes
        were repaired) where a segment must close: the observations' edges. An edge closes a
        segment only where a non-empty token of each side ends exactly there.
    t_map: where the teacher's bytes differ from the text (a normaliser, a dummy prefix), the
        map of its byte offsets onto the text's (`teacher_byte_map`): teacher spans are mapped
        into the text, a teacher token with an unanchored edge closes nothing (it counts as
        empty), and student tokens over `unmapped` text bytes are left unsupervised.
    """
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary={boundary!r}; expected one of {BOUNDARIES}")
    s_start, s_end = byte_spans(s_lengths)
    t_start, t_end = byte_spans(t_lengths)
    s_invalid = np.zeros(len(s_lengths), bool)
    if s_offset_map is not None:
        if s_bad_bytes is not None and s_bad_bytes.any():
            s_invalid = _touches(s_bad_bytes, s_start, s_end)
        s_start, s_end = s_offset_map[s_start], s_offset_map[s_end]
    s_unmapped = np.zeros(len(s_lengths), bool)
    if t_map is not None:
        closable = t_map.anchored[t_start] & t_map.anchored[t_end]
        t_start, t_end = t_map.to_text[t_start], t_map.to_text[t_end]
        t_start = np.where(closable, t_start, t_end)  # made empty: it matches and ends nowhere
        if t_map.unmapped.any():
            s_unmapped = _touches(t_map.unmapped, s_start, s_end)
    if boundary == "offset":
        s_match, t_match = _common_boundaries(s_start, s_end, t_start, t_end)
    else:
        s_match, t_match = _matches(s_start, s_end, t_start, t_end, s_invalid)
    if edges is not None and len(edges):
        s_match, t_match = _with_edges(s_match, t_match, np.asarray(edges, np.int64),
                                       s_start, s_end, t_start, t_end)  # fmt: skip
    # a closing pair ends at one offset by construction (match, common boundary or edge), so it
    # is a 1:1 match where it also starts at one; an edge or a common boundary may close a
    # segment on two tokens that start apart ("b" | "ab"), and those are no match
    closes_on_match = (s_start[s_match] == t_start[t_match]) & ~s_invalid[s_match]
    s_bounds = np.concatenate([[0], s_match + 1])
    t_bounds = np.concatenate([[0], t_match + 1])
    if eos:  # EOS with EOS: a final match
        s_bounds = np.append(s_bounds, len(s_lengths) + 1)
        t_bounds = np.append(t_bounds, len(t_lengths) + 1)
        closes_on_match = np.append(closes_on_match, True)
    unsupervised = s_invalid | s_unmapped
    if s_excluded is not None:
        unsupervised = unsupervised | s_excluded.astype(bool)
    invalid_prefix = np.concatenate([[0], np.cumsum(np.append(unsupervised, False))])
    valid = invalid_prefix[s_bounds[1:]] == invalid_prefix[s_bounds[:-1]]
    return SequenceSegments(
        s_bounds=s_bounds.astype(np.int64),
        t_bounds=t_bounds.astype(np.int64),
        valid=valid,
        n_student=len(s_lengths) + int(eos),
        n_invalid=int(s_invalid.sum()),
        n_excluded=0 if s_excluded is None else int(np.count_nonzero(s_excluded)),
        n_unmapped=int(np.count_nonzero(s_unmapped & ~s_invalid)),
        closes_on_match=closes_on_match,
    )


def _touches(marked: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(n,) bool: the byte span [start, end) of each token holds a `marked` byte ((L,) bool)."""
    prefix = np.concatenate([[0], np.cumsum(marked, dtype=np.int64)])
    return prefix[end] > prefix[start]


def _matches(s_start: np.ndarray, s_end: np.ndarray, t_start: np.ndarray, t_end: np.ndarray,
             s_invalid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Indices (student, teacher) of the 1:1 matches, in order: same non-empty byte span."""
    width = int(max(s_end[-1] if len(s_end) else 0, t_end[-1] if len(t_end) else 0)) + 1
    # only non-empty (and, for the student, valid) tokens can match; filtering them first keeps
    # the keys unique, which intersect1d(assume_unique=True) needs (repeated sentinel keys for
    # two empty or invalid tokens would otherwise come back as a bogus match)
    s_ok = np.flatnonzero((s_end > s_start) & ~s_invalid)
    t_ok = np.flatnonzero(t_end > t_start)
    s_keys = s_start[s_ok] * width + s_end[s_ok]
    t_keys = t_start[t_ok] * width + t_end[t_ok]
    # non-empty spans of one tokenization are disjoint, so the keys are unique per side
    _, s_at, t_at = np.intersect1d(s_keys, t_keys, assume_unique=True, return_indices=True)
    order = np.argsort(s_at)
    return s_ok[s_at[order]], t_ok[t_at[order]]


def _last_token_ending_at(offsets: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(E,) index of the non-empty token ending exactly at each offset, -1 where none does.
    Non-empty spans of one tokenization are disjoint, so at most one non-empty token ends there."""
    out = np.full(len(offsets), -1, np.int64)
    nonempty = np.flatnonzero(end > start)
    if len(nonempty) == 0:
        return out
    ends = end[nonempty]  # strictly increasing
    at = np.minimum(np.searchsorted(ends, offsets), len(ends) - 1)
    hit = ends[at] == offsets
    out[hit] = nonempty[at[hit]]
    return out


def _with_edges(s_close: np.ndarray, t_close: np.ndarray, edges: np.ndarray, s_start: np.ndarray,
                s_end: np.ndarray, t_start: np.ndarray, t_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The closing tokens (student, teacher) `s_close`/`t_close`, plus those of every edge at
    which a non-empty token of each side ends, in order and without repeats. Every closure is a
    common byte boundary, so ordering them by offset orders both sides."""
    s_at = _last_token_ending_at(edges, s_start, s_end)
    t_at = _last_token_ending_at(edges, t_start, t_end)
    both = (s_at >= 0) & (t_at >= 0)
    offsets = np.concatenate([s_end[s_close], edges[both]])
    s_all = np.concatenate([s_close, s_at[both]])
    t_all = np.concatenate([t_close, t_at[both]])
    _, first = np.unique(offsets, return_index=True)  # sorted by offset, one closure per offset
    return s_all[first], t_all[first]


def _common_boundaries(s_start: np.ndarray, s_end: np.ndarray, t_start: np.ndarray,
                       t_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Indices (student, teacher) of the last non-empty token of each side ending at a common
    byte offset, in order. Zero-length tokens end nowhere, so they fold into the next segment
    (as in match mode). Invalid student tokens do end somewhere (the U+FFFD they became): the
    segment they close is marked invalid by the caller, and nothing after it shifts."""
    s_nonempty = np.flatnonzero(s_end > s_start)
    t_nonempty = np.flatnonzero(t_end > t_start)
    # ends of non-empty tokens strictly increase, so they are unique per side and the common
    # values come back sorted: the indices are already in order
    _, s_at, t_at = np.intersect1d(
        s_end[s_nonempty], t_end[t_nonempty], assume_unique=True, return_indices=True
    )
    return s_nonempty[s_at], t_nonempty[t_at]


# --- the teacher's bytes, mapped back to the text ----------------------------------------------


@dataclass
class ByteMap:
    """A monotone map from offsets in the teacher's bytes (what its tokens spell) to offsets in
    the response text, for a teacher whose normaliser or dummy prefix changed the text.

    to_text: (n_t+1,) int64, non-decreasing: teacher byte offset -> text byte offset.
    anchored: (n_t+1,) bool, True where the offset is a boundary both strings share: inside or at
        the edge of a stretch they spell alike, or at the edge of a stretch the teacher changed.
        Only a teacher token that starts and ends at anchored offsets can close a segment.
    unmapped: (n_text,) bool, text bytes the teacher replaced by something that is not a Unicode
        normal form of them: the segments holding them are left unsupervised.
    """

    to_text: np.ndarray
    anchored: np.ndarray
    unmapped: np.ndarray


def utf8_offsets(text: str) -> np.ndarray:
    """(len(text)+1,) int64: the byte offset in text.encode() of each character offset."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    widths = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])


def _common_ends(a: str, b: str) -> tuple[int, int]:
    """Lengths (characters) of the common head and of the common tail after it."""
    x = np.frombuffer(a.encode("utf-32-le"), np.uint32)
    y = np.frombuffer(b.encode("utf-32-le"), np.uint32)
    n = min(len(x), len(y))
    differ = np.flatnonzero(x[:n] != y[:n])
    head = int(differ[0]) if len(differ) else n
    m = n - head
    differ = np.flatnonzero(x[len(x) - m :][::-1] != y[len(y) - m :][::-1]) if m else np.zeros(0)
    return head, int(differ[0]) if len(differ) else m


def char_opcodes(a: str, b: str) -> list[tuple[str, int, int, int, int]]:
    """difflib opcodes (equal | replace | delete | insert, a[i0:i1], b[j0:j1]) turning a into b.
    The common head and tail are cut first: for a dummy prefix that is the whole diff, and
    difflib (quadratic at worst) only sees the stretch between the first and last change."""
    head, tail = _common_ends(a, b)
    ops = [("equal", 0, head, 0, head)] if head else []
    mid = difflib.SequenceMatcher(None, a[head : len(a) - tail], b[head : len(b) - tail], autojunk=False)
    ops += [(tag, i0 + head, i1 + head, j0 + head, j1 + head) for tag, i0, i1, j0, j1 in mid.get_opcodes()]
    if tail:
        ops.append(("equal", len(a) - tail, len(a), len(b) - tail, len(b)))
    return _merge_changes(ops)


def _merge_changes(ops: list[tuple[str, int, int, int, int]]) -> list[tuple[str, int, int, int, int]]:
    """Adjacent changes as one (difflib may split `é` -> `e` + U+0301 into a delete and an
    insert): one changed stretch is mapped, or checked, as a whole."""
    merged: list[tuple[str, int, int, int, int]] = []
    for op in ops:
        if merged and op[0] != "equal" and merged[-1][0] != "equal":
            _, i0, _, j0, _ = merged.pop()
            op = (op[0], i0, op[2], j0, op[4])
        if op[0] != "equal":
            op = ({(True, True): "replace", (True, False): "delete", (False, True): "insert"}[
                (op[2] > op[1], op[4] > op[3])], *op[1:])  # fmt: skip
        merged.append(op)
    return merged


def _normal_form_of(changed: str, original: str) -> bool:
    return unicodedata.normalize("NFKC", changed) == unicodedata.normalize("NFKC", original)


def teacher_byte_map(teacher: bytes, text: bytes) -> ByteMap | None:
    """The map of the teacher's bytes onto the text's bytes (`ByteMap`), from a character diff;
    None when the teacher's bytes are not UTF-8.

    A stretch only the teacher has (a dummy prefix `▁`, a space it inserted) collapses onto one
    text offset; a stretch both changed (NFC: `é` for `e` + U+0301) maps end to end; a stretch
    only the text has (what a normaliser dropped) falls inside the teacher token after it, and
    the teacher offset there is unanchored (its two sides are two text offsets).
    """
    try:
        t_str = teacher.decode("utf-8")
    except UnicodeDecodeError:
        return None
    s_str = text.decode("utf-8")
    t_at, s_at = utf8_offsets(t_str), utf8_offsets(s_str)
    to_text = np.zeros(len(teacher) + 1, np.int64)
    anchored = np.zeros(len(teacher) + 1, bool)
    unmapped = np.zeros(len(text), bool)
    dropped = []  # teacher offsets where the text has a stretch the teacher has not
    for tag, i0, i1, j0, j1 in char_opcodes(t_str, s_str):  # a handful of stretches, not tokens
        a0, a1, b0, b1 = t_at[i0], t_at[i1], s_at[j0], s_at[j1]
        if tag == "equal":
            to_text[a0 : a1 + 1] = np.arange(b0, b1 + 1)
            anchored[a0 : a1 + 1] = True
        elif tag == "insert":
            dropped.append(a0)
        else:  # delete (teacher only) or replace: anchored at both edges only
            to_text[a0:a1] = b0
            to_text[a1] = b1
            anchored[[a0, a1]] = True
            if tag == "replace" and not _normal_form_of(t_str[i0:i1], s_str[j0:j1]):
                unmapped[b0:b1] = True
    anchored[dropped] = False
    return ByteMap(to_text, anchored, unmapped)
