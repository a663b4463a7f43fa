"""A student/teacher tokenizer pair, and the segments of a batch of sampled responses.

`TokenizerPair` precomputes what alignment needs once per run: each vocabulary's canonical
bytes and the shared vocabulary V∩. `align_batch` is the entry point of training, the align
command and the bench: it segments every response (`segment_responses`) and packs the segments
of the batch (`base.pack_segments`). `segment_responses` takes the ids the student sampled,
turns them into the response text (through canonical bytes, repairing broken UTF-8), lets the
teacher tokenize that text, and closes segments at 1:1 byte-span matches (or, with
`boundary="offset"`, at every byte offset where a token of each side ends).

Identical tokenizers take a fast path: the teacher scores exactly the student's ids, and every
token is its own segment (so `exact` is plain OPD).

Tool observations (loss mask 0) cut a response into *pieces*: maximal runs of model tokens and
of observation tokens. The student's pieces are its own tokens as the loss mask marks them (its
ids are never re-tokenized; the rollout tokenized each observation apart, so its tokens start and
end at the observation's edges). The teacher tokenizes each piece apart and concatenates the ids,
so it too has a token boundary at every edge, and `segment` closes a segment there: segments
never mix model and observation tokens, and the model tokens right before and after an
observation (a call's closing `</tool_call>` or fence, the first token of the answer) stay
supervised. Should the student's tokens split a character across an edge (the observation's
tokens then end or start inside it), the edge moves back to that character's start in the text
(pieces must be whole characters to be tokenized). The student's own boundary between model and
observation tokens is not there, so the segment holding the split character also holds an
observation token and is left unsupervised, with everything up to the next closure; nothing
after it shifts (tests/test_observations.py has such a case).
If the teacher's pieces do not spell the text (a tokenizer that adds a prefix per call), it
tokenizes the whole text instead and segments close at 1:1 matches only.

Where the teacher's own bytes differ from the text (a SentencePiece dummy prefix `▁`, an NFC
normaliser), alignment runs on the teacher's bytes through a monotone byte map back to the text
(`offsets.teacher_byte_map`): only stretches that cannot be mapped stay unsupervised. A response
is unaligned (None, with its cause in `unaligned_causes`) only where nothing can be mapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lightning_opd.align.base import BatchSegments, pack_segments
from lightning_opd.align.offsets import (
    ByteMap,
    SequenceSegments,
    repair_utf8,
    segment,
    teacher_byte_map,
)
from lightning_opd.align.vocab import SharedVocab, TokenBytes, build_shared_vocab
from lightning_opd.config import AlignerConfig


def same_tokenizer(a, b) -> bool:
    if a is b:
        return True
    return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


@dataclass
class TokenizerPair:
    student: object  # a transformers PreTrainedTokenizerFast
    teacher: object
    student_bytes: TokenBytes
    teacher_bytes: TokenBytes
    vocab: SharedVocab
    identical: bool

    @classmethod
    def build(cls, student, teacher) -> TokenizerPair:
        identical = same_tokenizer(student, teacher)
        s_bytes = TokenBytes.from_tokenizer(student)
        t_bytes = s_bytes if identical else TokenBytes.from_tokenizer(teacher)
        vocab = build_shared_vocab(
            s_bytes, t_bytes, student.eos_token_id, teacher.eos_token_id, identical=identical
        )
        return cls(student, teacher, s_bytes, t_bytes, vocab, identical)


@dataclass
class SegmentedResponses:
    """Each response of a batch, segmented on its own (`segment_responses`)."""

    texts: list[str]  # the response texts (EOS excluded)
    teacher_ids: list[list[int]]  # teacher response tokens, EOS appended where the student ended
    per_response: list[SequenceSegments | None]  # None: the two tokenizations disagree on the text
    model_tokens: list[int]  # per response, the model's own tokens (EOS included, observations not)
    unaligned_causes: list[str | None]  # per response, why it is unaligned (None: it is aligned)


@dataclass
class AlignedBatch(SegmentedResponses):
    """A batch of responses, segmented and packed (`align_batch`)."""

    segments: BatchSegments  # the segments of every response, in packed positions


def _one_token_per_segment(n: int, eos: bool, excluded: np.ndarray | None) -> SequenceSegments:
    bounds = np.arange(n + int(eos) + 1, dtype=np.int64)
    valid = np.ones(len(bounds) - 1, bool)
    n_excluded = 0
    if excluded is not None:
        valid[:n] = ~excluded
        n_excluded = int(np.count_nonzero(excluded))
    return SequenceSegments(bounds, bounds.copy(), valid, len(bounds) - 1, 0, n_excluded)


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's ids, no special tokens, in one batched call ([] for no texts).

    Text that spells a control token (`<|im_start|>` in a response) is tokenized as the plain
    text it is (`split_special_tokens`): a response never turns into the teacher's control
    tokens, whose bytes are empty and would leave the sequence unaligned. Added tokens that are
    not special (`<tool_call>` markup) still take their own id."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def piece_bounds(excluded: np.ndarray | None, n: int) -> np.ndarray:
    """(P+1,) token indices cutting n tokens into pieces, the maximal runs of model tokens and of
    observation tokens (`excluded`, (n,) bool); [0, n] without observations."""
    if excluded is None:
        return np.array([0, n], np.int64)
    change = np.flatnonzero(np.diff(excluded.astype(np.int8))) + 1
    return np.concatenate([[0], change, [n]]).astype(np.int64)


def char_start(data: bytes, offset: int) -> int:
    """`offset` moved back to the start of the UTF-8 character it falls inside (unchanged at a
    character boundary): the first byte that is not a continuation byte 0b10xxxxxx."""
    while 0 < offset < len(data) and data[offset] & 0xC0 == 0x80:
        offset -= 1
    return offset


def piece_edges(s_lengths: np.ndarray, bounds: np.ndarray, offset_map: np.ndarray,
                data: bytes) -> np.ndarray:  # fmt: skip
    """(P+1,) byte offsets in the text `data` of the piece bounds (token indices): where the
    student's tokens there end, through the repair map, moved back to a character start."""
    ends = np.concatenate([[0], np.cumsum(s_lengths, dtype=np.int64)])
    return np.array([char_start(data, int(offset_map[ends[i]])) for i in bounds], np.int64)


