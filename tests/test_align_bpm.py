"""`bpm`, byte-prefix marginalisation: against a slow reference written from the formulas one
row at a time, hand-worked rows, mass accounting on real tokenizer pairs, and identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_opd import losses
from lightning_opd.align import ScoredBatch, ScoredSide, TokenizerPair, align_batch, build_aligner
from lightning_opd.align.bpm import log_target
from lightning_opd.config import LossConfig
from lightning_opd.fixtures import load_fixture_tokenizer
from tests.test_align_exact import byte_level_tokenizer

DIGIT_MERGES = [("1", "2"), ("1", "5"), ("12", "3"), ("4", "5")]


@pytest.fixture(scope="module")
def teacher_merges() -> TokenizerPair:
    """(a): the student writes one token per digit, the teacher merges `12`, `15`, `123`, `45`."""
    return TokenizerPair.build(byte_level_tokenizer([], split_digits=True),
                               byte_level_tokenizer(DIGIT_MERGES, split_digits=False))  # fmt: skip


@pytest.fixture(scope="module")
def student_merges() -> TokenizerPair:
    """(b): the reverse."""
    return TokenizerPair.build(byte_level_tokenizer(DIGIT_MERGES, split_digits=False),
                               byte_level_tokenizer([], split_digits=True))  # fmt: skip


def scored(pair: TokenizerPair, texts: list[str], seed: int = 0, scale: float = 3.0):
    """Aligned batch of these responses (all ending with EOS) and random logits for both sides."""
    s_ids = [pair.student(t, add_special_tokens=False)["input_ids"] for t in texts]
    aligned = align_batch(pair, s_ids, [True] * len(texts))
    g = torch.Generator().manual_seed(seed)
    s_flat = [i for ids in s_ids for i in [*ids, pair.student.eos_token_id]]
    t_flat = [i for ids in aligned.teacher_ids for i in ids]
    s_off = np.cumsum([0] + [len(x) + 1 for x in s_ids])
    t_off = np.cumsum([0] + [len(x) for x in aligned.teacher_ids])
    vs, vt = len(pair.student), len(pair.teacher)
    student = ScoredSide((torch.randn(len(s_flat), vs, generator=g) * scale).requires_grad_(),
                         torch.tensor(s_flat), torch.tensor(s_off))  # fmt: skip
    teacher = ScoredSide(
        torch.randn(len(t_flat), vt, generator=g) * scale, torch.tensor(t_flat), torch.tensor(t_off)
    )
    return aligned, ScoredBatch(student, teacher, pair.vocab)


# ---- the slow reference: the module docstring's formulas, one atom at a time ---------------------


class Reference:
    def __init__(self, pair: TokenizerPair) -> None:
        self.s_table, self.t_table = pair.student_bytes.table, pair.teacher_bytes.table
        self.teacher_set = {b for b in self.t_table if b}
        self.s_eos, self.t_eos = pair.student.eos_token_id, pair.teacher.eos_token_id
        self.student_only = [
            u for u, b in enumerate(self.s_table) if b and b not in self.teacher_set
        ]

    def lp(self, data: bytes) -> int:
        """Longest student token that is a prefix of data, by scanning the whole vocabulary."""
        best, best_len = -1, 0
        for u, b in enumerate(self.s_table):
            if b and len(b) > best_len and data.startswith(b):
                best, best_len = u, len(b)
        return best

    def extendable(self, data: bytes) -> bool:
        return any(
            len(self.s_table[u]) > len(data) and self.s_table[u].startswith(data)
            for u in self.student_only
        )

    def chain(self, prefix, mass, j, t_ids, t_end, q, out):
        if j >= t_end or not self.t_table[t_ids[j]] or not self.extendable(prefix):
            out[self.lp(prefix)] = out.get(self.lp(prefix), 0.0) + mass
            return
        for v, qv in enumerate(q[j]):
            data = prefix + self.t_table[v]
            if v == t_ids[j] and self.extendable(data):
                self.chain(data, mass * qv, j + 1, t_ids, t_end, q, out)
                continue
            # the longest student-only token longer than prefix that data starts with
            best, best_len = self.lp(prefix), len(prefix)
            for u in self.student_only:
                b = self.s_table[u]
                if len(b) > best_len and b.startswith(prefix) and data.startswith(b):
                    best, best_len = u, len(b)
            out[best] = out.get(best, 0.0) + mass * qv

    def row(self, k: int, w: int, t_ids, t_end, q) -> dict[int, float]:
        """{student id: mass}, -1 the residual, unnormalised."""
        out: dict[int, float] = {}
        realized = t_ids[k]
        data = self.t_table[realized]
        total = (
            sum(q[k][v] for v in range(len(q[k])) if self.t_table[v].startswith(data[:w]))
            if w
            else 1.0
        )
        for v, qv in enumerate(q[k]):
            b = self.t_table[v]
            if w == 0:
                u = self.s_eos if v == self.t_eos else (self.lp(b) if b else -1)
            elif not b.startswith(data[:w]):
                continue
            else:
                u = self.lp(b[w:]) if len(b) > w else -1
            out[u] = out.get(u, 0.0) + qv / total
        if data and self.extendable(data[w:]):
            m = q[k][realized] / total
            u = self.lp(data[w:])
            out[u] -= m
            self.chain(data[w:], m, k + 1, t_ids, t_end, q, out)
        return out


def reference_targets(pair: TokenizerPair, rows, batch: ScoredBatch) -> torch.Tensor:
    """(R, V_S + 1): unnormalised target and residual (last column) of every row."""
    ref = Reference(pair)
    q = torch.softmax(batch.teacher.logits.double(), -1).numpy()
    t_ids = batch.teacher.ids.tolist()
    out = torch.zeros(len(rows), batch.student.logits.shape[-1] + 1, dtype=torch.float64)
    for r in range(len(rows)):
        k, w, b = int(rows.teacher_pos[r]), int(rows.within[r]), int(rows.seq[r])
        for u, m in ref.row(k, w, t_ids, int(batch.teacher.offsets[b + 1]), q).items():
            out[r, u if u >= 0 else -1] += m
    return out


TEXTS = ["12+3=15", "123-45=78", "Total: 1215 and 4512.", "a 1 12 123 1234 x", "45+45=90"]


@pytest.mark.parametrize("pair_name", ["teacher_merges", "student_merges"])
def test_targets_equal_the_slow_reference(pair_name, request):
    pair = request.getfixturevalue(pair_name)
    aligned, batch = scored(pair, TEXTS)
    aligner = build_aligner("bpm")
    rows = aligner.build_rows(aligned.segments, batch)
    target = aligner.target_of(rows, batch, 1.0)
    pi, reached = target(slice(0, len(rows)))
    ref = reference_targets(pair, rows, batch)
    ref_reached = ref[:, :-1].sum(-1)
    torch.testing.assert_close(reached.double(), ref_reached, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        pi.double(), ref[:, :-1] / ref_reached[:, None], atol=1e-5, rtol=1e-4
    )
    assert (
        ref[:, :-1] >= -1e-9
    ).all()  # the chain only moves mass, never takes more than there was
    torch.testing.assert_close(
        ref.sum(-1), torch.ones(len(rows), dtype=torch.float64)
    )  # nothing lost


def test_every_student_token_is_a_row_and_hand_worked_offsets(teacher_merges):
    """12+3=15: student 1 2 + 3 = 1 5 <eos>, teacher 12 + 3 = 15 <eos>. The student's `2` starts
    one byte into the teacher's `12`, its `5` one byte into `15`."""
    aligned, batch = scored(teacher_merges, ["12+3=15"])
    rows = build_aligner("bpm").build_rows(aligned.segments, batch)
    assert rows.student_pos.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert rows.teacher_pos.tolist() == [0, 0, 1, 2, 3, 4, 4, 5]
    assert rows.within.tolist() == [0, 1, 0, 0, 0, 0, 1, 0]
    assert rows.supervised_student_tokens == 8  # coverage 8/8 where exact has 4/8


