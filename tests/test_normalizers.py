"""Teachers whose own bytes differ from the response text: a SentencePiece dummy prefix (a
`Prepend("▁")` normaliser, Metaspace `prepend_scheme: first`), an NFC normaliser; and response
text that spells a control token. Every tokenizer is built here with the `tokenizers` library.

Alignment runs on the teacher's bytes through a byte map back to the text
(`offsets.teacher_byte_map`); segments are checked against hand-computed bounds, and coverage on
GSM8K test answers against the acceptance bound (simct >= 0.99).
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_opd.align import TokenizerPair, align_batch, segment_responses
from lightning_opd.align.offsets import teacher_byte_map
from lightning_opd.align.pairing import SegmentedResponses, unaligned_warning
from lightning_opd.cli.align import measure_coverage
from lightning_opd.config import TokenizerConfig
from lightning_opd.models import train_tokenizer

GSM8K = Path(__file__).resolve().parent.parent / "data" / "gsm8k" / "test.jsonl"
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]


def wrap(tok: Tokenizer, eos: str, **special: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, **special)


def sp_tokenizer(vocab: list[str], merges: list[tuple[str, str]], prefix: str) -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE with byte fallback: `prefix` is "prepend" (Llama-2: a Prepend("▁")
    normaliser), or Metaspace's prepend_scheme "first" | "never"."""
    pieces = SP_SPECIALS + BYTE_TOKENS + vocab
    bpe = models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(bpe)
    if prefix == "prepend":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])  # fmt: skip
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prefix)
        tok.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme=prefix), decoders.ByteFallback()])
    tok.add_special_tokens(SP_SPECIALS)
    return wrap(tok, "</s>", unk_token="<unk>", bos_token="<s>")


def trained_sp_tokenizer(texts: list[str], prefix: str) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE trained on `texts`, its byte-fallback pieces added to the vocabulary."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    vocab = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    return sp_tokenizer(vocab, [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]],
                        prefix)  # fmt: skip