def piece_texts(data: bytes, edges: np.ndarray) -> list[str]:
    """The non-empty pieces of the text between consecutive edges (character starts)."""
    bounds = zip(edges[:-1], edges[1:], strict=True)
    return [data[lo:hi].decode("utf-8") for lo, hi in bounds if hi > lo]


def teacher_tokens(pair: TokenizerPair, pieces: dict[int, list[str]],
                   texts: list[str]) -> tuple[dict[int, list[int]], set[int]]:  # fmt: skip
    """The teacher's ids of each response b in `pieces`: its pieces tokenized apart, concatenated.
    All pieces of all responses go in one batched call: the Rust tokenizer spreads a batch over
    its threads, and this call is most of the cost of alignment. Where the pieces' ids do not
    spell the text, the whole text tokenized at once; those responses are the second value."""
    flat = tokenize(pair.teacher, [piece for parts in pieces.values() for piece in parts])
    ids_of: dict[int, list[int]] = {}
    at = 0
    for b, parts in pieces.items():
        ids_of[b] = [i for ids in flat[at : at + len(parts)] for i in ids]
        at += len(parts)
    whole = [b for b, parts in pieces.items() if len(parts) > 1
             and pair.teacher_bytes.join(ids_of[b]) != texts[b].encode("utf-8")]  # fmt: skip
    ids_of.update(zip(whole, tokenize(pair.teacher, [texts[b] for b in whole]), strict=True))
    return ids_of, set(whole)


def map_teacher_bytes(teacher: bytes, text: bytes) -> tuple[ByteMap | None, str | None]:
    """(map, cause): no map where the teacher's bytes spell the text (the usual case); the byte
    map where its normaliser or prefix changed them; a cause instead where nothing can be mapped."""
    if teacher == text:
        return None, None
    t_map = teacher_byte_map(teacher, text)
    if t_map is None:
        return None, "the teacher's tokens do not spell UTF-8 text"
    if t_map.unmapped.all() and len(text):
        return None, "the teacher's normaliser rewrote the whole text"
    return t_map, None


def _lengths(table: np.ndarray, ids: list[int]) -> np.ndarray:
    """(n,) byte length of each token."""
    return table[np.asarray(ids, np.int64)] if len(ids) else np.zeros(0, np.int64)


