"""The fast paths of the OPD step give the results of the plain ones (docs/performance.md, "Against
TRL's GOLD"): the fused full form over gathered rows (`losses.gathered_divergence`) against
`full_divergence` on the materialised rows, values and gradients, slots and masked slots, every
row at once or chunked and recomputed in backward; the blocked logsumexp (`gathered_logsumexp`,
the teacher mass) against torch.logsumexp; and the LM head computed a column block at a time on
the CPU (`ColumnHead`) against one whole-vocabulary block."""

from __future__ import annotations

import pytest
import torch

from lightning_opd import losses
from lightning_opd.align import build_aligner
from lightning_opd.align import columns as columns_module
from lightning_opd.align.base import shared_vocab_mass
from lightning_opd.align.columns import ColumnHead
from lightning_opd.config import AlignerConfig, LossConfig
from tests.test_chunked_loss import ALIGNER_FORMS, reference, scored, weighted


def rows_and_tables(seed: int, dtype=torch.float32, n_s=13, n_t=11, v_s=57, v_t=71, r=9, u=23):
    gen = torch.Generator().manual_seed(seed)
    zs = (3 * torch.randn(n_s, v_s, generator=gen)).to(dtype).requires_grad_()
    zt = (3 * torch.randn(n_t, v_t, generator=gen)).to(dtype)
    rows_s = torch.randint(0, n_s, (r,), generator=gen)  # repeats allowed: gradients add up
    rows_t = torch.randint(0, n_t, (r,), generator=gen)
    cols_s = torch.randint(0, v_s, (u,), generator=gen)  # repeats allowed (one student id, two teacher ids)
    cols_t = torch.randperm(v_t, generator=gen)[:u]
    slot_s = (3 * torch.randn(r, generator=gen)).requires_grad_()
    slot_t = 3 * torch.randn(r, generator=gen)
    return zs, zt, rows_s, rows_t, cols_s, cols_t, slot_s, slot_t


def materialised(zs, zt, rows_s, rows_t, cols_s, cols_t, slot_s, slot_t):
    """The rows as full_divergence takes them: [z[rows][:, cols], slot]."""
    row_s, row_t = zs[rows_s][:, cols_s].float(), zt[rows_t][:, cols_t].float()
    if slot_s is None:
        return row_s, row_t
    return torch.cat([row_s, slot_s.float()[:, None]], 1), torch.cat([row_t, slot_t.float()[:, None]], 1)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("slots", ["none", "finite", "masked_on_some_rows"])