def test_hand_computed_target_inside_a_merged_teacher_token(teacher_merges):
    """At the student's `2` inside the teacher's `12`, the target is the teacher's belief about
    the byte after `1`: tokens starting with `1` are 1, 12, 15, 123 (and none else here)."""
    pair = teacher_merges
    aligned, batch = scored(pair, ["12+3=15"])
    tid = {t: pair.teacher.convert_tokens_to_ids(t) for t in ["1", "12", "15", "123"]}
    sid = {t: pair.student.convert_tokens_to_ids(t) for t in ["2", "5"]}
    logits = torch.full_like(batch.teacher.logits, -30.0)
    logits[0, tid["1"]], logits[0, tid["12"]] = np.log(0.1), np.log(0.5)
    logits[0, tid["15"]], logits[0, tid["123"]] = np.log(0.2), np.log(0.2)
    batch.teacher.logits = logits
    aligner = build_aligner("bpm")
    rows = aligner.build_rows(aligned.segments, batch)
    pi, reached = aligner.target_of(rows, batch, 1.0)(slice(1, 2))  # the row of the student's `2`
    # M = 1.0 (all mass starts with `1`); `1` alone: continuation unknown, residual 0.1;
    # `12` and `123` -> `2` (0.7), `15` -> `5` (0.2); renormalised over 0.9
    assert reached.item() == pytest.approx(0.9, abs=1e-5)
    assert pi[0, sid["2"]].item() == pytest.approx(0.7 / 0.9, abs=1e-5)
    assert pi[0, sid["5"]].item() == pytest.approx(0.2 / 0.9, abs=1e-5)