def plain_bpe(chars: str, merges: list[tuple[str, str]], normalizer=None) -> PreTrainedTokenizerFast:
    """A BPE over single characters (its pieces are their own UTF-8: the 'plain' kind of vocab.py)."""
    vocab = {"<eos>": 0}
    for piece in [*chars, *("".join(m) for m in merges)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.normalizer = normalizer
    tok.add_special_tokens(["<eos>"])
    return wrap(tok, "<eos>")


def segments_of(student, teacher, text: str):
    pair = TokenizerPair.build(student, teacher)
    s_ids = student(text, add_special_tokens=False)["input_ids"]
    out = segment_responses(pair, [s_ids], [True])
    return pair, s_ids, out


# --- hand-computed segments --------------------------------------------------------------------

AB_VOCAB, AB_MERGES = ["▁", "a", "b", "ab", "▁a", "▁ab"], [("▁", "a"), ("▁a", "b"), ("a", "b")]


@pytest.mark.parametrize("prefix", ["prepend", "first"])
def test_dummy_prefix_teacher_is_aligned_on_its_own_bytes(prefix):
    """Text "ab ab". Teacher: "▁ab" "▁ab" (bytes " ab ab", one more than the text); student (no
    prefix): "ab" "▁" "ab". The prefix maps to nothing: "ab" ↔ "▁ab" is a 1:1 match at text
    bytes [0, 2); student "▁" "ab" and teacher "▁ab" end together but no 1:1 match closes them,
    so they join the segment EOS closes."""
    teacher = sp_tokenizer(AB_VOCAB, AB_MERGES, prefix)
    student = sp_tokenizer(AB_VOCAB, [("a", "b")], "never")
    pair, s_ids, out = segments_of(student, teacher, "ab ab")
    assert teacher.convert_ids_to_tokens(out.teacher_ids[0][:-1]) == ["▁ab", "▁ab"]
    assert student.convert_ids_to_tokens(s_ids) == ["ab", "▁", "ab"]
    seg = out.per_response[0]
    assert seg is not None and out.unaligned_causes == [None]
    assert seg.s_bounds.tolist() == [0, 1, 4] and seg.t_bounds.tolist() == [0, 1, 3]
    assert seg.valid.all() and seg.n_unmapped == 0


def test_no_prefix_teacher_spells_the_text_and_needs_no_map():
    teacher = sp_tokenizer(AB_VOCAB, AB_MERGES, "never")
    student = sp_tokenizer(AB_VOCAB, [("a", "b")], "never")
    pair, s_ids, out = segments_of(student, teacher, "ab ab")
    assert teacher.convert_ids_to_tokens(out.teacher_ids[0][:-1]) == ["ab", "▁ab"]
    assert pair.teacher_bytes.join(out.teacher_ids[0][:-1]) == b"ab ab"
    assert out.per_response[0].s_bounds.tolist() == [0, 1, 4]
    assert out.per_response[0].t_bounds.tolist() == [0, 1, 3]


def test_byte_fallback_character_after_a_prefix_aligns():
    """"é" is not in the vocabulary: two byte pieces <0xC3> <0xA9> on both sides, after the
    teacher's dummy prefix "▁" (its own token). Student: <0xC3> <0xA9>; teacher: "▁" <0xC3> <0xA9>."""
    teacher = sp_tokenizer(AB_VOCAB, AB_MERGES, "prepend")
    student = sp_tokenizer(AB_VOCAB, [], "never")
    pair, s_ids, out = segments_of(student, teacher, "é")
    assert teacher.convert_ids_to_tokens(out.teacher_ids[0][:-1]) == ["▁", "<0xC3>", "<0xA9>"]
    seg = out.per_response[0]
    # the prefix folds into the first segment; then each byte is a 1:1 match, then EOS
    assert seg.s_bounds.tolist() == [0, 1, 2, 3] and seg.t_bounds.tolist() == [0, 2, 3, 4]


def test_nfc_teacher_maps_a_composed_character_onto_its_decomposed_text():
    """Text "cafe\u0301 x" (decomposed é, 8 bytes). Teacher (NFC): "caf" "é" " " "x" (7 bytes);
    student: "caf" "e" "\u0301" " " "x". "é" maps end to end onto "e" "\u0301", with no 1:1 match
    inside: they join the segment that the 1:1 match " " closes; then "x" and EOS."""
    chars = "cafeé\u0301 x"
    teacher = plain_bpe(chars, [("c", "a"), ("ca", "f")], normalizers.NFC())
    student = plain_bpe(chars, [("c", "a"), ("ca", "f")])
    pair, s_ids, out = segments_of(student, teacher, "cafe\u0301 x")
    assert teacher.convert_ids_to_tokens(out.teacher_ids[0][:-1]) == ["caf", "é", " ", "x"]
    assert len(s_ids) == 5
    seg = out.per_response[0]
    assert seg.s_bounds.tolist() == [0, 1, 4, 5, 6] and seg.t_bounds.tolist() == [0, 1, 3, 4, 5]
    assert seg.valid.all() and seg.n_unmapped == 0


def test_text_the_teacher_rewrote_is_left_unsupervised_and_counted():
    """A Lowercase normaliser: "Ab" -> "ab". "A" -> "a" is no normal form of it: the student's
    "A" is unmapped (its segment dropped, counted); "b" and EOS stay supervised."""
    teacher = plain_bpe("Aab", [], normalizers.Lowercase())
    student = plain_bpe("Aab", [])
    _, _, out = segments_of(student, teacher, "Ab")
    seg = out.per_response[0]
    assert seg.s_bounds.tolist() == [0, 1, 2, 3] and seg.valid.tolist() == [False, True, True]
    assert seg.n_unmapped == 1


def test_byte_map_of_a_prefix_and_of_nfc():
    prefix = teacher_byte_map(b" ab", b"ab")
    assert prefix.to_text.tolist() == [0, 0, 1, 2] and prefix.anchored.all() and not prefix.unmapped.any()
    nfc = teacher_byte_map("xé".encode(), "xe\u0301".encode())  # teacher 3 bytes, text 4
    assert nfc.to_text.tolist() == [0, 1, 1, 4] and nfc.anchored.tolist() == [True, True, False, True]
    assert teacher_byte_map(b"\xff", b"a") is None


@settings(max_examples=60, deadline=None)
@given(teacher=st.text(max_size=30), text=st.text(max_size=30))
def test_byte_map_is_monotone_and_spans_both_strings(teacher, text):
    t, s = teacher.encode(), text.encode()
    m = teacher_byte_map(t, s)
    assert len(m.to_text) == len(t) + 1 and len(m.unmapped) == len(s)
    assert np.all(np.diff(m.to_text) >= 0) and m.to_text[0] >= 0 and m.to_text[-1] <= len(s)
    if teacher == text and text:
        assert m.to_text.tolist() == list(range(len(t) + 1)) and m.anchored.all()


# --- control-token text ------------------------------------------------------------------------


def test_response_text_spelling_a_control_token_stays_text_on_the_teacher_side():
    """"<|im_start|>" in a response is the teacher's control token only when spelt by a template;
    tokenized as response text it is its characters, so the sequence aligns in full."""
    chars = "<|>_imstarxy "
    teacher = plain_bpe(chars, [("i", "m")])
    teacher.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    student = plain_bpe(chars, [])
    control = teacher.convert_tokens_to_ids("<|im_start|>")
    text = "x <|im_start|>y"
    pair = TokenizerPair.build(student, teacher)
    s_ids = [student.convert_tokens_to_ids(c) for c in text]  # what a student could sample
    out = align_batch(pair, [s_ids], [True])
    t_ids = out.teacher_ids[0][:-1]
    assert control not in t_ids and pair.teacher_bytes.join(t_ids) == text.encode()
    assert out.per_response[0] is not None and out.segments.n_unaligned_sequences == 0
    assert len(t_ids) == len(text) - 1  # "im" is one teacher token, every other character its own


# --- coverage on GSM8K (the acceptance bound) --------------------------------------------------


@pytest.fixture(scope="module")
def answers() -> list[str]:
    return [json.loads(line)["answer"] for line in GSM8K.read_text(encoding="utf-8").splitlines() if line.strip()]


def simct_coverage(student, teacher, texts: list[str]) -> dict[str, float]:
    return {r["aligner"]: r["coverage"] for r in measure_coverage(student, teacher, texts, ["exact", "simct"])}


def test_prepend_space_teacher_simct_coverage_on_gsm8k(answers):
    teacher = trained_sp_tokenizer(answers, "prepend")
    student = train_tokenizer(answers, TokenizerConfig(vocab_size=300), teacher=False)
    pair = TokenizerPair.build(student, teacher)
    ids = teacher("Janet", add_special_tokens=False)["input_ids"]
    assert pair.teacher_bytes.join(ids).startswith(b" Janet")  # the dummy prefix is there
    coverage = simct_coverage(student, teacher, answers)
    assert coverage["simct"] >= 0.99 and coverage["exact"] > 0.1


def test_nfc_teacher_simct_coverage_on_decomposed_gsm8k(answers):
    texts = [unicodedata.normalize("NFD", f"Café: {a} — résumé, naïve") for a in answers]
    assert all(t != unicodedata.normalize("NFC", t) for t in texts)
    student = train_tokenizer(answers, TokenizerConfig(vocab_size=300), teacher=False)
    teacher = train_tokenizer(answers, TokenizerConfig(vocab_size=200, digits="merge"), teacher=True)
    teacher.backend_tokenizer.normalizer = normalizers.NFC()
    pair = TokenizerPair.build(student, teacher)
    ids = teacher(texts[0], add_special_tokens=False)["input_ids"]
    assert pair.teacher_bytes.join(ids) != texts[0].encode()  # the normaliser changes every text
    coverage = simct_coverage(student, teacher, texts)
    assert coverage["simct"] >= 0.99



# --- the warning when responses go unaligned ---------------------------------------------------


def test_unaligned_responses_warn_with_their_cause_above_one_percent():
    out = SegmentedResponses([], [], [], [], [None] * 99 + ["the teacher's tokens do not spell UTF-8 text"])
    assert unaligned_warning(out) is None  # 1 of 100: not more than 1%
    out.unaligned_causes[0] = "the teacher's tokens do not spell UTF-8 text"
    message = unaligned_warning(out)
    assert message.startswith("2 of 100 responses are unaligned") and "do not spell UTF-8" in message
