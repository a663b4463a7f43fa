"""Tests for lightning_opd.weighting: SOD step weights, step divergences, GRPO advantages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_opd.weighting import (
    batched_sod_weights,
    batched_step_weights,
    delimiter_step_ids,
    grpo_advantages,
    sod_weights,
    step_divergences,
)

FAST = settings(max_examples=40, deadline=None)
EPS = 1e-6


def released_code_weights(d: list[float], delta: float, eps: float) -> list[float]:
    """SOD's released loop: running product of adjacent ratios, each stored weight clipped."""
    w, prod = [1.0], 1.0
    for u in range(len(d) - 1):
        prod *= (d[u] + eps) / (d[u + 1] + eps)
        w.append(min(prod, 1 + delta))
    return w[: len(d)]


# ----------------------------------------------------------------------------- sod_weights


def test_hand_values_first_reference() -> None:
    w = sod_weights(torch.tensor([0.5, 0.5, 1.0, 0.25]))
    expected = [1.0, 1.0, (0.5 + EPS) / (1.0 + EPS), 1.2]  # the last is 2.0, capped at 1 + δ
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert w[2].item() == pytest.approx(0.5, abs=1e-5)


def test_first_step_weight_is_one_and_cap_holds() -> None:
    for d in ([3.0], [0.0, 0.0], [5.0, 0.001, 0.01, 100.0]):
        w = sod_weights(torch.tensor(d), delta=0.3)
        assert w[0].item() == 1.0
        assert (w <= 1.3 + 1e-7).all()


def test_divergence_jump_mutes_then_recovery_restores() -> None:
    # a bad tool call at step 3 makes the student drift from the teacher; it recovers at 5
    w = sod_weights(torch.tensor([0.2, 0.2, 2.0, 1.0, 0.2]))
    assert w[2] < 0.2 and w[2] < w[3] < 1.0
    assert w[4].item() == pytest.approx(1.0)


def test_previous_and_running_mean_by_hand() -> None:
    d = torch.tensor([1.0, 2.0, 0.5, 1.0])
    prev = sod_weights(d, reference="previous", eps=0.0, delta=10.0)
    assert prev.tolist() == pytest.approx([1.0, 0.5, 4.0, 0.5])
    mean = sod_weights(d, reference="running_mean", eps=0.0, delta=10.0)
    # refs: -, 1, (1+2)/2 = 1.5, (1+2+0.5)/3 = 7/6
    assert mean.tolist() == pytest.approx([1.0, 0.5, 3.0, 7 / 6])
    assert sod_weights(d, reference="running_mean", eps=0.0)[2].item() == pytest.approx(1.2)


def test_eps_guards_zero_divergence() -> None:
    w = sod_weights(torch.tensor([0.0, 0.0, 1.0]))
    assert torch.isfinite(w).all()
    assert w[1].item() == 1.0  # (0 + ε)/(0 + ε)
    assert w[2].item() == pytest.approx(EPS / (1 + EPS))
    assert sod_weights(torch.tensor([1.0, 0.0]))[1].item() == pytest.approx(1.2)


def test_weights_are_detached() -> None:
    d = torch.tensor([0.3, 0.6, 0.1], requires_grad=True)
    w = sod_weights(d)
    assert not w.requires_grad and w.grad_fn is None


def test_unknown_reference_and_empty_input() -> None:
    with pytest.raises(ValueError, match="reference"):
        sod_weights(torch.tensor([1.0, 2.0]), reference="last")
    assert sod_weights(torch.zeros(0)).shape == (0,)


# ----------------------------------------------------------------------------- floors (ours)

TRIVIAL_FIRST = [0.0, 0.5, 1.0]  # a first step on which student and teacher agree


def test_trivial_first_step_mutes_every_later_step_by_default() -> None:
    w = sod_weights(torch.tensor(TRIVIAL_FIRST), reference="first")
    # the paper's weights: (0 + ε)/(d_k + ε), about 2e-6 and 1e-6
    assert w.tolist() == pytest.approx([1.0, EPS / (0.5 + EPS), EPS / (1.0 + EPS)], rel=1e-6)
    assert (w[1:] < 1e-5).all()