def test_hand_computed_chain_into_a_merged_student_token(student_merges):
    """The student writes `123` as one token; the teacher writes `1`, `2`, `3`. The target of
    `123` is q0(1)·q1(2)·q2(3); of `12` q0(1)·q1(2)·(1−q2(3)); of `1` q0(1)·(1−q1(2)−q1(5))... as
    the chain formula gives; `15` gets q0(1)·q1(5)."""
    pair = student_merges
    aligned, batch = scored(pair, ["123"])
    t = {x: pair.teacher.convert_tokens_to_ids(x) for x in ["1", "2", "3", "5"]}
    s = {x: pair.student.convert_tokens_to_ids(x) for x in ["1", "12", "123", "15", "4"]}
    logits = torch.full_like(batch.teacher.logits, -30.0)
    logits[0, t["1"]], logits[0, pair.teacher.convert_tokens_to_ids("4")] = np.log(0.6), np.log(0.4)
    logits[1, t["2"]], logits[1, t["5"]], logits[1, t["3"]] = np.log(0.5), np.log(0.3), np.log(0.2)
    logits[2, t["3"]], logits[2, t["5"]] = np.log(0.9), np.log(0.1)
    batch.teacher.logits = logits
    aligner = build_aligner("bpm")
    rows = aligner.build_rows(aligned.segments, batch)
    assert rows.student_pos.tolist() == [0, 1] and rows.teacher_pos.tolist() == [0, 3]  # `123`, EOS
    pi, reached = aligner.target_of(rows, batch, 1.0)(slice(0, 1))
    assert reached.item() == pytest.approx(1.0, abs=1e-5)
    expect = {
        "123": 0.6 * 0.5 * 0.9,
        "12": 0.6 * 0.5 * 0.1,
        "15": 0.6 * 0.3,
        "1": 0.6 * 0.2,
        "4": 0.4,
    }
    for name, value in expect.items():
        assert pi[0, s[name]].item() == pytest.approx(value, abs=1e-4), name


