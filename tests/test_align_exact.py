"""BatchSegments from byte spans and the `exact` aligner, against hand-worked expectations and
a slow reference (every student and teacher token with the same bytes at the same offset)."""

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
    align_batch,
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
    # every 1:1 match: the "+" that closes the span [1 2 +]|[12 +], "3", "=", and EOS closing
    # [1 5 eos]|[15 eos]; the span tokens "1" "2" | "12" and "1" "5" | "15" are discarded
    assert rows.student_pos.tolist() == [2, 3, 4, 7]
    assert rows.teacher_pos.tolist() == [1, 2, 3, 5]
    assert rows.s_members.tolist() == [2, 3, 4, 7] and rows.t_members.tolist() == [1, 2, 3, 5]
    assert not rows.is_span.any()
    assert rows.supervised_student_tokens == 4  # coverage 4/8 (the older exact: 2/8)


def equal_tokens_at_equal_offsets(s_tokens: list[bytes], t_tokens: list[bytes],
                                  eos: bool) -> set[tuple[int, int]]:  # fmt: skip
    """The slow reference for `exact`: every (k, j) where student token k and teacher token j
    hold the same non-empty bytes starting at the same byte offset of the response, walked token
    by token from the byte strings alone; EOS (one past the last token) pairs with EOS."""
    teacher_at: dict[tuple[int, bytes], int] = {}
    offset = 0
    for j, token in enumerate(t_tokens):
        if token:
            teacher_at[offset, token] = j
        offset += len(token)
    pairs, offset = set(), 0
    for k, token in enumerate(s_tokens):
        if token and (offset, token) in teacher_at:
            pairs.add((k, teacher_at[offset, token]))
        offset += len(token)
    if eos:
        pairs.add((len(s_tokens), len(t_tokens)))
    return pairs


def reference_exact_pairs(pair: TokenizerPair, s_ids: list[list[int]], t_ids: list[list[int]],
                          eos: list[bool]) -> set[tuple[int, int]]:  # fmt: skip
    """`equal_tokens_at_equal_offsets` of each response, in packed positions (each side's
    responses back to back, EOS included where it ended with one). t_ids end with the teacher's
    EOS where the response did, as `segment_responses` returns them."""
    out: set[tuple[int, int]] = set()
    s_at = t_at = 0
    for s, t, e in zip(s_ids, t_ids, eos, strict=True):
        t_body = t[:-1] if e else t
        s_bytes = [pair.student_bytes.table[i] for i in s]
        t_bytes = [pair.teacher_bytes.table[i] for i in t_body]
        out |= {(s_at + k, t_at + j) for k, j in equal_tokens_at_equal_offsets(s_bytes, t_bytes, e)}
        s_at, t_at = s_at + len(s) + int(e), t_at + len(t)
    return out


def exact_pairs(segments) -> set[tuple[int, int]]:
    rows = build_aligner("exact").build_rows(segments, None)
    assert rows.s_members.tolist() == rows.student_pos.tolist()  # one token per side per row
    assert rows.t_members.tolist() == rows.teacher_pos.tolist()
    return set(zip(rows.student_pos.tolist(), rows.teacher_pos.tolist(), strict=True))


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.text(alphabet=st.sampled_from(list("0123456789+-=# \nab÷é日本😀")), max_size=40),
                   min_size=1, max_size=3),
    eos=st.lists(st.booleans(), min_size=3, max_size=3),
    boundary=st.sampled_from(["match", "offset"]),
    by_char=st.booleans(),
)  # fmt: skip
def test_exact_rows_are_the_equal_tokens_at_equal_offsets(split_tokenizer, merge_tokenizer, hand_pair,
                                                          texts, eos, boundary, by_char):  # fmt: skip
    eos = eos[: len(texts)]
    for pair in (TokenizerPair.build(split_tokenizer, merge_tokenizer), hand_pair):
        # by_char: one character at a time, a cut a sampling student may make
        pieces_of = [list(t) if by_char else [t] for t in texts]
        s_ids = [[i for p in parts for i in pair.student(p, add_special_tokens=False)["input_ids"]]
                 for parts in pieces_of]  # fmt: skip
        out = align_batch(pair, s_ids, eos, boundary=boundary)
        assert exact_pairs(out.segments) == reference_exact_pairs(pair, s_ids, out.teacher_ids, eos)


def test_exact_skips_an_observation_edge_that_closes_on_tokens_starting_apart():
    """An observation edge closes a segment where a token of each side ends, even when they
    start apart ("b" | "ab"): that closing pair is no 1:1 match, and exact has no row there."""
    # student "a" "b" | "c" "d" (observation) | "e", teacher "ab" "cd" "e", EOS on both
    s_lengths, t_lengths = np.array([1, 1, 1, 1, 1]), np.array([2, 2, 1])
    observed = np.array([False, False, True, True, False])
    for boundary in ("match", "offset"):
        seg = segment(s_lengths, t_lengths, eos=True, boundary=boundary, s_excluded=observed,
                      edges=np.array([2, 4]))  # fmt: skip
        # [a b]|[ab] (edge)  [c d]|[cd] (edge, observation)  [e]|[e]  [eos]|[eos]
        assert seg.s_bounds.tolist() == [0, 2, 4, 5, 6] and seg.t_bounds.tolist() == [0, 1, 2, 3, 4]
        assert seg.valid.tolist() == [True, False, True, True]
        assert seg.closes_on_match.tolist() == [False, False, True, True]
        packed = pack_segments([seg], np.array([0, 6]), np.array([0, 4]), boundary=boundary)
        assert exact_pairs(packed) == {(4, 2), (5, 3)}  # "e" and EOS; not ("b", "ab")


def test_exact_keeps_a_match_after_an_empty_token():
    """A token with no bytes (a control token) ends nowhere and folds into the next segment, so a
    match right after it closes a two-token segment: still a 1:1 match, still an exact row."""
    # student: an empty token, "a", "b"; teacher "a", "b"; no EOS
    for boundary in ("match", "offset"):
        seg = segment(np.array([0, 1, 1]), np.array([1, 1]), boundary=boundary)
        assert seg.s_bounds.tolist() == [0, 2, 3] and seg.t_bounds.tolist() == [0, 1, 2]
        packed = pack_segments([seg], np.array([0, 3]), np.array([0, 2]), boundary=boundary)
        assert exact_pairs(packed) == {(1, 0), (2, 1)}
        assert build_aligner("exact").build_rows(packed, None).supervised_student_tokens == 2


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