def test_min_weight_floors_the_collapsed_steps() -> None:
    w = sod_weights(torch.tensor(TRIVIAL_FIRST), reference="first", min_weight=0.1)
    assert w.tolist() == pytest.approx([1.0, 0.1, 0.1], rel=1e-6)
    # weights above the floor are untouched, and the cap still holds
    w = sod_weights(torch.tensor([0.5, 0.5, 1.0, 0.25]), min_weight=0.1)
    assert w.tolist() == pytest.approx([1.0, 1.0, (0.5 + EPS) / (1.0 + EPS), 1.2], rel=1e-6)


def test_min_reference_floors_the_reference_divergence() -> None:
    w = sod_weights(torch.tensor(TRIVIAL_FIRST), reference="first", min_reference=0.5)
    # ref = max(0, 0.5) = 0.5: step 2 (d = 0.5) keeps full weight, step 3 (d = 1.0) is halved
    assert w.tolist() == pytest.approx([1.0, 1.0, (0.5 + EPS) / (1.0 + EPS)], rel=1e-6)
    # a reference above the floor is left alone: d_1 = 2 > 0.5
    w = sod_weights(torch.tensor([2.0, 1.0, 4.0]), min_reference=0.5, delta=10.0)
    assert w.tolist() == pytest.approx([1.0, (2 + EPS) / (1 + EPS), (2 + EPS) / (4 + EPS)], rel=1e-6)
    # previous: refs max(0, .25) = .25 and max(.5, .25) = .5
    w = sod_weights(torch.tensor(TRIVIAL_FIRST), reference="previous", min_reference=0.25)
    assert w.tolist() == pytest.approx([1.0, (0.25 + EPS) / (0.5 + EPS), (0.5 + EPS) / (1.0 + EPS)], rel=1e-6)


def test_both_floors_in_order_reference_then_weight() -> None:
    w = sod_weights(torch.tensor(TRIVIAL_FIRST), min_reference=0.25, min_weight=0.4)
    # ref 0.25: ratios 0.5 and 0.25; the second is raised to the weight floor 0.4
    assert w.tolist() == pytest.approx([1.0, (0.25 + EPS) / (0.5 + EPS), 0.4], rel=1e-6)
    batched = batched_step_weights(torch.tensor([0.0, -0.5, -1.0, 0.0, 0.0]), torch.zeros(5),
                                   torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 0, 0, 3, 3]),
                                   min_reference=0.25, min_weight=0.4)
    # sequence 3 has d = [0, 0]: its second step is compared with the floor 0.25, not 0, so it
    # counts as an improvement and gets the cap 1 + δ (without the floor: ε/ε = 1)
    assert batched.weight.tolist() == pytest.approx([1.0, (0.25 + EPS) / (0.5 + EPS), 0.4, 1.0, 1.2],
                                                    rel=1e-6)


def test_floors_are_checked() -> None:
    with pytest.raises(ValueError, match="min_reference"):
        sod_weights(torch.tensor([1.0, 2.0]), min_reference=-0.1)
    with pytest.raises(ValueError, match="min_weight"):
        sod_weights(torch.tensor([1.0, 2.0]), min_weight=-0.1)
    with pytest.raises(ValueError, match="min_weight"):
        sod_weights(torch.tensor([1.0, 2.0]), delta=0.2, min_weight=1.3)


def weights_before_floors(d, is_first, start, delta, eps, reference):
    """`_weights_from_steps` as it was before the floors were added (copied), for the bitwise check."""
    if reference == "first":
        ref = d[start]
    elif reference == "previous":
        ref = torch.cat([d[:1], d[:-1]])
    else:
        csum = torch.cat([d.new_zeros(1), d.cumsum(0)])
        idx = torch.arange(len(d), device=d.device)
        n_before = (idx - start).clamp(min=1)
        ref = (csum[idx] - csum[start]) / n_before
    w = ((ref + eps) / (d + eps)).clamp(max=1.0 + delta)
    return torch.where(is_first, torch.ones_like(w), w)


