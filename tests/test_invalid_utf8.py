"""Student samples that are not valid UTF-8 (half a character, stray bytes), against a teacher that
has a token of its own for U+FFFD: the character the repaired text shows in their place.

The student's bad byte becomes U+FFFD in the shared text, so its byte span there is exactly the
teacher's U+FFFD token's: only the invalid mark keeps the two from being taken for a 1:1 match.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_opd.align import TokenizerPair, segment_responses
from lightning_opd.align.vocab import gpt2_byte_decoder

BYTE_CHAR = {byte: char for char, byte in gpt2_byte_decoder().items()}  # byte -> its BPE symbol


def symbols(text: str) -> str:
    return "".join(BYTE_CHAR[b] for b in text.encode())


def byte_bpe(merged: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE whose only multi-byte tokens are the strings in `merged`, each merged left
    to right, plus <eos> and <pad>."""
    vocab = {ch: i for i, ch in enumerate(sorted(BYTE_CHAR.values()))}
    merges = []
    for text in merged:
        sym = symbols(text)
        for k in range(2, len(sym) + 1):
            merges.append((sym[: k - 1], sym[k - 1]))
            vocab.setdefault(sym[:k], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def fffd_pair() -> TokenizerPair:
    student = byte_bpe([])  # one token per byte: it can sample any byte string
    teacher = byte_bpe(["\ufffd", "÷", "日"])  # U+FFFD (EF BF BD) is one teacher token
    return TokenizerPair.build(student, teacher)


def student_ids(pair: TokenizerPair, data: bytes) -> list[int]:
    """The byte tokens spelling `data`, one per byte."""
    by_bytes = {b: i for i, b in enumerate(pair.student_bytes.table) if len(b) == 1}
    return [by_bytes[data[k : k + 1]] for k in range(len(data))]


def bad_bytes(data: bytes) -> list[bool]:
    """Bytes that are not part of a complete UTF-8 character, found by trying to decode the
    1 to 4 bytes starting at each position as exactly one character."""
    bad, k = [], 0
    while k < len(data):
        for n in (1, 2, 3, 4):
            try:
                if len(data[k : k + n].decode("utf-8")) == 1:
                    break
            except UnicodeDecodeError:
                continue
        else:
            bad.append(True)
            k += 1
            continue
        bad.extend([False] * n)
        k += n
    return bad


def test_teacher_spells_the_replacement_character_as_one_token(fffd_pair):
    ids = fffd_pair.teacher("x\ufffd+3", add_special_tokens=False)["input_ids"]
    assert fffd_pair.teacher.convert_ids_to_tokens(ids) == ["x", symbols("\ufffd"), "+", "3"]


def test_half_a_character_is_not_matched_with_the_teachers_replacement_token(fffd_pair):
    data = b"x" + "÷".encode()[:1] + b"+3=3"
    out = segment_responses(fffd_pair, [student_ids(fffd_pair, data)], [True])
    seg = out.per_response[0]
    assert out.texts[0] == "x\ufffd+3=3"
    teacher = fffd_pair.teacher.convert_ids_to_tokens(out.teacher_ids[0])
    assert teacher == ["x", symbols("\ufffd"), "+", "3", "=", "3", "<eos>"]
    assert seg.n_invalid == 1
    # "x" matches; the bad byte, spanning the same text as the teacher's U+FFFD, is not a match:
    # it folds into the segment that "+" closes, which is unsupervised; the rest still match
    assert seg.s_bounds.tolist() == [0, 1, 3, 4, 5, 6, 7]
    assert seg.t_bounds.tolist() == [0, 1, 3, 4, 5, 6, 7]
    assert seg.valid.tolist() == [True, False, True, True, True, True]


CHARS = list("0123456789+-= ab\n÷é日😀\ufffd")
MULTI_BYTE = [c.encode() for c in CHARS if len(c.encode()) > 1]
whole_char = st.sampled_from(CHARS).map(str.encode)
# the first k bytes of a multi-byte character (a lead without its continuation), or its last ones
split_char = st.sampled_from(MULTI_BYTE).flatmap(
    lambda enc: st.integers(1, len(enc) - 1).flatmap(lambda k: st.sampled_from([enc[:k], enc[k:]]))
)
invalid_byte = st.sampled_from([b"\x80", b"\xbf", b"\xc0", b"\xc1", b"\xf5", b"\xfe", b"\xff"])
byte_strings = st.lists(st.one_of(whole_char, whole_char, split_char, invalid_byte), max_size=16).map(b"".join)


@settings(max_examples=150, deadline=None)
@given(data=byte_strings)
def test_invalid_student_tokens_are_never_matched_and_everything_else_lines_up(fffd_pair, data):
    ids = student_ids(fffd_pair, data)
    out = segment_responses(fffd_pair, [ids], [True])
    seg, text = out.per_response[0], out.texts[0]
    bad = bad_bytes(data)
    assert seg.n_invalid == sum(bad)
    # one U+FFFD per bad byte, besides those the student wrote as whole characters
    assert text.count("\ufffd") == sum(bad) + data.decode("utf-8", "ignore").count("\ufffd")
    s_bytes = [data[k : k + 1] for k in range(len(data))] + [b""]  # one byte per token, then EOS
    t_bytes = [fffd_pair.teacher_bytes.table[i] for i in out.teacher_ids[0][:-1]] + [b""]
    s_bounds, t_bounds = seg.s_bounds.tolist(), seg.t_bounds.tolist()
    assert s_bounds[-1] == len(ids) + 1 and t_bounds[-1] == len(t_bytes)  # EOS closes the last one
    assert b"".join(t_bytes) == text.encode()
    for g, valid in enumerate(seg.valid.tolist()):
        s_lo, s_hi, t_lo, t_hi = s_bounds[g], s_bounds[g + 1], t_bounds[g], t_bounds[g + 1]
        touches_bad = any(bad[s_lo : min(s_hi, len(bad))])
        assert valid == (not touches_bad)
        if s_hi - 1 < len(ids):  # closed by a match, not by EOS: the closing token is valid
            assert not bad[s_hi - 1], (data, s_bounds)
        if valid:  # a supervised segment: both sides spell the same bytes
            assert b"".join(s_bytes[s_lo:s_hi]) == b"".join(t_bytes[t_lo:t_hi])


def test_bad_bytes_helper_on_hand_examples() -> None:
    assert bad_bytes("÷".encode()[:1] + b"a") == [True, False]
    assert bad_bytes("日".encode()[1:] + "é".encode()) == [True, True, False, False]
    assert bad_bytes(b"\xff" + "\ufffd".encode()) == [True, False, False, False]
    assert np.array_equal(bad_bytes("😀".encode()[:3]), [True, True, True])
