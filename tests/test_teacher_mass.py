"""Teacher-mass diagnostics: `Aligner.teacher_mass` (per row, from the logits) and
`Aligner.vocab_reached` (structural), against hand computation on a tiny batch, and the module's
`train/teacher_mass` metric.

The tiny batch: V_S = 4, V_T = 5, V∩ = {(s0, t4), (s1, t1), (s2, t2)}. Each teacher position's
logits are log p + 3 for a chosen probability vector p, so softmax(z_T) = p exactly (the +3
checks the normalisation) and softmax(z_T / 2) ∝ √p.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchmetrics import MeanMetric

from lightning_opd.align import Rows, ScoredBatch, ScoredSide, TokenizerPair, build_aligner
from lightning_opd.align.vocab import SharedVocab
from lightning_opd.config import LossConfig
from lightning_opd.module import OPDModule

V_S, V_T = 4, 5
SHARED_T = (4, 1, 2)  # V∩'s teacher ids, in the order of their student ids 0, 1, 2
# teacher probabilities at packed positions 0..3, and the tokens there (ids[p])
TEACHER_P = [
    [0.10, 0.20, 0.30, 0.15, 0.25],  # V∩: 0.20 + 0.30 + 0.25 = 0.75; token 3 (not in V∩)
    [0.40, 0.10, 0.10, 0.30, 0.10],  # V∩: 0.30; token 0 (not in V∩)
    [0.05, 0.05, 0.10, 0.60, 0.20],  # V∩: 0.35; token 2 (in V∩)
    [0.20, 0.20, 0.20, 0.20, 0.20],  # token 1
]
TEACHER_IDS = [3, 0, 2, 1]


def shared_vocab() -> SharedVocab:
    teacher_of_student = np.array([4, 1, 2, -1])
    return SharedVocab(torch.tensor([0, 1, 2]), torch.tensor(SHARED_T), teacher_of_student)


def tiny_batch(vocab: SharedVocab | None = None) -> ScoredBatch:
    gen = torch.Generator().manual_seed(0)
    student = ScoredSide(
        torch.randn(4, V_S, generator=gen), torch.tensor([0, 1, 3, 2]), torch.tensor([0, 4])
    )
    teacher_logits = torch.tensor(TEACHER_P).log() + 3.0
    teacher = ScoredSide(teacher_logits, torch.tensor(TEACHER_IDS), torch.tensor([0, 4]))
    return ScoredBatch(student, teacher, vocab or shared_vocab())


def tiny_rows() -> Rows:
    """Row 0: a span (two student tokens) anchored at teacher position 0, whose token 3 ∉ V∩.
    Row 1: one token each, teacher position 1 (token 0 ∉ V∩, but not a span).
    Row 2: a span (two teacher tokens) anchored at teacher position 2, whose token 2 ∈ V∩."""
    return Rows(
        student_pos=torch.tensor([0, 2, 3]),
        teacher_pos=torch.tensor([0, 1, 2]),
        s_members=torch.tensor([0, 1, 2, 3]),
        s_member_row=torch.tensor([0, 0, 1, 2]),
        t_members=torch.tensor([0, 1, 2, 3]),
        t_member_row=torch.tensor([0, 1, 2, 2]),
    )


def hand_mass(p: list[float], ids: tuple[int, ...], tau: float) -> float:
    """Σ_{v ∈ ids} softmax(log p / τ)(v) = Σ_{v ∈ ids} p_v^{1/τ} / Σ_v p_v^{1/τ}."""
    weights = [x ** (1.0 / tau) for x in p]
    return sum(weights[v] for v in ids) / sum(weights)


@pytest.mark.parametrize("chunk_rows", [1, 2, 1024])
def test_exact_teacher_mass_is_the_v_cap_share_of_the_teacher_probability(chunk_rows):
    mass = build_aligner("exact").teacher_mass(
        tiny_rows(), tiny_batch(), LossConfig(chunk_rows=chunk_rows)
    )
    assert mass.dtype == torch.float32 and mass.shape == (3,) and not mass.requires_grad
    torch.testing.assert_close(mass, torch.tensor([0.75, 0.30, 0.35]), atol=1e-6, rtol=0)


def test_teacher_mass_uses_the_loss_temperature():
    mass = build_aligner("exact").teacher_mass(
        tiny_rows(), tiny_batch(), LossConfig(temperature=2.0)
    )
    expected = [hand_mass(TEACHER_P[p], SHARED_T, 2.0) for p in (0, 1, 2)]
    # √p: row 0 = (√.2 + √.3 + √.25) / (√.1 + √.2 + √.3 + √.15 + √.25) = 1.4949 / 2.1984 ≈ 0.6800,
    # below τ = 1's 0.75: a higher τ flattens q toward the ids outside V∩
    assert expected[0] == pytest.approx(0.68, abs=1e-4)
    torch.testing.assert_close(mass, torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["simct", "random_span"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_simct_span_rows_add_the_anchor_token_outside_v_cap(name, tau):
    mass = build_aligner(name).teacher_mass(
        tiny_rows(), tiny_batch(), LossConfig(temperature=tau, chunk_rows=1)
    )
    expected = [
        hand_mass(TEACHER_P[0], (*SHARED_T, 3), tau),  # span, its anchor token 3 ∉ V∩: added
        hand_mass(TEACHER_P[1], SHARED_T, tau),  # not a span: V∩ only, token 0 not added
        hand_mass(TEACHER_P[2], SHARED_T, tau),  # span, anchor token 2 ∈ V∩: not counted twice
    ]
    if tau == 1.0:
        assert expected == pytest.approx([0.90, 0.30, 0.35])
    torch.testing.assert_close(mass, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_simct_teacher_mass_is_capped_at_one():
    # V∩ = every teacher id but 3, and row 0's anchor is token 3: all the mass, never above 1
    vocab = SharedVocab(
        torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 4]), np.array([0, 1, 2, 4])
    )
    mass = build_aligner("simct").teacher_mass(tiny_rows(), tiny_batch(vocab), LossConfig())
    assert float(mass[0]) <= 1.0
    assert float(mass[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(mass[1]) == pytest.approx(0.70, abs=1e-6)  # 1 − p(3) at position 1, not a span


def test_uld_reaches_all_mass_and_alm_has_none():
    rows, batch = tiny_rows(), tiny_batch()
    uld = build_aligner("uld").teacher_mass(rows, batch, LossConfig())
    assert torch.equal(uld, torch.ones(3))
    assert build_aligner("alm").teacher_mass(rows, batch, LossConfig()) is None


@pytest.mark.parametrize("name", ["exact", "simct", "simct_1to1", "random_span", "uld"])
def test_identical_tokenizers_give_teacher_mass_one(name):
    ids = torch.arange(V_T)
    identity = SharedVocab(ids, ids.clone(), np.arange(V_T), identity=True)
    batch = tiny_batch(identity)
    batch.student = ScoredSide(
        torch.randn(4, V_T), torch.tensor([0, 1, 3, 2]), torch.tensor([0, 4])
    )
    mass = build_aligner(name).teacher_mass(tiny_rows(), batch, LossConfig())
    assert torch.equal(mass, torch.ones(3))


def test_empty_rows_give_an_empty_mass():
    empty = Rows(*(torch.zeros(0, dtype=torch.long) for _ in range(6)))
    for name in ("exact", "simct"):
        mass = build_aligner(name).teacher_mass(empty, tiny_batch(), LossConfig())
        assert mass.shape == (0,)


def test_vocab_reached_by_hand():
    pair = SimpleNamespace(vocab=shared_vocab(), teacher_bytes=SimpleNamespace(table=[b"x"] * V_T))
    for name in ("exact", "simct", "simct_1to1", "random_span"):
        assert build_aligner(name).vocab_reached(pair) == pytest.approx(3 / 5)
    assert build_aligner("uld").vocab_reached(pair) == 1.0
    assert build_aligner("alm").vocab_reached(pair) is None


def test_vocab_reached_on_real_tokenizers(split_tokenizer, merge_tokenizer):
    same = TokenizerPair.build(split_tokenizer, split_tokenizer)
    for name in ("exact", "simct", "uld"):
        assert build_aligner(name).vocab_reached(same) == 1.0
    pair = TokenizerPair.build(split_tokenizer, merge_tokenizer)
    student_bytes = {b for b in pair.student_bytes.table if b}
    teacher_bytes = [b for b in pair.teacher_bytes.table if b]
    assert len(set(teacher_bytes)) == len(teacher_bytes)  # no duplicates: one V∩ pair per match
    # every teacher id with text the student also has a token for, plus EOS paired with EOS
    shared = sum(b in student_bytes for b in teacher_bytes) + 1
    reached = build_aligner("exact").vocab_reached(pair)
    assert reached == pytest.approx(shared / len(pair.teacher_bytes.table))
    assert 0 < reached < 1  # the merge tokenizer's digit runs have no student token


def host_with_metric() -> SimpleNamespace:
    return SimpleNamespace(train_teacher_mass=MeanMetric())


def test_module_metric_is_the_row_mean_and_absent_without_a_mass():
    host = host_with_metric()
    assert OPDModule.teacher_mass_metric(host, torch.tensor([0.9, 0.3, 0.35, 0.05])) == {
        "train/teacher_mass": pytest.approx(0.4)
    }
    # the metric is reset after each step: the next step's mean is its own
    assert OPDModule.teacher_mass_metric(host, torch.tensor([1.0])) == {"train/teacher_mass": 1.0}
    assert OPDModule.teacher_mass_metric(host, None) == {}  # alm: nothing logged
    assert OPDModule.teacher_mass_metric(host, torch.zeros(0)) == {}  # no row: nothing logged
    # a placeholder step adds nothing (weight 0): alone, nothing is logged
    assert OPDModule.teacher_mass_metric(host, torch.tensor([0.5]), placeholder=True) == {}
