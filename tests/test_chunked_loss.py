"""Chunked losses (`loss.chunk_rows`) are the unchunked ones: every aligner's full form, every
divergence, values and gradients w.r.t. the student logits, against a float64 reference written
from the formulas one row at a time; bf16 logits give a float32 loss close to the float32 one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_opd import losses
from lightning_opd.align import ScoredBatch, ScoredSide, TokenizerPair, align_batch, build_aligner
from lightning_opd.config import AlignerConfig, LossConfig

TEXTS = ["12+345=357 #### 357", "7*8=56\nWhat is 120+7? 127", "1000-1=999 and 250+250=500", "3+4=7"]
CHUNKS = (1, 7, 4096)
ALIGNER_FORMS = [  # (aligner, options): every full form
    ("exact", {}),
    ("simct", {"span_logit": "mean_logit"}),
    ("simct", {"span_logit": "mean_logprob"}),
    ("simct_1to1", {}),
    ("alm", {}),
    ("uld", {}),
    ("random_span", {"ratio": 0.5}),
]


@pytest.fixture(scope="module")
def pair(split_tokenizer, merge_tokenizer) -> TokenizerPair:
    return TokenizerPair.build(split_tokenizer, merge_tokenizer)  # digits split vs merged: spans


def scored(pair: TokenizerPair, dtype=torch.float32, seed: int = 0):
    """Random logits for the responses TEXTS (all ended with EOS), and their packed segments."""
    s_ids = [pair.student(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    out = align_batch(pair, s_ids, [True] * len(TEXTS))
    s_full = [ids + [pair.student.eos_token_id] for ids in s_ids]
    s_off = np.cumsum([0] + [len(x) for x in s_full])
    t_off = np.cumsum([0] + [len(x) for x in out.teacher_ids])
    gen = torch.Generator().manual_seed(seed)
    zs = 3 * torch.randn(int(s_off[-1]), len(pair.student), generator=gen)
    zt = 3 * torch.randn(int(t_off[-1]), len(pair.teacher), generator=gen)
    student = ScoredSide(zs.to(dtype).requires_grad_(), torch.tensor(sum(s_full, [])), torch.from_numpy(s_off))
    teacher = ScoredSide(zt.to(dtype), torch.tensor(sum(out.teacher_ids, [])), torch.from_numpy(t_off))
    return ScoredBatch(student, teacher, pair.vocab), out.segments


# --- the reference: float64, one row at a time, straight from the formulas ---------------------


def divergence(row_s: torch.Tensor, row_t: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """rkl / fkl / generalised JSD between softmax(row_s) and softmax(row_t) (finite rows)."""
    log_p, log_q = row_s.log_softmax(-1), row_t.log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "rkl":
        return (p * (log_p - log_q)).sum()
    if kind == "fkl":
        return (q * (log_q - log_p)).sum()
    log_m = torch.log(beta * q + (1 - beta) * p)
    return beta * (q * (log_q - log_m)).sum() + (1 - beta) * (p * (log_p - log_m)).sum()


def members(rows, side: str, r: int) -> list[int]:
    pos, row = getattr(rows, f"{side}_members"), getattr(rows, f"{side}_member_row")
    return pos[row == r].tolist()


def reference(name: str, options: dict, rows, batch: ScoredBatch, kind: str, beta: float,
              tau: float) -> torch.Tensor:  # fmt: skip
    zs, zt = batch.student.logits.double(), batch.teacher.logits.double()
    s_ids, t_ids = batch.student.ids.tolist(), batch.teacher.ids.tolist()
    shared_s, shared_t = batch.vocab.student_ids.tolist(), batch.vocab.teacher_ids.tolist()
    out = []
    for r in range(len(rows)):
        c, a = int(rows.student_pos[r]), int(rows.teacher_pos[r])
        s_m, t_m = members(rows, "s", r), members(rows, "t", r)
        if name == "alm":  # τ·KL(Bern(p_T^{1/τ}) || Bern(p_S^{1/τ})) of the chunk likelihoods
            big_tau = 100.0
            ll_s = sum((zs[k] / tau).log_softmax(-1)[s_ids[k]] for k in s_m)
            ll_t = sum((zt[k] / tau).log_softmax(-1)[t_ids[k]] for k in t_m)
            x_s, x_t = ll_s.clamp(max=-1e-6) / big_tau, ll_t.clamp(max=-1e-6) / big_tau
            q_t = torch.exp(x_t)
            kl = q_t * (x_t - x_s) + (1 - q_t) * (torch.log(-torch.expm1(x_t)) - torch.log(-torch.expm1(x_s)))
            out.append(big_tau * kl)
        elif name == "uld":  # L1 between fully sorted probabilities, the shorter padded with 0
            p = (zs[c] / tau).softmax(-1).sort(descending=True).values
            q = (zt[a] / tau).softmax(-1).sort(descending=True).values
            width = max(len(p), len(q))
            p, q = torch.nn.functional.pad(p, (0, width - len(p))), torch.nn.functional.pad(q, (0, width - len(q)))
            out.append(1.5 * (p - q).abs().sum())
        else:  # V∩ at the anchors; simct-like rows add the span slot on spans
            row_s, row_t = zs[c, shared_s], zt[a, shared_t]
            span = len(s_m) > 1 or len(t_m) > 1
            if name in ("simct", "random_span"):
                if options.get("span_logit") == "mean_logprob":
                    row_s = row_s - tau * torch.logsumexp(zs[c] / tau, -1)
                    row_t = row_t - tau * torch.logsumexp(zt[a] / tau, -1)
                    slot_s = sum(tau * (zs[k] / tau).log_softmax(-1)[s_ids[k]] for k in s_m) / len(s_m)
                    slot_t = sum(tau * (zt[k] / tau).log_softmax(-1)[t_ids[k]] for k in t_m) / len(t_m)
                else:
                    slot_s = sum(zs[k, s_ids[k]] for k in s_m) / len(s_m)
                    slot_t = sum(zt[k, t_ids[k]] for k in t_m) / len(t_m)
                if span:
                    row_s, row_t = torch.cat([row_s, slot_s[None]]), torch.cat([row_t, slot_t[None]])
            out.append(divergence(row_s / tau, row_t / tau, kind, beta))
    return torch.stack(out)


# --- the tests ---------------------------------------------------------------------------------


def weighted(per_row: torch.Tensor) -> torch.Tensor:
    """Σ w_r ℓ_r with fixed distinct weights, so a row swapped between chunks changes the sum."""
    w = torch.linspace(0.5, 1.5, len(per_row), dtype=per_row.dtype)
    return (w * per_row).sum()


@pytest.mark.parametrize(("name", "options"), ALIGNER_FORMS, ids=lambda x: str(x))
@pytest.mark.parametrize(("kind", "beta", "tau"), [("rkl", 0.5, 1.0), ("fkl", 0.5, 1.0), ("jsd", 0.3, 2.0)])
def test_chunked_losses_and_gradients_match_the_reference(pair, name, options, kind, beta, tau):
    batch, seg = scored(pair)
    aligner = build_aligner(AlignerConfig(name=name, **options))
    rows = aligner.build_rows(seg, batch)  # built once: random_span draws its merges here
    assert len(rows) > 7 and bool(rows.is_span.any()) == (name not in ("exact", "simct_1to1", "uld"))
    want = reference(name, options, rows, batch, kind, beta, tau)
    (grad_want,) = torch.autograd.grad(weighted(want), batch.student.logits)
    for chunk in CHUNKS:
        settings = LossConfig(divergence=kind, beta=beta, temperature=tau, chunk_rows=chunk)
        got = aligner.row_losses(rows, batch, settings)
        assert got.dtype == torch.float32 and got.shape == (len(rows),)
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5, msg=f"chunk_rows={chunk}")
        (grad_got,) = torch.autograd.grad(weighted(got), batch.student.logits)
        torch.testing.assert_close(grad_got, grad_want.float(), rtol=1e-4, atol=1e-6, msg=f"chunk_rows={chunk}")


def test_the_reference_is_not_trivially_equal_across_divergences(pair):
    """The reference distinguishes the divergences, so agreeing with it means something."""
    batch, seg = scored(pair)
    rows = build_aligner("simct").build_rows(seg, batch)
    values = [reference("simct", {}, rows, batch, kind, 0.3, 1.0) for kind in ("rkl", "fkl", "jsd")]
    assert all(v.min() >= 0 for v in values)
    assert not torch.allclose(values[0], values[1]) and not torch.allclose(values[1], values[2])


@pytest.mark.parametrize(("name", "options"), ALIGNER_FORMS, ids=lambda x: str(x))
def test_bf16_logits_give_a_float32_loss_close_to_the_float32_one(pair, name, options):
    batch32, seg = scored(pair, torch.float32)
    batch16, _ = scored(pair, torch.bfloat16)
    aligner = build_aligner(AlignerConfig(name=name, **options))
    rows = aligner.build_rows(seg, batch32)
    n = seg.n_student_tokens
    settings = LossConfig(divergence="fkl", chunk_rows=7)
    loss32 = losses.reduce_rows(aligner.row_losses(rows, batch32, settings), None, n)
    loss16 = losses.reduce_rows(aligner.row_losses(rows, batch16, settings), None, n)
    assert loss16.dtype == torch.float32 and math.isfinite(float(loss16.detach()))
    # the same bf16 values upcast first: the math runs in float32 either way, so (almost) equal
    upcast = ScoredBatch(
        ScoredSide(batch16.student.logits.detach().float(), batch16.student.ids, batch16.student.offsets),
        ScoredSide(batch16.teacher.logits.float(), batch16.teacher.ids, batch16.teacher.offsets),
        batch16.vocab,
    )
    loss_upcast = losses.reduce_rows(aligner.row_losses(rows, upcast, settings), None, n)
    torch.testing.assert_close(loss16.detach(), loss_upcast, rtol=1e-5, atol=1e-6)
    # bf16 keeps 8 bits of mantissa: logits of size ~3 move by ~1e-2, the loss by about as much
    torch.testing.assert_close(loss16.detach(), loss32.detach(), rtol=3e-2, atol=3e-2)
    loss16.backward()
    assert batch16.student.logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(batch16.student.logits.grad.float()).all()
