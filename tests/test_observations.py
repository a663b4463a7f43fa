"""Tool observations in alignment, the loss normaliser, coverage and SOD steps.

(a) observation tokens (loss mask 0) are out of the normaliser and of coverage: with identical
    tokenizers a response holding a tool call and its output has coverage 1 and a normaliser
    equal to its model tokens plus EOS;
(b) segments close at observation edges, so across real tokenizer pairs (packaged fixtures) every
    model token of a Hermes or fenced tool-call response is supervised by simct, and no
    observation token ever is;
(c) an EOS sampled right after an observation is a SOD step of its own (the released code's
    steps are the runs of response_mask == 1), checked on hand-computed d_k and w_k.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_opd import losses
from lightning_opd.align import ScoredBatch, ScoredSide, TokenizerPair, align_batch, build_aligner
from lightning_opd.align.base import pack_segments
from lightning_opd.align.offsets import segment
from lightning_opd.config import LossConfig
from lightning_opd.fixtures import load_fixture_tokenizer
from lightning_opd.module import OPDModule
from lightning_opd.rollout.generate import Rollout
from lightning_opd.weighting import batched_step_weights, eos_step_id
from tests.test_align_exact import exact_pairs, reference_exact_pairs

EPS = 1e-6
CALL = '{"name": "code_interpreter", "arguments": {"code": "x = 12*34\\nprint(x)"}}'
# (model text, observation, model text, ...): pieces alternate, starting with the model's
HERMES = (
    f"I'll compute it.\n<tool_call>\n{CALL}\n</tool_call>",
    "\n<tool_response>\n408\n</tool_response>\n",
    "So 12*34 = 408.\n#### 408",
)
FENCED = (
    "I'll compute it.\n```python\nx = 12*34\nprint(x)\n```",
    "\n```output\n408\n```\n",
    "Check: ```python\nprint(408 - 34*12)\n```",
    "\n```output\n0\n```\n",
    "#### 408",
)


@functools.cache
def tokenizer(name: str):
    return load_fixture_tokenizer(name)


@functools.cache
def pair_of(student: str, teacher: str) -> TokenizerPair:
    return TokenizerPair.build(tokenizer(student), tokenizer(teacher))


def encode(tok, text: str, by_char: bool = False) -> list[int]:
    """The tokenizer's ids of text; by_char: one character at a time, as a sampling model may
    write it (never the tokenizer's own cut): byte-level tokenizers spell any text this way."""
    if by_char:
        return [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]]
    return tok(text, add_special_tokens=False)["input_ids"]