@pytest.mark.parametrize("reference", ["first", "previous", "running_mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_floors_are_bitwise_the_paper(reference: str, dtype: torch.dtype, monkeypatch) -> None:
    from lightning_opd import weighting

    gen = torch.Generator().manual_seed(7)
    s = -torch.rand(400, generator=gen, dtype=dtype) * 5
    t = -torch.rand(400, generator=gen, dtype=dtype) * 5
    s[::13] = t[::13]  # some steps with d exactly 0
    steps = torch.randint(-1, 6, (400,), generator=gen)
    seqs = torch.sort(torch.randint(0, 20, (400,), generator=gen)).values
    now = batched_step_weights(s, t, steps, seqs, reference=reference)
    explicit = batched_step_weights(s, t, steps, seqs, reference=reference, min_weight=0.0, min_reference=0.0)
    monkeypatch.setattr(weighting, "_weights_from_steps",
                        lambda d, f, st_, de, ep, ref, *_: weights_before_floors(d, f, st_, de, ep, ref))
    before = batched_step_weights(s, t, steps, seqs, reference=reference)
    for got in (now, explicit):
        assert torch.equal(got.weight, before.weight) and torch.equal(got.token_weights, before.token_weights)


def test_floors_reach_the_config() -> None:
    from lightning_opd.config import load

    cfg = load(overrides=["sod.min_weight=0.1", "sod.min_reference=0.05"])
    assert (cfg.sod.min_weight, cfg.sod.min_reference) == (0.1, 0.05)
    assert (load().sod.min_weight, load().sod.min_reference) == (0.0, 0.0)


@FAST
@given(st.lists(st.floats(0.0, 5.0), min_size=1, max_size=12), st.floats(0.0, 1.0))
def test_first_reference_equals_released_running_product(d: list[float], delta: float) -> None:
    w = sod_weights(torch.tensor(d, dtype=torch.float64), delta=delta)
    assert w.tolist() == pytest.approx(released_code_weights(d, delta, EPS), rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- divergences


def slow_step_weights(s, t, steps, seqs, delta, eps, reference, min_weight=0.0, min_reference=0.0):
    """Reference: dictionaries and Python loops over tokens, one trajectory at a time."""
    out = [0.0] * len(s)
    for q in sorted(set(seqs)):
        diffs: dict[int, list[float]] = {}
        for i in range(len(s)):
            if seqs[i] == q and steps[i] >= 0:
                diffs.setdefault(steps[i], []).append(abs(s[i] - t[i]))
        order = sorted(diffs)
        d = [sum(diffs[k]) / len(diffs[k]) for k in order]
        w = []
        for k in range(len(d)):
            if k == 0:
                w.append(1.0)
                continue
            ref = {"first": d[0], "previous": d[k - 1], "running_mean": sum(d[:k]) / k}[reference]
            ref = max(ref, min_reference)
            w.append(max(min((ref + eps) / (d[k] + eps), 1 + delta), min_weight))
        weight = dict(zip(order, w, strict=True))
        for i in range(len(s)):
            if seqs[i] == q and steps[i] >= 0:
                out[i] = weight[steps[i]]
    return out


@st.composite
def packed_batches(draw):
    n = draw(st.integers(0, 30))
    lp = st.floats(-8.0, 0.0, allow_nan=False)
    s = draw(st.lists(lp, min_size=n, max_size=n))
    t = draw(st.lists(lp, min_size=n, max_size=n))
    steps = draw(st.lists(st.integers(-1, 4), min_size=n, max_size=n))
    seqs = sorted(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    return s, t, steps, seqs


@FAST
@given(packed_batches(), st.sampled_from(["first", "previous", "running_mean"]))
def test_batched_weights_match_slow_reference(batch, reference: str) -> None:
    s, t, steps, seqs = batch
    got = batched_sod_weights(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64),
                              torch.tensor(steps, dtype=torch.long), torch.tensor(seqs, dtype=torch.long),
                              delta=0.2, eps=EPS, reference=reference)
    assert got.shape == (len(s),)
    assert got.tolist() == pytest.approx(slow_step_weights(s, t, steps, seqs, 0.2, EPS, reference),
                                         rel=1e-9, abs=1e-12)


@FAST
@given(packed_batches(), st.sampled_from(["first", "previous", "running_mean"]), st.floats(0.0, 1.2),
       st.floats(0.0, 3.0))
def test_batched_weights_with_floors_match_slow_reference(batch, reference: str, min_weight: float,
                                                          min_reference: float) -> None:
    s, t, steps, seqs = batch
    got = batched_sod_weights(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64),
                              torch.tensor(steps, dtype=torch.long), torch.tensor(seqs, dtype=torch.long),
                              delta=0.2, eps=EPS, reference=reference, min_weight=min_weight,
                              min_reference=min_reference)
    expected = slow_step_weights(s, t, steps, seqs, 0.2, EPS, reference, min_weight, min_reference)
    assert got.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@FAST
@given(packed_batches())
def test_step_divergences_match_loop(batch) -> None:
    s, t, steps, _ = batch
    d, index = step_divergences(torch.tensor(s, dtype=torch.float64),
                                torch.tensor(t, dtype=torch.float64), torch.tensor(steps))
    order = sorted({k for k in steps if k >= 0})
    expected = [np.mean([abs(a - b) for a, b, k in zip(s, t, steps, strict=True) if k == j])
                for j in order]
    assert d.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert index.tolist() == [order.index(k) if k >= 0 else -1 for k in steps]


def test_masked_tokens_are_ignored() -> None:
    s = torch.tensor([-1.0, -1.0, -9.0, -2.0])
    t = torch.tensor([-1.5, -0.5, 0.0, -1.0])
    d, index = step_divergences(s, t, torch.tensor([0, 0, -1, 1]))
    assert d.tolist() == pytest.approx([0.5, 1.0])  # the -9 vs 0 observation token is skipped
    assert index.tolist() == [0, 0, -1, 1]


def test_batched_step_stats_and_zero_weight_on_masked() -> None:
    s = torch.tensor([-1.0, -1.0, -3.0, -1.0, -1.0])
    t = torch.tensor([-1.5, -1.0, 0.0, -2.0, -1.0])
    out = batched_step_weights(s, t, torch.tensor([0, -1, 1, 0, 0]), torch.tensor([0, 0, 0, 7, 7]))
    assert out.step_sequence.tolist() == [0, 0, 7] and out.step_id.tolist() == [0, 1, 0]
    assert out.divergence.tolist() == pytest.approx([0.5, 3.0, 0.5])
    w1 = (0.5 + EPS) / (3.0 + EPS)
    assert out.token_weights.tolist() == pytest.approx([1.0, 0.0, w1, 1.0, 1.0])
    all_masked = batched_sod_weights(s, t, torch.full((5,), -1), torch.zeros(5, dtype=torch.long))
    assert all_masked.tolist() == [0.0] * 5


# ----------------------------------------------------------------------------- delimiter steps


def test_delimiter_steps_hand_cases() -> None:
    text = "a\n\nbc\n\nd"  # bytes: a \n \n b c \n \n d
    assert delimiter_step_ids([1, 2, 2, 2, 1], text) == [0, 0, 1, 1, 2]
    # tokens straddling a delimiter ("\nb", "\nd" hold its last byte) stay in the earlier step
    assert delimiter_step_ids([2, 2, 1, 1, 2], text) == [0, 0, 1, 1, 1]
    assert delimiter_step_ids([3, 2], "abc12") == [0, 0]  # no delimiter: one step
    # one token swallowing two delimiters: dense ids, no gap
    assert delimiter_step_ids([1, 4, 1], "a\n\n\n\nb") == [0, 0, 1]
    assert delimiter_step_ids([2, 2], "é\n\n", delimiter="\n\n") == [0, 0]  # bytes, not chars
    assert delimiter_step_ids(np.array([2, 1, 1]), "x;;y", delimiter=";;") == [0, 0, 1]


def test_delimiter_steps_check_lengths() -> None:
    with pytest.raises(ValueError, match="bytes"):
        delimiter_step_ids([1, 1], "abc")


# ----------------------------------------------------------------------------- GRPO


def test_grpo_hand_values() -> None:
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0])
    g = torch.tensor([0, 0, 0, 0, 5, 5])
    adv = grpo_advantages(r, g)
    # group 0: mean 0.5, population std 0.5 -> ±1; group 5: identical rewards -> 0
    assert adv.tolist() == pytest.approx([1 / (1 + 2e-6), -1 / (1 + 2e-6), 1, -1, 0, 0], abs=1e-5)
    assert adv[4].item() == 0.0 and adv[5].item() == 0.0


def test_grpo_unequal_groups_and_singletons() -> None:
    r = torch.tensor([3.0, 0.0, 1.0, 2.0])
    adv = grpo_advantages(r, torch.tensor([1, 0, 0, 0]))
    std = math.sqrt(2 / 3)
    assert adv.tolist() == pytest.approx([0.0, -1 / std, 0.0, 1 / std], rel=1e-5)