def test_identical_tokenizers_give_plain_opd_equal_to_exact_and_simct(split_tokenizer):
    pair = TokenizerPair.build(split_tokenizer, split_tokenizer)
    aligned, batch = scored(pair, TEXTS)
    loss_cfg = LossConfig(divergence="rkl")
    values = {}
    for name in ["bpm", "exact", "simct"]:
        aligner = build_aligner(name)
        rows = aligner.build_rows(aligned.segments, batch)
        values[name] = aligner.row_losses(rows, batch, loss_cfg)
    plain = losses.full_divergence(batch.student.logits, batch.teacher.logits, divergence="rkl")
    for name, value in values.items():
        torch.testing.assert_close(value, plain, msg=name)


def test_equal_vocabularies_serialised_apart_give_the_teacher_distribution():
    """The same tokens, but a teacher with one more control token (no identity fast path): the
    projection is the identity and only the control token's mass is residual."""
    student = byte_level_tokenizer([("1", "2")], split_digits=False)
    teacher = byte_level_tokenizer([("1", "2")], split_digits=False)
    teacher.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    pair = TokenizerPair.build(student, teacher)
    assert not pair.identical
    aligned, batch = scored(pair, TEXTS)
    aligner = build_aligner("bpm")
    rows = aligner.build_rows(aligned.segments, batch)
    assert (rows.within == 0).all()
    pi, reached = aligner.target_of(rows, batch, 1.0)(slice(0, len(rows)))
    q = torch.softmax(batch.teacher.logits[rows.teacher_pos], -1)  # (R, V_S + 1): <extra> last
    # text tokens and EOS reach the student; <pad> and <extra> (control tokens) are residual
    reaches = torch.tensor([bool(b) or v == pair.teacher.eos_token_id
                            for v, b in enumerate(pair.teacher_bytes.table)])  # fmt: skip
    kept = q * reaches
    torch.testing.assert_close(reached, kept.sum(-1))
    torch.testing.assert_close(pi, kept[:, :-1] / kept.sum(-1, keepdim=True))


@pytest.mark.parametrize("divergence", ["rkl", "fkl", "jsd"])
def test_loss_is_the_divergence_to_the_projected_target_with_gradients(teacher_merges, divergence):
    aligned, batch = scored(teacher_merges, TEXTS)
    aligner = build_aligner("bpm")
    rows = aligner.build_rows(aligned.segments, batch)
    loss_cfg = LossConfig(divergence=divergence, chunk_rows=3)  # several chunks, checkpointed
    got = aligner.row_losses(rows, batch, loss_cfg)
    ref = reference_targets(teacher_merges, rows, batch)
    pi = (ref[:, :-1] / ref[:, :-1].sum(-1, keepdim=True)).float()
    zs = batch.student.logits[rows.student_pos]
    want = losses.full_divergence(zs, log_target(pi), divergence=divergence)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    g_got = torch.autograd.grad(got.sum(), batch.student.logits)[0]
    g_want = torch.autograd.grad(want.sum(), batch.student.logits)[0]
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-4)


