"""`simct`, `simct_1to1`, `random_span` and `boundary: offset`, against slow references and hand
-worked expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_opd import losses
from lightning_opd.align import (
    BatchSegments,
    ScoredBatch,
    ScoredSide,
    TokenizerPair,
    align_batch,
    build_aligner,
    segment_responses,
)
from lightning_opd.align.offsets import segment
from lightning_opd.align.random_span import merge_into_spans
from lightning_opd.config import AlignerConfig, LossConfig
from tests.test_align_exact import byte_level_tokenizer

RKL = LossConfig(divergence="rkl")  # the divergence the hand-worked expectations use
ARITHMETIC = ["12+345=357 #### 357", "7*8=56\n", "What is 12+7?", "1000-1=999"]
ARITHMETIC_EOS = [True, True, False, True]


@pytest.fixture(scope="module")
def hand_pair() -> TokenizerPair:
    student = byte_level_tokenizer([], split_digits=True)  # one token per byte
    teacher = byte_level_tokenizer([("1", "2"), ("1", "5"), ("Ã", "·")], split_digits=False)
    return TokenizerPair.build(student, teacher)


@pytest.fixture(scope="module")
def split_merge_pair(split_tokenizer, merge_tokenizer) -> TokenizerPair:
    return TokenizerPair.build(split_tokenizer, merge_tokenizer)


def scored(pair: TokenizerPair, texts: list[str], eos: list[bool], seed: int = 0,
           boundary: str = "match") -> tuple[ScoredBatch, BatchSegments]:  # fmt: skip
    """Random logits for both sides of the given responses, and their packed segments."""
    s_ids = [pair.student(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = align_batch(pair, s_ids, eos, boundary=boundary)
    s_full = [ids + [pair.student.eos_token_id] * e for ids, e in zip(s_ids, eos, strict=True)]
    s_off = np.cumsum([0] + [len(x) for x in s_full])
    t_off = np.cumsum([0] + [len(x) for x in out.teacher_ids])
    gen = torch.Generator().manual_seed(seed)
    zs = (2 * torch.randn(int(s_off[-1]), len(pair.student), generator=gen)).requires_grad_()
    zt = 2 * torch.randn(int(t_off[-1]), len(pair.teacher), generator=gen)
    student = ScoredSide(zs, torch.tensor(sum(s_full, [])), torch.from_numpy(s_off))
    teacher = ScoredSide(zt, torch.tensor(sum(out.teacher_ids, [])), torch.from_numpy(t_off))
    return ScoredBatch(student, teacher, pair.vocab), out.segments


def reference_simct(batch: ScoredBatch, seg: BatchSegments, span_logit: str, tau: float) -> torch.Tensor:
    """Reverse KL per segment, straight from the formulas (float64, one segment at a time)."""
    vocab = batch.vocab
    support = list(zip(vocab.student_ids.tolist(), vocab.teacher_ids.tolist(), strict=True))
    zs, zt = batch.student.logits.double(), batch.teacher.logits.double()
    s_ids, t_ids = batch.student.ids.tolist(), batch.teacher.ids.tolist()

    def slot(z: torch.Tensor, ids: list[int], lo: int, hi: int) -> torch.Tensor:
        if span_logit == "mean_logit":  # mean raw logit, then tempered like the rest of the row
            return sum(z[k, ids[k]] for k in range(lo, hi)) / (hi - lo) / tau
        # mean tempered log-probability (already at temperature tau)
        return sum((z[k] / tau).log_softmax(-1)[ids[k]] for k in range(lo, hi)) / (hi - lo)

    out = []
    for c, d, a, b in zip(
        seg.s_lo.tolist(), seg.s_hi.tolist(), seg.t_lo.tolist(), seg.t_hi.tolist(), strict=True
    ):
        row_s = torch.stack([zs[c, i] for i, _ in support]) / tau
        row_t = torch.stack([zt[a, j] for _, j in support]) / tau
        if span_logit == "mean_logprob":  # V∩ as log-probabilities, the scale of the slot
            row_s = row_s - torch.log(torch.exp(zs[c] / tau).sum())
            row_t = row_t - torch.log(torch.exp(zt[a] / tau).sum())
        if d - c > 1 or b - a > 1:  # a span: one more slot; a shared-token row has V∩ only
            row_s = torch.cat([row_s, slot(zs, s_ids, c, d)[None]])
            row_t = torch.cat([row_t, slot(zt, t_ids, a, b)[None]])
        log_p_s = row_s - row_s.max() - torch.log(torch.exp(row_s - row_s.max()).sum())
        log_p_t = row_t - row_t.max() - torch.log(torch.exp(row_t - row_t.max()).sum())
        out.append((log_p_s.exp() * (log_p_s - log_p_t)).sum())
    return torch.stack(out)


def check_against_reference(batch, seg, span_logit, tau):
    aligner = build_aligner(AlignerConfig(name="simct", span_logit=span_logit, ratio=0.3))
    rows = aligner.build_rows(seg, None)
    got = aligner.row_losses(rows, batch, LossConfig(divergence="rkl", temperature=tau, chunk_rows=3))
    want = reference_simct(batch, seg, span_logit, tau)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
    (grad_got,) = torch.autograd.grad(got.sum(), batch.student.logits)
    (grad_want,) = torch.autograd.grad(want.sum(), batch.student.logits)
    torch.testing.assert_close(grad_got, grad_want.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("span_logit", "tau"),
    [("mean_logit", 1.0), ("mean_logprob", 1.0), ("mean_logit", 2.0), ("mean_logprob", 0.5)],
)
def test_simct_matches_slow_reference_on_hand_pair(hand_pair, span_logit, tau):
    batch, seg = scored(hand_pair, ["12+3=15", "a÷b 12+15"], [True, False])
    check_against_reference(batch, seg, span_logit, tau)


@pytest.mark.parametrize("span_logit", ["mean_logit", "mean_logprob"])
def test_simct_matches_slow_reference_on_split_merge_pair(split_merge_pair, span_logit):
    batch, seg = scored(split_merge_pair, ARITHMETIC, ARITHMETIC_EOS, seed=1)
    assert (~seg.is_shared_token).sum() >= 4  # the texts do exercise spans
    check_against_reference(batch, seg, span_logit, 1.0)


def test_hand_rows_of_12_plus_3_with_eos(hand_pair):
    batch, seg = scored(hand_pair, ["12+3=15"], [True])
    aligner = build_aligner("simct")
    rows = aligner.build_rows(seg, None)
    # [1 2 +]|[12 +]  [3]|[3]  [=]|[=]  [1 5 eos]|[15 eos]
    assert rows.student_pos.tolist() == [0, 3, 4, 5]
    assert rows.teacher_pos.tolist() == [0, 2, 3, 4]
    assert rows.is_span.tolist() == [True, False, False, True]
    assert rows.supervised_student_tokens == 8  # coverage 8/8 (exact: 4/8)
    zs, zt = batch.student.logits.detach(), batch.teacher.logits
    s, t = batch.student.ids.tolist(), batch.teacher.ids.tolist()
    student_slot, teacher_slot = aligner.span_slots(rows, batch, RKL)
    hand_s = [
        (zs[0, s[0]] + zs[1, s[1]] + zs[2, s[2]]) / 3,
        (zs[5, s[5]] + zs[6, s[6]] + zs[7, s[7]]) / 3,
    ]
    hand_t = [(zt[0, t[0]] + zt[1, t[1]]) / 2, (zt[4, t[4]] + zt[5, t[5]]) / 2]
    torch.testing.assert_close(student_slot[[0, 3]].detach(), torch.stack(hand_s))
    torch.testing.assert_close(teacher_slot[[0, 3]], torch.stack(hand_t))
    assert torch.isneginf(student_slot[[1, 2]]).all() and torch.isneginf(teacher_slot[[1, 2]]).all()


def test_mean_logprob_slot_is_the_hand_computed_mean_log_probability(hand_pair):
    batch, seg = scored(hand_pair, ["12+3=15"], [True])
    aligner = build_aligner(AlignerConfig(name="simct", span_logit="mean_logprob"))
    rows = aligner.build_rows(seg, None)
    student_slot, teacher_slot = aligner.span_slots(rows, batch, RKL)

    def log_prob(z: torch.Tensor, k: int, token: int) -> float:
        row = z[k].tolist()
        return row[token] - math.log(sum(math.exp(v) for v in row))

    s, t = batch.student.ids.tolist(), batch.teacher.ids.tolist()
    zs, zt = batch.student.logits.detach(), batch.teacher.logits
    assert student_slot[0].item() == pytest.approx(
        sum(log_prob(zs, k, s[k]) for k in range(3)) / 3, abs=1e-5
    )
    assert teacher_slot[3].item() == pytest.approx(
        sum(log_prob(zt, k, t[k]) for k in (4, 5)) / 2, abs=1e-5
    )


def test_identical_tokenizers_make_every_aligner_plain_opd(split_tokenizer):
    pair = TokenizerPair.build(split_tokenizer, split_tokenizer)
    batch, seg = scored(pair, ARITHMETIC, ARITHMETIC_EOS, seed=2)
    log_s, log_t = batch.student.logits.log_softmax(-1), batch.teacher.logits.log_softmax(-1)
    plain = (log_s.exp() * (log_s - log_t)).sum(-1).mean()  # every position, full vocabulary
    for name in ("exact", "simct", "simct_1to1", "random_span"):
        aligner = build_aligner(AlignerConfig(name=name, ratio=0.0))
        rows = aligner.build_rows(seg, None)
        loss = losses.reduce_rows(
            aligner.row_losses(rows, batch, RKL), None, seg.n_student_tokens
        )
        torch.testing.assert_close(loss, plain, msg=name)


@pytest.mark.parametrize("boundary", ["match", "offset"])
def test_simct_1to1_is_exact_and_keeps_the_match_that_closes_each_span(hand_pair, boundary):
    batch, seg = scored(hand_pair, ["12+3=15"], [True], boundary=boundary)  # seg records its boundary
    one, ex = build_aligner("simct_1to1"), build_aligner("exact")
    one_rows, ex_rows = one.build_rows(seg, None), ex.build_rows(seg, None)
    # the released span_ctkd_1to1 keeps every 1:1 match: "+" (closing [1 2 +]|[12 +]), "3", "=",
    # eos; so does exact now
    for rows in (one_rows, ex_rows):
        assert rows.student_pos.tolist() == [2, 3, 4, 7] and rows.teacher_pos.tolist() == [1, 2, 3, 5]
        assert not rows.is_span.any() and rows.supervised_student_tokens == 4
    torch.testing.assert_close(one.row_losses(one_rows, batch, RKL), ex.row_losses(ex_rows, batch, RKL))


text_strategy = st.text(alphabet=st.sampled_from(list("0123456789+-=*# \nab÷é日本😀")), max_size=40)


@settings(max_examples=40, deadline=None)
@given(text=text_strategy, eos=st.booleans())
def test_exact_rows_are_the_1to1_matches_and_simct_covers_them_all(split_merge_pair, text, eos):
    s_ids = split_merge_pair.student(text, add_special_tokens=False)["input_ids"]
    seg = align_batch(split_merge_pair, [s_ids], [eos]).segments
    exact, simct, one = (
        build_aligner("exact").build_rows(seg, None),
        build_aligner("simct").build_rows(seg, None),
        build_aligner("simct_1to1").build_rows(seg, None),
    )
    # the expectation, from the two tokenizations' byte spans alone: the 1:1 matches (same byte
    # span), EOS a final one, are exact's rows; a match right after another on both sides is a
    # one-token segment, simct's shared-token row; every student token up to the last match is
    # supervised by simct (the text is valid UTF-8)
    t_ids = split_merge_pair.teacher(text, add_special_tokens=False)["input_ids"]

    def spans(table: list[bytes], ids: list[int]) -> list[tuple[int, int]]:
        ends = np.cumsum([len(table[i]) for i in ids], dtype=np.int64).tolist()
        return [(e - len(table[i]), e) for i, e in zip(ids, ends, strict=True)]

    s_spans = spans(split_merge_pair.student_bytes.table, s_ids)
    t_index = {span: j for j, span in enumerate(spans(split_merge_pair.teacher_bytes.table, t_ids))}
    matches = [(i, t_index[span]) for i, span in enumerate(s_spans) if span[1] > span[0] and span in t_index]
    if eos:
        matches.append((len(s_ids), len(t_ids)))
    previous = [(-1, -1), *matches][: len(matches)]  # the match before each (a virtual one at the start)
    shared = {(i, j) for (i, j), (pi, pj) in zip(matches, previous, strict=True) if (pi, pj) == (i - 1, j - 1)}
    supervised = set(range(matches[-1][0] + 1)) if matches else set()

    simct_shared = ~simct.is_span
    simct_pairs = set(
        zip(simct.student_pos[simct_shared].tolist(), simct.teacher_pos[simct_shared].tolist(), strict=True)
    )
    assert set(zip(exact.student_pos.tolist(), exact.teacher_pos.tolist(), strict=True)) == set(matches)
    assert simct_pairs == shared
    assert sorted(simct.s_members.tolist()) == sorted(supervised)
    assert sorted(exact.s_members.tolist()) == sorted(i for i, _ in matches)
    # exact ⊂ simct: every student token exact supervises, simct supervises too
    assert set(exact.s_members.tolist()) <= set(simct.s_members.tolist())
    for field in ("student_pos", "teacher_pos", "s_members", "s_member_row", "t_members", "t_member_row"):
        assert torch.equal(getattr(one, field), getattr(exact, field)), field  # simct_1to1 = exact


def test_random_span_ratio_zero_is_simct(split_merge_pair):
    batch, seg = scored(split_merge_pair, ARITHMETIC, ARITHMETIC_EOS, seed=3)
    simct, random_span = build_aligner("simct"), build_aligner(AlignerConfig(name="random_span", ratio=0.0))
    a, b = simct.build_rows(seg, None), random_span.build_rows(seg, None)
    for field in (
        "student_pos",
        "teacher_pos",
        "s_members",
        "s_member_row",
        "t_members",
        "t_member_row",
    ):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    torch.testing.assert_close(
        random_span.row_losses(b, batch, RKL), simct.row_losses(a, batch, RKL)
    )


def test_random_span_merges_every_mergeable_row_at_ratio_one_and_keeps_coverage(split_merge_pair):
    _, seg = scored(split_merge_pair, ARITHMETIC, ARITHMETIC_EOS, seed=3)
    merged = merge_into_spans(seg, 1.0, torch.Generator().manual_seed(0))
    assert len(merged.seq) < len(seg.seq)
    successor = torch.cat(
        [
            (merged.seq[1:] == merged.seq[:-1]) & (merged.s_lo[1:] == merged.s_hi[:-1]),
            torch.tensor([False]),
        ]
    )
    assert not (
        merged.is_shared_token & successor
    ).any()  # only units with nothing after them stay single
    for ratio in (0.3, 1.0):
        rows = build_aligner(AlignerConfig(name="random_span", ratio=ratio)).build_rows(seg, None)
        simct = build_aligner("simct").build_rows(seg, None)
        assert sorted(rows.s_members.tolist()) == sorted(simct.s_members.tolist())
        assert sorted(rows.t_members.tolist()) == sorted(simct.t_members.tolist())


def test_random_span_joins_each_chosen_segment_with_the_one_after_it(hand_pair, split_merge_pair):
    _, seg = scored(hand_pair, ["3+3+3=9"], [True])  # eight shared-token segments, eos included
    assert seg.is_shared_token.all() and len(seg.seq) == 8
    whole = merge_into_spans(seg, 1.0, torch.Generator())  # seven chosen: one chain to the end
    assert (whole.s_lo.tolist(), whole.s_hi.tolist(), whole.t_hi.tolist()) == ([0], [8], [8])
    _, seg = scored(split_merge_pair, ARITHMETIC, ARITHMETIC_EOS, seed=4)
    merged = merge_into_spans(seg, 0.5, torch.Generator().manual_seed(1))
    has_successor = (seg.seq[1:] == seg.seq[:-1]) & (seg.s_lo[1:] == seg.s_hi[:-1])
    n_mergeable = int((seg.is_shared_token[:-1] & has_successor).sum())
    assert len(merged.seq) == len(seg.seq) - round(0.5 * n_mergeable)  # one unit less per merge
    unit_of = torch.searchsorted(merged.s_lo, seg.s_lo, right=True) - 1  # (G,) original -> unit
    last_in_unit = torch.cat([unit_of[1:] != unit_of[:-1], torch.tensor([True])])
    assert seg.is_shared_token[~last_in_unit].all()  # only chosen shared-token segments join on


def test_random_span_is_deterministic_for_a_seed_and_advances_per_call(split_merge_pair):
    _, seg = scored(split_merge_pair, ARITHMETIC * 3, ARITHMETIC_EOS * 3)
    first, second = (
        build_aligner(AlignerConfig(name="random_span", ratio=0.5), seed=7),
        build_aligner(AlignerConfig(name="random_span", ratio=0.5), seed=7),
    )
    calls_a = [first.build_rows(seg, None).student_pos for _ in range(2)]
    calls_b = [second.build_rows(seg, None).student_pos for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(calls_a, calls_b, strict=True))
    assert not torch.equal(calls_a[0], calls_a[1])  # the generator moved on


def test_offset_boundaries_on_the_hand_pair(hand_pair):
    s_ids = hand_pair.student("12+3=15", add_special_tokens=False)["input_ids"]
    seg = segment_responses(hand_pair, [s_ids], [True], boundary="offset").per_response[0]
    # [1 2]|[12]  [+]|[+]  [3]|[3]  [=]|[=]  [1 5]|[15]  [eos]|[eos]
    assert seg.s_bounds.tolist() == [0, 2, 3, 4, 5, 7, 8]
    assert seg.t_bounds.tolist() == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="boundary"):
        segment(np.array([1]), np.array([1]), boundary="chunk")


def test_offset_boundaries_leave_only_the_invalid_byte_unsupervised(hand_pair):
    ids = [hand_pair.student(p, add_special_tokens=False)["input_ids"] for p in ("x", "÷", "+3=3")]
    student = ids[0] + ids[1][:1] + ids[2]  # "x", half of "÷", "+3=3"
    match = segment_responses(hand_pair, [student], [True]).per_response[0]
    offset = segment_responses(hand_pair, [student], [True], boundary="offset").per_response[0]
    assert match.s_bounds.tolist() == [0, 1, 3, 4, 5, 6, 7]  # the bad byte takes "+" with it
    assert offset.s_bounds.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # it closes on its own U+FFFD
    assert offset.valid.tolist() == [True, False, True, True, True, True, True]
    assert offset.n_invalid == match.n_invalid == 1


def test_zero_length_tokens_fold_into_the_next_segment_in_both_modes():
    # student "a" "" "" "b" "c" vs teacher "a" "bc"
    s_len, t_len = np.array([1, 0, 0, 1, 1]), np.array([1, 2])
    assert segment(s_len, t_len, eos=True).s_bounds.tolist() == [0, 1, 6]
    offset = segment(s_len, t_len, eos=True, boundary="offset")
    assert offset.s_bounds.tolist() == [0, 1, 5, 6] and offset.t_bounds.tolist() == [0, 1, 2, 3]
    # two empty student tokens used to come back from intersect1d as a bogus match
    seg = segment(np.array([0, 0, 1]), np.array([1]))
    assert seg.s_bounds.tolist() == [0, 3] and seg.t_bounds.tolist() == [0, 1]


@settings(max_examples=40, deadline=None)
@given(text=text_strategy)
def test_offset_segments_refine_match_segments(split_merge_pair, text):
    s_ids = split_merge_pair.student(text, add_special_tokens=False)["input_ids"]
    match = segment_responses(split_merge_pair, [s_ids], [True]).per_response[0]
    out = segment_responses(split_merge_pair, [s_ids], [True], boundary="offset")
    offset = out.per_response[0]
    match_bounds = set(zip(match.s_bounds.tolist(), match.t_bounds.tolist(), strict=True))
    assert match_bounds <= set(zip(offset.s_bounds.tolist(), offset.t_bounds.tolist(), strict=True))
    s_bytes = [split_merge_pair.student_bytes.table[i] for i in s_ids] + [b""]
    t_bytes = [split_merge_pair.teacher_bytes.table[i] for i in out.teacher_ids[0][:-1]] + [b""]
    for g in range(len(offset.s_bounds) - 1):
        s_lo, s_hi, t_lo, t_hi = *offset.s_bounds[g : g + 2], *offset.t_bounds[g : g + 2]
        assert b"".join(s_bytes[s_lo:s_hi]) == b"".join(t_bytes[t_lo:t_hi])


def test_sampled_form_span_advantage_is_summed_teacher_minus_student_logprobs(hand_pair):
    batch, seg = scored(hand_pair, ["12+3=15"], [True])
    aligner = build_aligner("simct")
    rows = aligner.build_rows(seg, None)
    per_row = aligner.row_losses(rows, batch, LossConfig(form="sampled"))
    zs, zt = batch.student.logits, batch.teacher.logits
    s, t = batch.student.ids, batch.teacher.ids
    student_lp = zs.detach().log_softmax(-1)[torch.arange(3), s[:3]].sum()  # "1" "2" "+"
    teacher_lp = zt.log_softmax(-1)[torch.arange(2), t[:2]].sum()  # "12" "+"
    advantage = teacher_lp - student_lp
    torch.testing.assert_close(per_row[0].detach(), -advantage * student_lp)
    (grad,) = torch.autograd.grad(per_row[0], zs)
    # d/dz_k of -A·Σ log π_S(s_k) = -A·(onehot(s_k) - softmax(z_k)) at the span's three tokens
    hand = torch.zeros_like(zs)
    for k in range(3):
        hand[k] = -advantage * (
            torch.nn.functional.one_hot(s[k], zs.shape[1]) - zs[k].detach().softmax(-1)
        )
    torch.testing.assert_close(grad, hand)
