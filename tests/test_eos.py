"""A bare tokenizer.json (no tokenizer_config.json beside it) names no EOS: it is taken from the
tokenizer's own end-of-text special tokens (`models.EOS_PREFERENCE`), or named explicitly
(`tokenizer.eos`, `--student-eos` / `--teacher-eos`). The Llama-3-style file is built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lightning_opd.cli import main
from lightning_opd.config import TokenizerConfig
from lightning_opd.errors import ModelLoadError
from lightning_opd.models import load_tokenizer

GSM8K = Path(__file__).resolve().parent.parent / "data" / "gsm8k" / "test.jsonl"
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def bare_tokenizer_json(path: Path, specials: list[str], vocab_size: int = 400) -> Path:
    """A byte-level BPE trained on GSM8K answers, `specials` added as special tokens, saved as a
    lone tokenizer.json in `path` (no tokenizer_config.json: no EOS named anywhere)."""
    texts = [json.loads(line)["answer"] for line in GSM8K.read_text(encoding="utf-8").splitlines()[:300]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    assert not (path / "tokenizer_config.json").exists()
    return path / "tokenizer.json"


@pytest.fixture(scope="module")
def llama3_json(tmp_path_factory) -> Path:
    return bare_tokenizer_json(tmp_path_factory.mktemp("llama3"), LLAMA3_SPECIALS)


def test_bare_llama3_tokenizer_json_takes_end_of_text_as_eos(llama3_json):
    tok = load_tokenizer(TokenizerConfig(source=str(llama3_json)))
    assert tok.eos_token == "<|end_of_text|>" and tok.eos_token_id == 1  # trained in this order
    assert tok.pad_token == "<|end_of_text|>"


def test_eos_named_explicitly_wins(llama3_json):
    tok = load_tokenizer(TokenizerConfig(source=str(llama3_json), eos="<|eot_id|>"))
    assert tok.eos_token == "<|eot_id|>" and tok.eos_token_id == 2


def test_eos_that_is_no_token_is_refused(llama3_json):
    with pytest.raises(ModelLoadError, match="'<eos>' is not one of its tokens"):
        load_tokenizer(TokenizerConfig(source=str(llama3_json), eos="<eos>"))


def test_no_end_of_text_token_at_all_is_a_clear_error(tmp_path):
    path = bare_tokenizer_json(tmp_path, ["<|begin_of_text|>", "<pad>"], vocab_size=300)
    with pytest.raises(ModelLoadError, match="names no EOS token.*tokenizer.eos"):
        load_tokenizer(TokenizerConfig(source=str(path)))


def test_align_command_on_bare_tokenizer_json_files(capsys, llama3_json, tmp_path):
    """Acceptance: the align command takes the bare Llama-3-style file (teacher) and another bare
    file whose only special token is <|endoftext|> (student); simct covers >= 0.99 of GSM8K."""
    student = bare_tokenizer_json(tmp_path / "student", ["<|endoftext|>"], vocab_size=300)
    code = main(["align", "--student", str(student), "--teacher", str(llama3_json), "--teacher-eos", "<|eot_id|>",
                 "--aligner", "exact,simct", "--json", str(GSM8K)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    coverage = {r["aligner"]: r["coverage"] for r in json.loads(out)}
    assert coverage["simct"] >= 0.99 and 0 < coverage["exact"] <= coverage["simct"]


def test_align_command_reports_an_unknown_eos_in_one_line(capsys, llama3_json):
    code = main(["align", "--student", str(llama3_json), "--student-eos", "<nope>", "--teacher", str(llama3_json),
                 str(GSM8K)])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "'<nope>' is not one of its tokens" in err
