"""Tokens as bytes: each vocabulary entry's canonical byte string, and the shared vocabulary V∩.

Vocabulary strings are not comparable across tokenizer families (`Ġ`, `▁`, `Ċ`, `<0x0A>`), so
every token is mapped to the bytes it stands for:

- byte-level BPE (GPT-2, Llama-3, Qwen, DeepSeek, and tiktoken ranks converted by transformers):
  each character of the token string goes back through the inverse GPT-2 byte map;
- SentencePiece-style (Metaspace / ByteFallback decoders): `▁` -> space, `<0xNN>` -> that byte;
- anything else: the UTF-8 of the token string.

Special (control) tokens stand for no text and get empty bytes; they never enter V∩, except
that EOS is paired with EOS explicitly. The shared vocabulary is the set of pairs
(student id, teacher id) with equal canonical bytes; identical tokenizers give the identity map.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=1)
def gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes -> printable-unicode map (used by every byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codepoints = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codepoints.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codepoints, strict=False)}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _decoder_kind(backend_json: dict) -> str:
    """'byte_level', 'sentencepiece' or 'plain', read from the tokenizer's decoder/pre-tokenizer."""
    text = json.dumps({k: backend_json.get(k) for k in ("decoder", "pre_tokenizer")})
    if '"ByteLevel"' in text:
        return "byte_level"
    if '"Metaspace"' in text or '"ByteFallback"' in text or "\u2581" in text:
        return "sentencepiece"
    return "plain"


def token_bytes_table(tokenizer) -> list[bytes]:
    """Canonical bytes of every id of a Hugging Face fast tokenizer (index = token id).

    Special tokens map to b"". Ids without a vocabulary entry (padding rows of an embedding
    larger than the vocabulary) map to b"" too.
    """
    backend = tokenizer.backend_tokenizer
    kind = _decoder_kind(json.loads(backend.to_str()))
    byte_decoder = gpt2_byte_decoder()
    special_ids = set(tokenizer.all_special_ids)
    added = {i: tok for i, tok in tokenizer.added_tokens_decoder.items()}
    size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    table = [b""] * size
    for piece, idx in tokenizer.get_vocab().items():
        if idx in special_ids or (idx in added and added[idx].special):
            continue
        if idx in added:  # a non-special added token is literal text
            table[idx] = piece.encode("utf-8")
        elif kind == "byte_level":
            try:
                table[idx] = bytes(byte_decoder[ch] for ch in piece)
            except KeyError:  # a piece outside the byte alphabet: treat as literal text
                table[idx] = piece.encode("utf-8")
        elif kind == "sentencepiece":
            m = _BYTE_FALLBACK.match(piece)
            table[idx] = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()
        else:
            table[idx] = piece.encode("utf-8")
    return table


@dataclass
class TokenBytes:
    """A tokenizer's canonical bytes, packed for vectorised lookups.

    lengths[i] = len(bytes of id i); the bytes themselves are kept as a list for V∩ building.
    """

    table: list[bytes]
    lengths: np.ndarray  # (V,) int64

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TokenBytes:
        table = token_bytes_table(tokenizer)
        return cls(table=table, lengths=np.fromiter(map(len, table), np.int64, len(table)))

    def join(self, ids: np.ndarray | list[int]) -> bytes:
        return b"".join(map(self.table.__getitem__, ids))  # no Python frame per token


@dataclass
class SharedVocab:
    """V∩: aligned id lists, student_ids[j] and teacher_ids[j] have the same canonical bytes.

    `teacher_of_student[s]` is the teacher id paired with student id s, or -1.
    `identity` is True when both tokenizers are the same (V∩ = V, no index gather needed).
    """

    student_ids: torch.Tensor  # (|V∩|,) long
    teacher_ids: torch.Tensor  # (|V∩|,) long
    teacher_of_student: np.ndarray  # (V_S,) int64
    identity: bool = False
    # what built it, kept for aligners that need more than V∩ (the byte-prefix projection of
    # `bpm`, built lazily from them: align/projection.py); None where a test built V∩ by hand
    student_bytes: TokenBytes | None = None
    teacher_bytes: TokenBytes | None = None
    student_eos: int | None = None
    teacher_eos: int | None = None

    def __len__(self) -> int:
        return int(self.student_ids.numel())


def build_shared_vocab(
    student_bytes: TokenBytes,
    teacher_bytes: TokenBytes,
    student_eos: int | None,
    teacher_eos: int | None,
    *,
    identical: bool = False,
) -> SharedVocab:
    """Pair ids whose canonical bytes are equal; EOS is paired with EOS explicitly.

    When one side has several ids for the same bytes (rare: duplicated added tokens), the
    lowest id wins, so the map stays one-to-one.
    """
    n_student = len(student_bytes.table)
    if identical:
        ids = torch.arange(n_student)
        return SharedVocab(ids, ids.clone(), np.arange(n_student), identity=True,
                           student_bytes=student_bytes, teacher_bytes=teacher_bytes,
                           student_eos=student_eos, teacher_eos=teacher_eos)  # fmt: skip
    teacher_index: dict[bytes, int] = {}
    for t_id, b in enumerate(teacher_bytes.table):
        if b and b not in teacher_index:
            teacher_index[b] = t_id
    teacher_of_student = np.full(n_student, -1, np.int64)
    used: set[int] = set()
    for s_id, b in enumerate(student_bytes.table):
        t_id = teacher_index.get(b) if b else None
        if t_id is not None and t_id not in used:
            teacher_of_student[s_id] = t_id
            used.add(t_id)
    if student_eos is not None and teacher_eos is not None:
        teacher_of_student[student_eos] = teacher_eos
    s_ids = np.nonzero(teacher_of_student >= 0)[0]
    return SharedVocab(
        student_ids=torch.from_numpy(s_ids),
        teacher_ids=torch.from_numpy(teacher_of_student[s_ids]),
        teacher_of_student=teacher_of_student,
        student_bytes=student_bytes,
        teacher_bytes=teacher_bytes,
        student_eos=student_eos,
        teacher_eos=teacher_eos,
    )