def test_gathered_divergence_is_full_divergence_of_the_gathered_rows(kind, tau, slots):
    zs, zt, rows_s, rows_t, cols_s, cols_t, slot_s, slot_t = rows_and_tables(seed=hash((kind, tau, slots)) % 1000)
    if slots == "none":
        slot_s = slot_t = None
    elif slots == "masked_on_some_rows":  # simct's non-span rows: -inf on both sides
        masked = torch.tensor([True, False, True, False, False, True, False, False, True])
        slot_s = torch.where(masked, float("-inf"), slot_s.detach()).requires_grad_()
        slot_t = torch.where(masked, float("-inf"), slot_t)
    kw = {"divergence": kind, "beta": 0.3, "temperature": tau}
    want = losses.full_divergence(*materialised(zs, zt, rows_s, rows_t, cols_s, cols_t, slot_s, slot_t), **kw)
    got = losses.gathered_divergence(zs, rows_s, cols_s, zt, rows_t, cols_t, student_slot=slot_s, teacher_slot=slot_t, **kw)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (type(got.grad_fn).__name__ == "_GatheredKLBackward") == (kind != "jsd")  # fused, or handed over
    # float32 both ways, rounded differently (logits up to ~15 / τ): both are as far from a float64
    # reference (gradients ~1e-5 at worst, rkl's cancellation), so the tolerance is float32's
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    inputs = [zs] if slot_s is None else [zs, slot_s]
    grads_want = torch.autograd.grad(weighted(want), inputs)
    grads_got = torch.autograd.grad(weighted(got), inputs)
    for g, w in zip(grads_got, grads_want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_gathered_divergence_falls_back_to_full_divergence_on_non_finite_rows(kind):
    """A -inf logit inside the gathered rows, or a slot masked on one side only, is
    full_divergence's business (its conventions: +inf or 0 terms); the fused path hands over."""
    zs, zt, rows_s, rows_t, cols_s, cols_t, slot_s, slot_t = rows_and_tables(seed=3)
    with torch.no_grad():
        zt[rows_t[2], cols_t[4]] = float("-inf")  # the teacher never puts mass there
    one_sided = slot_t.clone()
    one_sided[5] = float("-inf")
    for st in (slot_t, one_sided):
        kw = {"divergence": kind, "temperature": 1.0}
        want = losses.full_divergence(*materialised(zs, zt, rows_s, rows_t, cols_s, cols_t, slot_s, st), **kw)
        got = losses.gathered_divergence(zs, rows_s, cols_s, zt, rows_t, cols_t, student_slot=slot_s, teacher_slot=st, **kw)
        torch.testing.assert_close(got, want, equal_nan=True)  # fkl: 0 terms there; rkl: +inf rows
        finite = torch.isfinite(want)
        if finite.any():
            torch.testing.assert_close(torch.autograd.grad(got[finite].sum(), zs)[0],
                                       torch.autograd.grad(want[finite].sum(), zs)[0], equal_nan=True)  # fmt: skip


def test_gathered_divergence_bf16_logits_match_their_float32_upcast():
    zs, zt, rows_s, rows_t, cols_s, cols_t, slot_s, slot_t = rows_and_tables(seed=5, dtype=torch.bfloat16)
    zs32 = zs.detach().float().requires_grad_()
    got = losses.gathered_divergence(zs, rows_s, cols_s, zt, rows_t, cols_t, divergence="fkl",
                                     student_slot=slot_s, teacher_slot=slot_t)  # fmt: skip
    want = losses.gathered_divergence(zs32, rows_s, cols_s, zt.float(), rows_t, cols_t, divergence="fkl",
                                      student_slot=slot_s, teacher_slot=slot_t)  # fmt: skip
    torch.testing.assert_close(got, want)
    (g16,) = torch.autograd.grad(got.sum(), zs)
    (g32,) = torch.autograd.grad(want.sum(), zs32)
    assert g16.dtype == torch.bfloat16
    torch.testing.assert_close(g16.float(), g32, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("block_bytes", [1, 4 * 23 * 4, 2**20])  # one row, four rows, all rows per pass
def test_gathered_divergence_does_not_depend_on_the_rows_per_pass(monkeypatch, block_bytes):
    zs, zt, rows_s, rows_t, cols_s, cols_t, slot_s, slot_t = rows_and_tables(seed=7)
    args = (zs, rows_s, cols_s, zt, rows_t, cols_t)
    want = losses.full_divergence(*materialised(*args[:1], zt, rows_s, rows_t, cols_s, cols_t, slot_s, slot_t),
                                  divergence="rkl")  # fmt: skip
    monkeypatch.setattr(losses, "BLOCK_BYTES", block_bytes)
    got = losses.gathered_divergence(*args, divergence="rkl", student_slot=slot_s, teacher_slot=slot_t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), zs)[0], torch.autograd.grad(want.sum(), zs)[0],
                               rtol=1e-4, atol=3e-5)  # fmt: skip


@pytest.mark.parametrize(("name", "options"), [f for f in ALIGNER_FORMS if f[0] in ("exact", "simct", "simct_1to1")],
                         ids=lambda x: str(x))  # fmt: skip