def rollout_of(tok, pieces: tuple[str, ...], by_char: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a tool rollout: model pieces as sampled ids, each observation tokenized
    apart (as rollout/tools.py appends it), mask 0 on the observation's tokens."""
    ids: list[int] = []
    mask: list[int] = []
    for k, text in enumerate(pieces):
        model = k % 2 == 0
        new = encode(tok, text, by_char and model)
        ids += new
        mask += [int(model)] * len(new)
    return ids, mask


def packed(pair: TokenizerPair, ids: list[int], mask: list[int], boundary: str = "match"):
    """(the aligned batch, its packed BatchSegments) of one response that ended with EOS."""
    aligned = align_batch(pair, [ids], [True], boundary=boundary, loss_mask=[mask])
    return aligned, aligned.segments


def supervised_positions(name: str, segments) -> set[int]:
    rows = build_aligner(name).build_rows(segments, None)
    return set(rows.s_members.tolist())


# --- (a) identical tokenizers: the normaliser and coverage count model tokens only ---------------


def test_identical_tokenizers_fenced_call_coverage_is_one_and_normaliser_counts_model_tokens():
    tok = tokenizer("qwen2.5")
    pair = pair_of("qwen2.5", "qwen2.5")
    pieces = FENCED[:3]  # call, output, the text after it
    ids, mask = rollout_of(tok, pieces)
    n_model = len(encode(tok, pieces[0])) + len(encode(tok, pieces[2])) + 1  # + EOS
    n_observation = len(encode(tok, pieces[1]))
    assert n_observation > 0 and sum(mask) + 1 == n_model  # the fixture has both kinds
    seg, segments = packed(pair, ids, mask)
    assert seg.model_tokens == [n_model]
    assert segments.n_student_tokens == n_model  # the normaliser, observations excluded
    for name in ("exact", "simct"):
        assert len(supervised_positions(name, segments)) / segments.n_student_tokens == 1.0
    # without model_tokens, pack_segments counts an aligned sequence's model tokens itself
    unpacked = pack_segments(seg.per_response, np.array([0, len(ids) + 1]), np.array([0, len(ids) + 1]))
    assert unpacked.n_student_tokens == n_model


def test_response_token_loss_is_the_row_sum_over_model_tokens():
    """The loss the module reduces to: a row loss of 1 on each supervised token sums to the
    model-token count, so the default normaliser gives exactly 1 (it gave 0.67 when the
    observation tokens were counted)."""
    tok = tokenizer("qwen2.5")
    pair = pair_of("qwen2.5", "qwen2.5")
    ids, mask = rollout_of(tok, FENCED[:3])
    _, segments = packed(pair, ids, mask)
    rows = build_aligner("exact").build_rows(segments, None)
    loss = losses.reduce_rows(torch.ones(len(rows)), None, segments.n_student_tokens)
    assert loss.item() == pytest.approx(1.0)


def test_unaligned_sequence_counts_its_model_tokens_when_given():
    segments = pack_segments([None], np.array([0, 9]), np.array([0, 7]), model_tokens=[4])
    assert segments.n_student_tokens == 4 and segments.n_unaligned_sequences == 1
    assert pack_segments([None], np.array([0, 9]), np.array([0, 7])).n_student_tokens == 9


# --- (b) segments close at observation edges ----------------------------------------------------


def test_an_edge_closes_a_segment_where_both_sides_end_there():
    # student bytes "a" "b" "c" "d", teacher "ab" "cd": no 1:1 match, so without edges the
    # whole response (and EOS) is one segment; an edge at byte 2 closes one after "b" / "ab"
    s_lengths, t_lengths = np.array([1, 1, 1, 1]), np.array([2, 2])
    plain = segment(s_lengths, t_lengths, eos=True)
    assert plain.s_bounds.tolist() == [0, 5] and plain.t_bounds.tolist() == [0, 3]
    observed = np.array([False, False, True, True])  # "cd" is an observation
    cut = segment(s_lengths, t_lengths, eos=True, s_excluded=observed, edges=np.array([2]))
    assert cut.s_bounds.tolist() == [0, 2, 5] and cut.t_bounds.tolist() == [0, 1, 3]
    assert cut.valid.tolist() == [True, False]  # the model's "ab" is kept, "cd"+EOS is not
    assert (cut.n_student, cut.n_excluded, cut.n_model) == (5, 2, 3)
    # an edge at which the student has no token ending (byte 1, inside "ab" of "ab" "cd")
    # forces nothing: one segment, as without it
    inside = segment(np.array([2, 2]), np.array([1, 1, 1, 1]), eos=True, edges=np.array([1]))
    assert inside.s_bounds.tolist() == [0, 3] and inside.t_bounds.tolist() == [0, 5]


REAL_PAIRS = [("qwen2.5", "deepseek"), ("deepseek", "gpt2"), ("qwen2.5", "gpt2"), ("gpt2", "qwen2.5")]


@pytest.mark.parametrize("student,teacher", REAL_PAIRS)
@pytest.mark.parametrize("pieces", [HERMES, FENCED], ids=["hermes", "fenced"])
@pytest.mark.parametrize("by_char", [False, True], ids=["own_cut", "by_char"])
@pytest.mark.parametrize("boundary", ["match", "offset"])
def test_every_model_token_is_supervised_by_simct_across_tokenizers(student, teacher, pieces, by_char, boundary):
    pair = pair_of(student, teacher)
    ids, mask = rollout_of(pair.student, pieces, by_char)
    seg, segments = packed(pair, ids, mask, boundary)
    ss, t_ids = seg.per_response[0], seg.teacher_ids[0]
    assert ss is not None
    # both sides of every segment spell the same bytes, in order (EOS has none)
    s_parts = [pair.student_bytes.join(ids[a:b]) for a, b in zip(ss.s_bounds[:-1], ss.s_bounds[1:], strict=True)]
    t_parts = [pair.teacher_bytes.join(t_ids[a:b]) for a, b in zip(ss.t_bounds[:-1], ss.t_bounds[1:], strict=True)]
    assert s_parts == t_parts and b"".join(s_parts) == seg.texts[0].encode("utf-8")
    model = {i for i, m in enumerate(mask) if m} | {len(ids)}  # EOS is the model's
    supervised = supervised_positions("simct", segments)
    assert supervised == model  # every model token, and no observation token
    assert len(supervised) / segments.n_student_tokens == 1.0


@pytest.mark.parametrize("student,teacher", REAL_PAIRS)
@pytest.mark.parametrize("pieces", [HERMES, FENCED], ids=["hermes", "fenced"])
@pytest.mark.parametrize("by_char", [False, True], ids=["own_cut", "by_char"])
@pytest.mark.parametrize("boundary", ["match", "offset"])
def test_exact_rows_are_true_matches_of_model_tokens_across_tokenizers(student, teacher, pieces, by_char,
                                                                       boundary):  # fmt: skip
    """Edges close segments on pairs that end together but may start apart (the fence before an
    output, "```" | "``" "`" on qwen2.5 -> gpt2): exact keeps only true 1:1 matches (same bytes
    at the same offset, from a walk over the byte strings), and every match of a model token
    except where its segment was dropped."""
    pair = pair_of(student, teacher)
    ids, mask = rollout_of(pair.student, pieces, by_char)
    seg, segments = packed(pair, ids, mask, boundary)
    ss, t_ids = seg.per_response[0], seg.teacher_ids[0]
    assert pair.teacher_bytes.join(t_ids[:-1]) == seg.texts[0].encode("utf-8")  # no normaliser change
    matches = reference_exact_pairs(pair, [ids], [t_ids], [True])
    dropped = {k for g in np.flatnonzero(~ss.valid) for k in range(ss.s_bounds[g], ss.s_bounds[g + 1])}
    rows = exact_pairs(segments)
    assert rows == {(k, j) for k, j in matches if k not in dropped}
    assert all(k == len(ids) or mask[k] for k, _ in rows)  # model tokens and EOS only
    if (student, teacher, pieces, by_char) == ("qwen2.5", "gpt2", FENCED, False):
        assert len(segments.seq) > len(rows)  # the test has teeth: closures on no match exist


@pytest.mark.parametrize("student,teacher", [("qwen2.5", "deepseek"), ("deepseek", "gpt2")])
@pytest.mark.parametrize("pieces", [HERMES, FENCED], ids=["hermes", "fenced"])
def test_without_edges_model_tokens_next_to_an_observation_are_lost(student, teacher, pieces):
    """Why edges are forced: the teacher's whole-text tokenization with segments closing at 1:1
    matches only (the alignment before issue 17) leaves model tokens unsupervised on these pairs,
    because their segments run into an observation."""
    pair = pair_of(student, teacher)
    ids, mask = rollout_of(pair.student, pieces)
    t_ids = encode(pair.teacher, "".join(pieces))
    old = segment(pair.student_bytes.lengths[ids], pair.teacher_bytes.lengths[t_ids], eos=True,
                  s_excluded=np.asarray(mask) == 0)  # fmt: skip
    kept = {i for g in np.flatnonzero(old.valid) for i in range(old.s_bounds[g], old.s_bounds[g + 1])}
    lost = [i for i, m in enumerate(mask) if m and i not in kept]
    assert lost


def test_a_character_split_across_an_edge_is_left_unsupervised_and_nothing_shifts():
    """A student observation ending in half of "é" whose other half the model writes after it:
    the edge moves back to the character's start, where no observation token ends, so the
    segment holding the split character is dropped; the model tokens before it, the tokens after
    the next closure, and EOS stay supervised."""
    pair = pair_of("gpt2", "deepseek")
    byte_id = {b: i for i, b in enumerate(pair.student_bytes.table) if len(b) == 1}
    before, after = encode(pair.student, "x = 1"), encode(pair.student, " then y = 2")
    ids = before + [byte_id[b"\xc3"], byte_id[b"\xa9"]] + after
    mask = [1] * len(before) + [0, 1] + [1] * len(after)
    seg, segments = packed(pair, ids, mask)
    assert seg.texts[0] == "x = 1é then y = 2" and seg.per_response[0] is not None
    supervised = supervised_positions("simct", segments)
    split = len(before) + 1  # the model's half of "é"
    assert len(before) not in supervised and split not in supervised
    assert set(range(len(before))) <= supervised and len(ids) in supervised
    assert supervised & set(range(split + 1, len(ids)))  # alignment resumes after the character
    assert segments.n_student_tokens == len(ids)  # + EOS − the one observation token


def test_sampled_form_row_losses_are_finite_on_a_real_tool_response():
    """Rows at observation edges are ordinary rows: the losses run on them."""
    pair = pair_of("qwen2.5", "deepseek")
    ids, mask = rollout_of(pair.student, HERMES)
    seg, segments = packed(pair, ids, mask)
    n_s, n_t = len(ids) + 1, len(seg.teacher_ids[0])
    gen = torch.Generator().manual_seed(0)
    student = ScoredSide(torch.randn(n_s, len(pair.student_bytes.table), generator=gen),
                         torch.tensor([*ids, pair.student.eos_token_id]), torch.tensor([0, n_s]))  # fmt: skip
    teacher = ScoredSide(torch.randn(n_t, len(pair.teacher_bytes.table), generator=gen),
                         torch.tensor(seg.teacher_ids[0]), torch.tensor([0, n_t]))  # fmt: skip
    batch = ScoredBatch(student, teacher, pair.vocab)
    aligner = build_aligner("simct")
    rows = aligner.build_rows(segments, batch)
    for form in ("full", "sampled"):
        assert torch.isfinite(aligner.row_losses(rows, batch, LossConfig(form=form))).all()


# --- (c) EOS after an observation is its own SOD step -------------------------------------------


def test_eos_step_id_rules():
    assert eos_step_id([0, 0, -1, -1], [1, 1, 0, 0]) == 1  # after an observation: a new step
    assert eos_step_id([0, 0, -1, -1, 1, 1], [1, 1, 0, 0, 1, 1]) == 1  # after the model: its step
    assert eos_step_id([0, 0, -1, -1]) == 1  # without a mask, step -1 marks the observation
    assert eos_step_id([0, 1, 1, 2], [1, 1, 0, 1]) == 2  # delimiter steps: the last token's
    assert eos_step_id([0, 1, 1], [1, 1, 0]) == 2  # delimiter steps cover observations too
    assert eos_step_id([]) == 0


def packed_step_ids(rollout: Rollout, split: str = "tool_turns") -> torch.Tensor:
    """OPDModule.packed_step_ids of a rollout, with only the settings it reads."""
    host = SimpleNamespace(cfg=SimpleNamespace(sod=SimpleNamespace(split=split, delimiter="\n\n")))
    offsets = torch.tensor([0, *np.cumsum(rollout.response_lengths).tolist()])
    return OPDModule.packed_step_ids(host, rollout, [""] * len(rollout.response_ids), offsets)


def test_eos_after_an_observation_is_its_own_step_with_hand_computed_weights():
    # row 0: two model tokens, a two-token observation, then EOS at once; row 1: the same with
    # a model token after the observation, whose step EOS joins
    rollout = Rollout(
        prompt_ids=[[9], [9]], response_ids=[[5, 6, 7, 8], [5, 6, 7, 8, 4]], ended_with_eos=[True, True],
        prompt_index=[0, 0], loss_mask=[[1, 1, 0, 0], [1, 1, 0, 0, 1]],
        step_ids=[[0, 0, -1, -1], [0, 0, -1, -1, 1]],
    )  # fmt: skip
    steps = packed_step_ids(rollout)
    assert steps.tolist() == [0, 0, -1, -1, 1, 0, 0, -1, -1, 1, 1]
    # |log π_S − log π_T| per token: row 0: 0.5, 1.0, (obs), (obs), EOS 2.0; row 1: 0.5, 1.0,
    # (obs), (obs), 0.25, EOS 0.75
    student = torch.tensor([-1.0, -2.0, 0.0, 0.0, -0.5, -1.0, -2.0, 0.0, 0.0, -1.0, -1.0])
    teacher = torch.tensor([-1.5, -1.0, -9.0, -9.0, -2.5, -1.5, -1.0, -9.0, -9.0, -1.25, -0.25])
    sequence = torch.tensor([0] * 5 + [1] * 6)
    stats = batched_step_weights(student, teacher, steps, sequence, delta=0.2, eps=EPS)
    # row 0: d_1 = (0.5 + 1.0)/2 = 0.75, d_2 = 2.0 (the EOS alone), w_2 = 0.75/2.0 = 0.375
    # (with EOS in step 1, as before the fix: one step, d_1 = 3.5/3, w = 1 on the EOS)
    # row 1: d_1 = 0.75, d_2 = (0.25 + 0.75)/2 = 0.5, w_2 = min(0.75/0.5, 1.2) = 1.2
    assert stats.divergence.tolist() == pytest.approx([0.75, 2.0, 0.75, 0.5])
    assert stats.weight.tolist() == pytest.approx([1.0, (0.75 + EPS) / (2.0 + EPS), 1.0, 1.2])
    expected_tokens = [1.0, 1.0, 0.0, 0.0, (0.75 + EPS) / (2.0 + EPS), 1.0, 1.0, 0.0, 0.0, 1.2, 1.2]
    assert stats.token_weights.tolist() == pytest.approx(expected_tokens)


def test_eos_after_an_observation_is_its_own_step_under_the_delimiter_split():
    rollout = Rollout(prompt_ids=[[9]], response_ids=[[5, 6, 7]], ended_with_eos=[True], prompt_index=[0],
                      loss_mask=[[1, 1, 0]], step_ids=None)  # fmt: skip
    host = SimpleNamespace(
        cfg=SimpleNamespace(sod=SimpleNamespace(split="delimiter", delimiter="\n\n")),
        pair=SimpleNamespace(student_bytes=SimpleNamespace(lengths=np.array([1] * 10))),
    )
    steps = OPDModule.packed_step_ids(host, rollout, ["a\n\n"], torch.tensor([0, 4]))
    # bytes "a", "\n", "\n" (the observation): no delimiter ends before a token starts, one step
    assert steps.tolist() == [0, 0, 0, 1]
