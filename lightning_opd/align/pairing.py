"""A student/teacher tokenizer pair, and the segments of a batch of sampled responses.

`TokenizerPair` precomputes what alignment needs once per run: each vocabulary's canonical
bytes and the shared vocabulary V∩. `segment_responses` takes the ids the student sampled,
turns them into the response text (through canonical bytes, repairing broken UTF-8), lets the
teacher tokenize that text, and closes segments at 1:1 byte-span matches (or, with
`boundary="offset"`, at every byte offset where a token of each side ends).

Identical tokenizers take a fast path: the teacher scores exactly the student's ids, and every
token is its own segment (so `exact` is plain OPD).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_opd.align.offsets import SequenceSegments, repair_utf8, segment
from lightning_opd.align.vocab import SharedVocab, TokenBytes, build_shared_vocab


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
    texts: list[str]  # the response texts (EOS excluded)
    teacher_ids: list[list[int]]  # teacher response tokens, EOS appended where the student ended
    segments: list[SequenceSegments | None]  # None: the two tokenizations disagree on the text


def _one_token_per_segment(n: int, eos: bool, excluded: np.ndarray | None) -> SequenceSegments:
    bounds = np.arange(n + int(eos) + 1, dtype=np.int64)
    valid = np.ones(len(bounds) - 1, bool)
    if excluded is not None:
        valid[:n] = ~excluded
    return SequenceSegments(bounds, bounds.copy(), valid, len(bounds) - 1, 0)


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's ids, no special tokens, in one batched call ([] for no texts)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def segment_responses(
    pair: TokenizerPair,
    student_ids: list[list[int]],
    ended_with_eos: list[bool],
    boundary: str = "match",
    loss_mask: list[list[int]] | None = None,
) -> SegmentedResponses:
    """student_ids: each response's sampled ids, EOS excluded; ended_with_eos: whether EOS followed.
    boundary: "match" (segments close at 1:1 matches) | "offset" (at common byte boundaries).
    loss_mask: per response, 1 for the model's tokens and 0 for tool observations (None = all 1);
        segments holding an observation token are left unsupervised.

    The teacher's ids get the teacher's EOS appended where the student ended with its EOS.
    """
    teacher_eos = pair.teacher.eos_token_id
    masks = loss_mask if loss_mask is not None else [None] * len(student_ids)
    decoded = [repair_utf8(pair.student_bytes.join(ids)) for ids in student_ids]  # (text, map, bad)
    texts = [text for text, _, _ in decoded]
    # the teacher tokenizes every text that needs it in one batched call: the Rust tokenizer
    # spreads a batch over its threads, and this call is most of the cost of alignment
    needs_teacher = [b for b, (_, _, bad) in enumerate(decoded) if not pair.identical or bad.any()]
    teacher_of = dict(zip(needs_teacher, tokenize(pair.teacher, [texts[b] for b in needs_teacher]), strict=True))
    teacher_ids, segments = [], []
    for b, (ids, eos, mask) in enumerate(zip(student_ids, ended_with_eos, masks, strict=True)):
        excluded = None if mask is None or all(mask) else np.asarray(mask, np.int64) == 0
        text, offset_map, bad = decoded[b]
        if b not in teacher_of:  # identical tokenizers, valid UTF-8: the teacher scores the same ids
            teacher_ids.append(list(ids) + ([teacher_eos] if eos else []))
            segments.append(_one_token_per_segment(len(ids), eos, excluded))
            continue
        t_ids = teacher_of[b]
        teacher_ids.append(list(t_ids) + ([teacher_eos] if eos else []))
        if pair.teacher_bytes.join(t_ids) != text.encode("utf-8"):
            segments.append(None)  # the teacher normalised the text: nothing to align safely
            continue
        s_lengths = pair.student_bytes.lengths[np.asarray(ids, np.int64)] if len(ids) else np.zeros(0, np.int64)
        t_lengths = pair.teacher_bytes.lengths[np.asarray(t_ids, np.int64)] if t_ids else np.zeros(0, np.int64)
        repaired = bad.any()
        segments.append(
            segment(
                s_lengths,
                t_lengths,
                s_bad_bytes=bad if repaired else None,
                s_offset_map=offset_map if repaired else None,
                eos=eos,
                boundary=boundary,
                s_excluded=excluded,
            )
        )
    return SegmentedResponses(texts, teacher_ids, segments)
