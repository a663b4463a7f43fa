"""BatchSegments from byte spans and the `exact` aligner, against hand-worked expectations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_opd import losses
from lightning_opd.align import (
    ScoredBatch,
    ScoredSide,
    TokenizerPair,
    build_aligner,
    segment_responses,
)
from lightning_opd.align.base import pack_segments
from lightning_opd.align.offsets import repair_utf8, segment
from lightning_opd.align.vocab import gpt2_byte_decoder
from lightning_opd.config import LossConfig


def byte_level_tokenizer(merges: list[tuple[str, str]], split_digits: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE with exactly the given merges (and <eos>, <pad> specials)."""
    alphabet = sorted(gpt2_byte_decoder())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    digits = pre_tokenizers.Digits(individual_digits=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level]) if split_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def hand_pair() -> TokenizerPair:
    student = byte_level_tokenizer([], split_digits=True)  # one token per byte
    # the teacher merges "12", "15" and the two bytes of "÷" (Ã, · in the GPT-2 byte map)
    teacher = byte_level_tokenizer([("1", "2"), ("1", "5"), ("Ã", "·")], split_digits=False)
    return TokenizerPair.build(student, teacher)


def pieces(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_hand_made_pair_segments_and_exact_rows(hand_pair):
    text = "12+3=15"
    s_ids = hand_pair.student(text, add_special_tokens=False)["input_ids"]
    assert pieces(hand_pair.student, s_ids) == ["1", "2", "+", "3", "=", "1", "5"]
    out = segment_responses(hand_pair, [s_ids], [True])
    t_ids = out.teacher_ids[0]
    assert pieces(hand_pair.teacher, t_ids) == ["12", "+", "3", "=", "15", "<eos>"]
    seg = out.per_response[0]
    # A segment closes at each 1:1 match and includes it: "1" "2" vs "12" is no match, so the
    # first segment runs to the "+" that closes it. [1 2 +]|[12 +]  [3]|[3]  [=]|[=]  [1 5 eos]|[15 eos]
    assert seg.s_bounds.tolist() == [0, 3, 4, 5, 8]
    assert seg.t_bounds.tolist() == [0, 2, 3, 4, 6]

    segments = pack_segments(out.per_response, np.array([0, 8]), np.array([0, 6]))
    fake = ScoredSide(torch.zeros(8, 3), torch.tensor(s_ids + [0]), torch.tensor([0, 8]))
    batch = ScoredBatch(fake, fake, hand_pair.vocab)
    rows = build_aligner("exact").build_rows(segments, batch)
    # shared-token positions only: "3" and "="; both spans are discarded
    assert rows.student_pos.tolist() == [3, 4]
    assert rows.teacher_pos.tolist() == [2, 3]
    assert rows.supervised_student_tokens == 2  # coverage 2/8


def test_shared_vocab_pairs_equal_bytes_and_eos(hand_pair):
    v = hand_pair.vocab
    s_pieces = pieces(hand_pair.student, v.student_ids.tolist())
    t_pieces = pieces(hand_pair.teacher, v.teacher_ids.tolist())
    pairs = dict(zip(s_pieces, t_pieces, strict=False))
    assert pairs["<eos>"] == "<eos>"
    assert all(a == b for a, b in pairs.items())  # same byte alphabet on both sides
    assert "12" not in t_pieces  # the teacher's merged tokens have no student counterpart
    assert "<pad>" not in s_pieces


def test_split_multibyte_character_does_not_desynchronise(hand_pair):
    text = "a÷b 12"
    s_ids = hand_pair.student(text, add_special_tokens=False)["input_ids"]
    assert len(s_ids) == len(text.encode())  # "÷" is two byte tokens
    out = segment_responses(hand_pair, [s_ids], [True])
    assert pieces(hand_pair.teacher, out.teacher_ids[0]) == ["a", "Ã·", "b", "Ġ", "12", "<eos>"]
    seg = out.per_response[0]
    # the student's two bytes of "÷" and the teacher's one token fall in one segment (closed by
    # the matching "b"); everything after it still matches: a | Ã · b | Ġ | 1 2 eos
    assert np.diff(seg.s_bounds).tolist() == [1, 3, 1, 3]
    assert np.diff(seg.t_bounds).tolist() == [1, 2, 1, 2]
    assert seg.valid.all()


def test_invalid_utf8_sample_is_unsupervised_and_later_tokens_still_match(hand_pair):
    ok = hand_pair.student("x", add_special_tokens=False)["input_ids"]
    half = hand_pair.student("÷", add_special_tokens=False)["input_ids"][:1]  # half a character
    tail = hand_pair.student("+3=3", add_special_tokens=False)["input_ids"]
    out = segment_responses(hand_pair, [ok + half + tail], [True])
    seg = out.per_response[0]
    assert "\ufffd" in out.texts[0]
    assert seg.n_invalid == 1
    # x matches; the bad byte is folded into the next segment, which is invalid; the rest match
    assert seg.s_bounds.tolist() == [0, 1, 3, 4, 5, 6, 7]
    assert seg.valid.tolist() == [True, False, True, True, True, True]


def test_identical_tokenizers_take_the_identity_path(split_tokenizer):
    pair = TokenizerPair.build(split_tokenizer, split_tokenizer)
    assert pair.identical and pair.vocab.identity
    ids = split_tokenizer("7+5=12 #### 12", add_special_tokens=False)["input_ids"]
    out = segment_responses(pair, [ids], [True])
    assert out.teacher_ids[0] == ids + [split_tokenizer.eos_token_id]
    assert np.diff(out.per_response[0].s_bounds).tolist() == [1] * (len(ids) + 1)


def test_exact_on_identical_tokenizers_equals_plain_full_vocabulary_opd(split_tokenizer):
    pair = TokenizerPair.build(split_tokenizer, split_tokenizer)
    torch.manual_seed(0)
    responses = [split_tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("1+2=3", "45-6=39 #### 39")]
    out = segment_responses(pair, responses, [True, False])
    lengths = [len(r) + e for r, e in zip(responses, [True, False], strict=False)]
    offsets = torch.tensor([0, lengths[0], sum(lengths)])
    vocab = len(split_tokenizer)
    zs = torch.randn(sum(lengths), vocab, requires_grad=True)
    zt = torch.randn(sum(lengths), vocab)
    ids = torch.tensor(sum(out.teacher_ids, []))
    batch = ScoredBatch(ScoredSide(zs, ids, offsets), ScoredSide(zt, ids, offsets), pair.vocab)
    segments = pack_segments(out.per_response, offsets.numpy(), offsets.numpy())
    aligner = build_aligner("exact")
    rows = aligner.build_rows(segments, batch)
    per_row = aligner.row_losses(rows, batch, LossConfig(divergence="rkl"))
    loss = losses.reduce_rows(per_row, None, segments.n_student_tokens)
    # plain OPD: reverse KL at every response position over the whole vocabulary, token mean
    log_s, log_t = zs.log_softmax(-1), zt.log_softmax(-1)
    plain = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    torch.testing.assert_close(loss, plain)


text_strategy = st.text(
    alphabet=st.sampled_from(list("0123456789+-=# \nab÷é日本😀")), min_size=0, max_size=40
)


@settings(max_examples=60, deadline=None)
@given(text=text_strategy)
def test_segments_cover_the_same_bytes_on_both_sides(split_tokenizer, merge_tokenizer, text):
    pair = TokenizerPair.build(split_tokenizer, merge_tokenizer)
    s_ids = split_tokenizer(text, add_special_tokens=False)["input_ids"]
    out = segment_responses(pair, [s_ids], [True])
    seg = out.per_response[0]
    t_ids = out.teacher_ids[0][:-1]
    s_b = [pair.student_bytes.table[i] for i in s_ids] + [b""]
    t_b = [pair.teacher_bytes.table[i] for i in t_ids] + [b""]
    joined_s, joined_t = b"", b""
    for g in range(len(seg.s_bounds) - 1):
        a = b"".join(s_b[seg.s_bounds[g] : seg.s_bounds[g + 1]])
        b = b"".join(t_b[seg.t_bounds[g] : seg.t_bounds[g + 1]])
        assert a == b
        joined_s, joined_t = joined_s + a, joined_t + b
    assert joined_s == text.encode()  # EOS closes the last segment: nothing is left over
    assert seg.s_bounds[-1] == len(s_ids) + 1 and seg.t_bounds[-1] == len(t_ids) + 1


def test_segment_without_eos_leaves_the_tail_after_the_last_match():
    # student "ab" "c" vs teacher "a" "bc": no 1:1 match at all
    seg = segment(np.array([2, 1]), np.array([1, 2]), eos=False)
    assert seg.s_bounds.tolist() == [0] and seg.t_bounds.tolist() == [0]


def test_repair_utf8_maps_offsets_of_valid_bytes():
    data = b"a" + "÷".encode()[:1] + b"b"
    text, offset_map, bad = repair_utf8(data)
    assert text == "a\ufffdb"
    assert bad.tolist() == [False, True, False]
    assert offset_map.tolist() == [0, 1, 4, 5]
