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
    texts, teacher_ids, segments = [], [], []
    teacher_eos = pair.teacher.eos_token_id
    masks = loss_mask if loss_mask is not None else [None] * len(student_ids)
    for ids, eos, mask in zip(student_ids, ended_with_eos, masks, strict=True):
        excluded = None if mask is None or all(mask) else np.asarray(mask, np.int64) == 0
        raw = pair.student_bytes.join(ids)
        text, offset_map, bad = repair_utf8(raw)
        texts.append(text)
        if pair.identical and not bad.any():
            teacher_ids.append(list(ids) + ([teacher_eos] if eos else []))
            segments.append(_one_token_per_segment(len(ids), eos, excluded))
            continue
        t_ids = pair.teacher(text, add_special_tokens=False)["input_ids"]
        teacher_ids.append(list(t_ids) + ([teacher_eos] if eos else []))
        if pair.teacher_bytes.join(t_ids) != text.encode("utf-8"):
            segments.append(None)  # the teacher normalised the text: nothing to align safely
            continue
        s_lengths = pair.student_bytes.lengths[np.asarray(ids, np.int64)] if ids else np.zeros(0, np.int64)
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