def test_sampled_form_advantage_is_log_target_minus_log_student(student_merges):
    aligned, batch = scored(student_merges, TEXTS)
    aligner = build_aligner("bpm")
    rows = aligner.build_rows(aligned.segments, batch)
    got = aligner.row_losses(rows, batch, LossConfig(form="sampled"))
    ref = reference_targets(student_merges, rows, batch)
    pi = ref[:, :-1] / ref[:, :-1].sum(-1, keepdim=True)
    ids = batch.student.ids[rows.student_pos]
    teacher_lp = log_target(pi[torch.arange(len(rows)), ids]).float()
    student_lp = losses.token_logprobs(batch.student.logits[rows.student_pos], ids)
    torch.testing.assert_close(
        got, losses.sampled_policy_gradient(student_lp, teacher_lp), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize(
    "student_name,teacher_name", [("gpt2", "qwen2.5"), ("qwen2.5", "deepseek")]
)
def test_real_pairs_lose_only_what_the_accounting_names(student_name, teacher_name):
    """On real tokenizer pairs every student token is a row and the projected mass plus the
    residual is 1; at w = 0 the residual is exactly the teacher's control tokens (not EOS)."""
    pair = TokenizerPair.build(
        load_fixture_tokenizer(student_name), load_fixture_tokenizer(teacher_name)
    )
    texts = ["Janet has 16 eggs. She eats 3 and bakes 4123 muffins: 16 - 3 - 4 = 9.\n#### 18",
             "The answer is 1,234,567 because  spaces\tand tabs… café ✓."]  # fmt: skip
    aligned, batch = scored(pair, texts, scale=1.0)
    aligner = build_aligner("bpm")
    rows = aligner.build_rows(aligned.segments, batch)
    n_tokens = sum(len(pair.student(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert rows.supervised_student_tokens == n_tokens
    _, reached = aligner.target_of(rows, batch, 1.0)(slice(0, len(rows)))
    q = torch.softmax(batch.teacher.logits[rows.teacher_pos], -1)
    t_table = pair.teacher_bytes.table
    control = torch.tensor(
        [not b and v != pair.teacher.eos_token_id for v, b in enumerate(t_table)]
    )
    control = torch.cat([control, torch.ones(q.shape[1] - len(control), dtype=torch.bool)])
    at_boundary = rows.within == 0
    torch.testing.assert_close(
        reached[at_boundary], 1 - q[at_boundary][:, control].sum(-1), atol=1e-5, rtol=1e-5
    )
    assert aligner.vocab_reached(pair) > 0.99


@settings(max_examples=15, deadline=None)
@given(
    text=st.text(alphabet="0123456789+-= ab\n", min_size=1, max_size=16),
    merges=st.lists(
        st.sampled_from(DIGIT_MERGES + [("a", "b"), ("Ġ", "1"), ("=", "Ġ")]), unique=True
    ),
    student_side=st.booleans(),
)
def test_property_matches_reference_and_conserves_mass(text, merges, student_side):
    if ("12", "3") in merges and ("1", "2") not in merges:
        merges = [("1", "2"), *merges]
    merges = sorted(merges, key=lambda m: len(m[0] + m[1]))  # a merge's parts exist before it
    merged = byte_level_tokenizer(merges, split_digits=False)
    split = byte_level_tokenizer([], split_digits=True)
    pair = (
        TokenizerPair.build(merged, split) if student_side else TokenizerPair.build(split, merged)
    )
    aligned, batch = scored(pair, [text], seed=len(text))
    aligner = build_aligner("bpm")
    rows = aligner.build_rows(aligned.segments, batch)
    pi, reached = aligner.target_of(rows, batch, 1.0)(slice(0, len(rows)))
    ref = reference_targets(pair, rows, batch)
    torch.testing.assert_close(reached.double(), ref[:, :-1].sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pi.sum(-1), torch.ones(len(rows)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.sum(-1), torch.ones(len(rows), dtype=torch.float64))


def test_a_finished_step_is_not_kept_alive_by_the_memo(teacher_merges):
    """The memo shared by the loss and teacher_mass holds weak references: once a step's batch
    is gone, its logits are freed (they are the largest tensors of a step)."""
    import gc
    import weakref

    aligned, batch = scored(teacher_merges, TEXTS)
    aligner = build_aligner("bpm")
    rows = aligner.build_rows(aligned.segments, batch)
    loss = aligner.row_losses(rows, batch, LossConfig())
    first = aligner.target_of(rows, batch, 1.0)
    assert aligner.target_of(rows, batch, 1.0) is first  # teacher_mass reuses the loss's work
    aligner.teacher_mass(rows, batch, LossConfig())
    teacher_logits = weakref.ref(batch.teacher.logits)
    student_logits = weakref.ref(batch.student.logits)
    del batch, rows, loss, first
    gc.collect()
    assert teacher_logits() is None and student_logits() is None
