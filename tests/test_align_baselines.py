"""The coarse baselines `alm` (binarised chunk likelihoods) and `uld` (sorted-probability W1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_opd import losses
from lightning_opd.align import (
    BatchSegments,
    ScoredBatch,
    ScoredSide,
    TokenizerPair,
    align_batch,
    build_aligner,
)
from lightning_opd.align.alm import ALMAligner, binarised_kl, log1mexp
from lightning_opd.align.uld import ULDAligner
from lightning_opd.align.vocab import SharedVocab
from lightning_opd.config import AlignerConfig, LossConfig


def aligner(name: str, **overrides):
    """Built the way the module builds it: the AlignerConfig defaults, with `overrides`."""
    return build_aligner(AlignerConfig(name=name, **overrides))


def no_shared_vocab(n_student: int) -> SharedVocab:
    """V∩ = ∅: neither baseline may look at it."""
    empty = torch.zeros(0, dtype=torch.long)
    return SharedVocab(empty, empty.clone(), np.full(n_student, -1, np.int64))


def one_sequence_batch(zs, s_ids, zt, t_ids) -> ScoredBatch:
    s_ids, t_ids = torch.as_tensor(s_ids), torch.as_tensor(t_ids)
    student = ScoredSide(zs, s_ids, torch.tensor([0, len(s_ids)]))
    teacher = ScoredSide(zt, t_ids, torch.tensor([0, len(t_ids)]))
    return ScoredBatch(student, teacher, no_shared_vocab(zs.shape[-1]))


def one_sequence_segments(s_bounds: list[int], t_bounds: list[int], boundary: str = "match") -> BatchSegments:
    s, t = torch.tensor(s_bounds), torch.tensor(t_bounds)
    g = len(s_bounds) - 1
    seq = torch.zeros(g, dtype=torch.long)
    return BatchSegments(seq, s[:-1], s[1:], t[:-1], t[1:], s_bounds[-1], boundary=boundary)


def logits_with_probs(ids: list[int], probs: list[float], vocab: int) -> torch.Tensor:
    """Logits whose softmax gives token ids[p] probability probs[p], the rest spread evenly."""
    rows = torch.empty(len(ids), vocab, dtype=torch.float64)
    for p, (i, q) in enumerate(zip(ids, probs, strict=True)):
        rows[p] = (1 - q) / (vocab - 1)
        rows[p, i] = q
    return rows.log().float()


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def batch_from_texts(student_tok, teacher_tok, texts, seed=0):
    """BatchSegments and a random-logit ScoredBatch for real tokenizations of `texts` (EOS-ended)."""
    pair = TokenizerPair.build(student_tok, teacher_tok)
    responses = [student_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = align_batch(pair, responses, [True] * len(texts))
    s_ids = torch.tensor(sum((r + [student_tok.eos_token_id] for r in responses), []))
    t_ids = torch.tensor(sum(out.teacher_ids, []))
    s_off = np.cumsum([0] + [len(r) + 1 for r in responses])
    t_off = np.cumsum([0] + [len(t) for t in out.teacher_ids])
    gen = torch.Generator().manual_seed(seed)
    zs = torch.randn(len(s_ids), len(student_tok), generator=gen, requires_grad=True)
    zt = torch.randn(len(t_ids), len(teacher_tok), generator=gen)
    batch = ScoredBatch(
        ScoredSide(zs, s_ids, torch.from_numpy(s_off)),
        ScoredSide(zt, t_ids, torch.from_numpy(t_off)),
        pair.vocab,
    )
    return out.segments, batch


TEXTS = ("12+39=51 #### 51", "7*8=56\n#### 56", "What is 605+17? 622")


# ---------------------------------------------------------------- alm


def reference_alm(ell_s: float, ell_t: float, tau: float) -> float:
    """τ · KL(Bern(p_T^{1/τ}) || Bern(p_S^{1/τ})) with plain math."""
    q_s, q_t = math.exp(ell_s / tau), math.exp(ell_t / tau)
    return tau * (q_t * math.log(q_t / q_s) + (1 - q_t) * math.log((1 - q_t) / (1 - q_s)))


@pytest.mark.parametrize("tau", [1.0, 2.0, 100.0])
def test_alm_hand_computed_two_chunks(tau):
    # chunk 0: student tokens 0,1 (p = .5, .4) vs teacher token 0 (p = .3);
    # chunk 1: student token 2 (p = .9) vs teacher token 1 (p = .6)
    zs = logits_with_probs([1, 3, 0], [0.5, 0.4, 0.9], vocab=4).requires_grad_()
    zt = logits_with_probs([2, 0], [0.3, 0.6], vocab=5)
    batch = one_sequence_batch(zs, [1, 3, 0], zt, [2, 0])
    alm = aligner("alm", alm_temperature=tau)
    rows = alm.build_rows(one_sequence_segments([0, 2, 3], [0, 1, 2]), batch)
    got = alm.row_losses(rows, batch, LossConfig())
    want = [reference_alm(math.log(0.5 * 0.4), math.log(0.3), tau),
            reference_alm(math.log(0.9), math.log(0.6), tau)]  # fmt: skip
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-4, atol=1e-6)


def test_alm_large_temperature_tends_to_the_released_closed_form():
    # the released code uses (ℓ_T − ℓ_S) + ℓ_T log(ℓ_S / ℓ_T) for τ >= 50: the τ → ∞ limit
    ell_s = torch.tensor([-0.3, -2.0, -7.0])
    ell_t = torch.tensor([-1.1, -0.5, -7.0])
    closed = (ell_t - ell_s) + ell_t * torch.log(ell_s / ell_t)
    torch.testing.assert_close(binarised_kl(ell_s, ell_t, 1e5), closed, rtol=2e-3, atol=1e-5)
    assert not torch.allclose(binarised_kl(ell_s, ell_t, 1.0), closed, rtol=0.05)


def test_alm_identical_models_give_zero(split_tokenizer):
    segments, batch = batch_from_texts(split_tokenizer, split_tokenizer, TEXTS)
    batch.teacher.logits = batch.student.logits.detach().clone()
    alm = aligner("alm")
    per_row = alm.row_losses(alm.build_rows(segments, batch), batch, LossConfig())
    torch.testing.assert_close(per_row, torch.zeros_like(per_row))


def test_alm_gradient_reaches_the_student_only(split_tokenizer, merge_tokenizer):
    segments, batch = batch_from_texts(split_tokenizer, merge_tokenizer, TEXTS)
    batch.teacher.logits.requires_grad_()
    alm = aligner("alm")
    alm.row_losses(alm.build_rows(segments, batch), batch, LossConfig()).sum().backward()
    assert batch.teacher.logits.grad is None
    grad = batch.student.logits.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("tau", [1.0, 100.0])
def test_alm_stable_for_extreme_chunk_likelihoods(tau):
    # chunk log-likelihoods −500 (student) vs −1 and vs −500 (teacher), and a certain student
    # (ℓ_S = 0 exactly in float32) vs an unsure teacher
    zs = torch.tensor([[0.0, -500.0], [0.0, -500.0], [100.0, 0.0]], requires_grad=True)
    zt = torch.tensor([[0.0, math.log(math.e - 1)], [0.0, -500.0], [0.0, 0.0]])
    batch = one_sequence_batch(zs, [1, 1, 0], zt, [0, 1, 0])
    alm = aligner("alm", alm_temperature=tau)
    rows = alm.build_rows(one_sequence_segments([0, 1, 2, 3], [0, 1, 2, 3]), batch)
    per_row = alm.row_losses(rows, batch, LossConfig())
    per_row.sum().backward()
    assert torch.isfinite(per_row).all() and per_row[0] > 0
    assert per_row[1].abs() < 1e-5  # equal likelihoods, however small
    assert torch.isfinite(zs.grad).all()
    x = torch.tensor([-1e-9, -0.5, -0.7, -30.0, -500.0], requires_grad=True)
    log1mexp(x).sum().backward()
    torch.testing.assert_close(log1mexp(x.detach()), torch.log1p(-torch.exp(x.double())).float())
    assert torch.isfinite(x.grad).all()


def test_alm_covers_every_token_of_every_segment(split_tokenizer, merge_tokenizer):
    segments, batch = batch_from_texts(split_tokenizer, merge_tokenizer, TEXTS)
    rows = aligner("alm").build_rows(segments, None)  # no logits needed (coverage CLI)
    in_segments = int((segments.s_hi - segments.s_lo).sum())
    assert rows.supervised_student_tokens == in_segments == segments.n_student_tokens
    assert torch.equal(rows.s_members.sort().values, torch.arange(segments.n_student_tokens))
    exact = build_aligner("exact").build_rows(segments, None)
    assert exact.supervised_student_tokens < in_segments  # the tokenizers do disagree here


# ---------------------------------------------------------------- uld


def uld_losses(batch: ScoredBatch, seg: BatchSegments, settings=None, **options):
    uld = aligner("uld", **options)
    rows = uld.build_rows(seg, batch)
    return uld.row_losses(rows, batch, settings or LossConfig())


def test_uld_identical_distributions_give_zero(split_tokenizer):
    segments, batch = batch_from_texts(split_tokenizer, split_tokenizer, TEXTS)
    batch.teacher.logits = batch.student.logits.detach().clone()
    per_row = uld_losses(batch, segments, uld_top_k=16)
    torch.testing.assert_close(per_row, torch.zeros_like(per_row))


def test_uld_ignores_which_token_holds_the_mass():
    gen = torch.Generator().manual_seed(1)
    zs = torch.randn(4, 30, generator=gen)
    zt = torch.randn(4, 30, generator=gen)
    permuted = zt[:, torch.randperm(30, generator=gen)]
    seg = one_sequence_segments([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    ids = [0, 1, 2, 3]
    plain = uld_losses(one_sequence_batch(zs, ids, zt, ids), seg, uld_top_k=8)
    shuffled = uld_losses(one_sequence_batch(zs, ids, permuted, ids), seg, uld_top_k=8)
    torch.testing.assert_close(plain, shuffled)
    rkl = losses.full_divergence(zs, zt, divergence="rkl")
    rkl_shuffled = losses.full_divergence(zs, permuted, divergence="rkl")
    assert not torch.allclose(rkl, rkl_shuffled, rtol=1e-2)


@pytest.mark.parametrize("weight", [1.0, 1.5, 2.5])
def test_uld_hand_computed_w1_with_tail_bucket(weight):
    # k = 2: student sorted (.5, .3 | tail .2), teacher sorted (.6, .3 | tail .1)
    zs = logits_of([[0.3, 0.5, 0.2]]).requires_grad_()
    zt = logits_of([[0.1, 0.6, 0.3]])
    batch = one_sequence_batch(zs, [0], zt, [0])
    got = uld_losses(batch, one_sequence_segments([0, 1], [0, 1]), uld_top_k=2, uld_weight=weight)
    w1 = abs(0.5 - 0.6) + abs(0.3 - 0.3) + abs(0.2 - 0.1)
    torch.testing.assert_close(got, torch.tensor([weight * w1]))


@pytest.mark.parametrize(("top_k", "w1"), [(1024, 0.1 + 0.0 + 0.05 + 0.15), (2, 0.1 + 0.0 + 0.1)])
def test_uld_vocabularies_of_different_sizes(top_k, w1):
    # student (.5, .3, .2) over 3 tokens, teacher (.4, .3, .15, .1, .05) over 5; V∩ is empty.
    # k = 1024 clamps to 3: the teacher's tail .15 is what zero-padding the student would give.
    zs = logits_of([[0.2, 0.5, 0.3]]).requires_grad_()
    zt = logits_of([[0.1, 0.05, 0.3, 0.4, 0.15]])
    batch = one_sequence_batch(zs, [0], zt, [0])
    got = uld_losses(batch, one_sequence_segments([0, 1], [0, 1]), uld_top_k=top_k, uld_weight=1.0)
    torch.testing.assert_close(got, torch.tensor([w1]))
    got.sum().backward()
    assert torch.isfinite(zs.grad).all()


def test_uld_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(2)
    n = 9
    zt = torch.randn(n, 40, generator=gen)
    seg = one_sequence_segments(list(range(n + 1)), list(range(n + 1)))
    results = []
    for chunk in (1, 4096):
        zs = torch.randn(n, 50, generator=torch.Generator().manual_seed(3), requires_grad=True)
        batch = one_sequence_batch(zs, list(range(n)), zt, list(range(n)))
        per_row = uld_losses(batch, seg, LossConfig(chunk_rows=chunk), uld_top_k=8)
        per_row.sum().backward()
        results.append((per_row.detach(), zs.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_uld_rows_sit_at_the_one_to_one_matches():
    # student "1" "2" "+" "3" "=" "1" "5" <eos>, teacher "12" "+" "3" "=" "15" <eos>:
    # 1:1 matches are + 3 = <eos> (student 2 3 4 7, teacher 1 2 3 5), whatever the boundary mode
    by_match = one_sequence_segments([0, 3, 4, 5, 8], [0, 2, 3, 4, 6])
    by_offset = one_sequence_segments([0, 2, 3, 4, 5, 7, 8], [0, 1, 2, 3, 4, 5, 6], boundary="offset")
    for seg in (by_match, by_offset):
        rows = aligner("uld").build_rows(seg, None)
        assert rows.student_pos.tolist() == rows.s_members.tolist() == [2, 3, 4, 7]
        assert rows.teacher_pos.tolist() == rows.t_members.tolist() == [1, 2, 3, 5]
        assert rows.supervised_student_tokens == 4 and not rows.is_span.any()


# ---------------------------------------------------------------- both


def test_both_are_registered_with_every_config_option():
    assert isinstance(aligner("alm"), ALMAligner) and aligner("alm").name == "alm"
    assert isinstance(aligner("uld"), ULDAligner) and aligner("uld").name == "uld"


@pytest.mark.parametrize("name", ["alm", "uld"])
@pytest.mark.parametrize("form", ["full", "sampled"])
def test_full_pipeline_on_split_and_merge_tokenizers(split_tokenizer, merge_tokenizer, name, form):
    segments, batch = batch_from_texts(split_tokenizer, merge_tokenizer, TEXTS)
    assert batch.student.logits.shape[-1] != batch.teacher.logits.shape[-1]  # 268 vs 419 here
    batch.teacher.logits.requires_grad_()
    method = aligner(name)
    rows = method.build_rows(segments, batch)
    assert len(rows) == len(segments.seq)  # one row per segment (per closing 1:1 match for uld)
    per_row = method.row_losses(rows, batch, LossConfig(form=form, chunk_rows=5))
    assert per_row.shape == (len(rows),) and torch.isfinite(per_row).all()
    loss = losses.reduce_rows(per_row, None, segments.n_student_tokens)
    loss.backward()
    assert torch.isfinite(batch.student.logits.grad).all()
    assert batch.teacher.logits.grad is None  # the teacher is a fixed target