def segment_responses(
    pair: TokenizerPair,
    student_ids: list[list[int]],
    ended_with_eos: list[bool],
    boundary: str = AlignerConfig.boundary,
    loss_mask: list[list[int]] | None = None,
) -> SegmentedResponses:
    """student_ids: each response's sampled ids, EOS excluded; ended_with_eos: whether EOS followed.
    boundary: "match" (segments close at 1:1 matches) | "offset" (at common byte boundaries).
    loss_mask: per response, 1 for the model's tokens and 0 for tool observations (None = all 1);
        segments also close at observation edges, and those holding an observation token are
        left unsupervised (see the module docstring).

    The teacher's ids get the teacher's EOS appended where the student ended with its EOS.
    """
    teacher_eos = pair.teacher.eos_token_id
    masks = loss_mask if loss_mask is not None else [None] * len(student_ids)
    # (n,) bool per response, True at observation tokens; None where there are none
    excluded = [None if m is None or all(m) else np.asarray(m, np.int64) == 0 for m in masks]
    decoded = [repair_utf8(pair.student_bytes.join(ids)) for ids in student_ids]  # (text, map, bad)
    texts = [text for text, _, _ in decoded]
    s_lengths = [_lengths(pair.student_bytes.lengths, ids) for ids in student_ids]
    needs_teacher = [b for b, (_, _, bad) in enumerate(decoded) if not pair.identical or bad.any()]
    edges, pieces = {}, {}  # per response needing the teacher: piece edges (P+1,), piece texts
    for b in needs_teacher:
        data = texts[b].encode("utf-8")
        bounds = piece_bounds(excluded[b], len(student_ids[b]))
        edges[b] = piece_edges(s_lengths[b], bounds, decoded[b][1], data)
        pieces[b] = piece_texts(data, edges[b])
    teacher_of, whole = teacher_tokens(pair, pieces, texts)
    teacher_ids, per_response = [], []
    causes: list[str | None] = [None] * len(student_ids)
    for b, (ids, eos) in enumerate(zip(student_ids, ended_with_eos, strict=True)):
        text, offset_map, bad = decoded[b]
        if b not in teacher_of:  # identical tokenizers, valid UTF-8: the teacher scores the same ids
            teacher_ids.append(list(ids) + ([teacher_eos] if eos else []))
            per_response.append(_one_token_per_segment(len(ids), eos, excluded[b]))
            continue
        t_ids = teacher_of[b]
        teacher_ids.append(list(t_ids) + ([teacher_eos] if eos else []))
        t_map, cause = map_teacher_bytes(pair.teacher_bytes.join(t_ids), text.encode("utf-8"))
        causes[b] = cause
        if cause is not None:
            per_response.append(None)
            continue
        t_lengths = _lengths(pair.teacher_bytes.lengths, t_ids)
        repaired = bad.any()
        per_response.append(
            segment(
                s_lengths[b],
                t_lengths,
                s_bad_bytes=bad if repaired else None,
                s_offset_map=offset_map if repaired else None,
                eos=eos,
                boundary=boundary,
                s_excluded=excluded[b],
                edges=None if b in whole else edges[b][1:-1],
                t_map=t_map,
            )
        )
    model_tokens = [len(ids) - (0 if x is None else int(np.count_nonzero(x))) + int(e)
                    for ids, x, e in zip(student_ids, excluded, ended_with_eos, strict=True)]  # fmt: skip
    return SegmentedResponses(texts, teacher_ids, per_response, model_tokens, causes)


UNALIGNED_WARN_FRACTION = 0.01  # more than this fraction of a step's responses unaligned: warn


def unaligned_warning(out: SegmentedResponses) -> str | None:
    """A warning naming the cause when more than 1% of the responses are unaligned (their tokens
    are unsupervised but still count in the loss normaliser); None otherwise."""
    causes = [c for c in out.unaligned_causes if c is not None]
    if len(causes) <= UNALIGNED_WARN_FRACTION * len(out.unaligned_causes):
        return None
    most = max(set(causes), key=causes.count)
    return (f"{len(causes)} of {len(out.unaligned_causes)} responses are unaligned (no supervision; "
            f"counted in train/unaligned_sequences): {most}")  # fmt: skip


def packed_offsets(lengths: list[int]) -> np.ndarray:
    """(B+1,) packed offsets of sequences with these lengths."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def align_batch(
    pair: TokenizerPair,
    student_ids: list[list[int]],
    ended_with_eos: list[bool],
    boundary: str = AlignerConfig.boundary,
    loss_mask: list[list[int]] | None = None,
) -> AlignedBatch:
    """Segment every response of a batch and pack the segments (arguments as `segment_responses`).

    The packed positions are those of `rollout.generate.response_logits`: each side's responses
    back to back, the student's EOS included where it ended with one, the teacher's ids as
    returned here (its EOS already appended). The model's own tokens of each response (tool
    observations excluded) give the loss normaliser and the coverage denominator.
    """
    out = segment_responses(pair, student_ids, ended_with_eos, boundary=boundary, loss_mask=loss_mask)
    s_offsets = packed_offsets([len(ids) + int(eos) for ids, eos in zip(student_ids, ended_with_eos, strict=True)])
    t_offsets = packed_offsets([len(ids) for ids in out.teacher_ids])
    packed = pack_segments(out.per_response, s_offsets, t_offsets, model_tokens=out.model_tokens, boundary=boundary)
    s_eos = pair.student.eos_token_id
    s_ids = [i for ids, eos in zip(student_ids, ended_with_eos, strict=True) for i in [*ids, *([s_eos] if eos else [])]]
    t_ids = [i for ids in out.teacher_ids for i in ids]
    packed.s_token_bytes = torch.from_numpy(_lengths(pair.student_bytes.lengths, s_ids))
    packed.t_token_bytes = torch.from_numpy(_lengths(pair.teacher_bytes.lengths, t_ids))
    return AlignedBatch(out.texts, out.teacher_ids, out.per_response, out.model_tokens, out.unaligned_causes,
                        packed)