@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("keep_rows_mib", [0, 512])  # chunked and recomputed in backward | every row at once
def test_aligner_losses_match_the_reference_kept_or_recomputed(pair, name, options, kind, keep_rows_mib):
    """The V∩ aligners' full form through the fused path, against test_chunked_loss's float64
    reference written from the formulas one row at a time."""
    batch, seg = scored(pair)
    aligner = build_aligner(AlignerConfig(name=name, **options))
    rows = aligner.build_rows(seg, batch)
    want = reference(name, options, rows, batch, kind, 0.5, 1.3)
    (grad_want,) = torch.autograd.grad(weighted(want), batch.student.logits)
    for chunk in (1, 7, 4096):
        settings = LossConfig(divergence=kind, temperature=1.3, chunk_rows=chunk, keep_rows_mib=keep_rows_mib)
        got = aligner.row_losses(rows, batch, settings)
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
        (grad_got,) = torch.autograd.grad(weighted(got), batch.student.logits)
        torch.testing.assert_close(grad_got, grad_want.float(), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def pair(split_tokenizer, merge_tokenizer):
    from lightning_opd.align import TokenizerPair

    return TokenizerPair.build(split_tokenizer, merge_tokenizer)


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("cols", [None, "some"])
def test_gathered_logsumexp_is_torch_logsumexp(monkeypatch, tau, cols):
    monkeypatch.setattr(losses, "BLOCK_BYTES", 3 * 4 * 50)  # a few rows per pass
    gen = torch.Generator().manual_seed(11)
    logits = 4 * torch.randn(17, 80, generator=gen)
    rows = torch.tensor([3, 0, 16, 3, 9])
    columns = torch.randperm(80, generator=gen)[:50] if cols else None
    block = logits[rows] if columns is None else logits[rows][:, columns]
    torch.testing.assert_close(losses.gathered_logsumexp(logits, rows, columns, tau), torch.logsumexp(block / tau, -1))


def test_teacher_mass_is_the_v_cap_share_of_the_teacher_softmax(pair):
    batch, seg = scored(pair)
    rows = build_aligner("exact").build_rows(seg, batch)
    tau = 1.7
    zt = batch.teacher.logits[rows.teacher_pos] / tau
    want = torch.exp(torch.logsumexp(zt[:, batch.vocab.teacher_ids], -1) - torch.logsumexp(zt, -1))
    torch.testing.assert_close(shared_vocab_mass(rows, batch, LossConfig(temperature=tau)), want)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("tau", [1.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_head_blocked_is_the_whole_vocabulary_block(monkeypatch, softcap, tau, dtype):
    """ColumnHead on the CPU, a few vocabulary rows of the head at a time: the kept logits equal
    the head's own (the same dot products), the normaliser is logsumexp over the whole row."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(23, 16, generator=gen).to(dtype)
    weight = (2 * torch.randn(300, 16, generator=gen)).to(dtype)
    bias = torch.randn(300, generator=gen).to(dtype)
    columns = torch.tensor([0, 5, 37, 38, 39, 150, 299])  # blocks with none, one, several kept columns
    full = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        full = torch.tanh(full / softcap) * softcap
    monkeypatch.setattr(columns_module, "HEAD_BLOCK_COLUMNS", 37)
    head = ColumnHead(columns, tau, chunk=10, softcap=softcap)
    head.compute(hidden, weight, bias)
    assert head.logits.dtype == dtype and head.logits.shape == (23, len(columns))
    torch.testing.assert_close(head.logits, full[:, columns], rtol=0, atol=0 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(head.normaliser, torch.logsumexp(full.float() / tau, -1), rtol=1e-6, atol=1e-5)
    plain = ColumnHead(columns, tau, chunk=10, softcap=softcap)
    monkeypatch.setattr(columns_module, "HEAD_BLOCK_COLUMNS", 10**9)  # the one-block path
    plain.compute(hidden, weight, bias)
    torch.testing.assert_close(head.normaliser, plain.normaliser, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(head.logits, plain.logits, rtol=0, atol=0 if dtype == torch.float32 else 1e-2)


def test_column_head_blocked_handles_no_positions(monkeypatch):
    monkeypatch.setattr(columns_module, "HEAD_BLOCK_COLUMNS", 7)
    head = ColumnHead(torch.tensor([1, 2]), 1.0, chunk=4)
    head.compute(torch.zeros(0, 8), torch.randn(30, 8), None)
    assert head.logits.shape == (0, 2) and head.normaliser.shape == (0,)
