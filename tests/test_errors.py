"""Errors a user can act on: `lightning-opd train` prints one line naming the file and line, the
key or the id, and the fix, and exits 2; `train(cfg)` from Python raises the exception itself.

Every case here stops before any model is trained (the data is read first when the tokenizers
are built; models and tokenizers given by path load before anything is trained), so the tests
run in seconds on a CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from lightning_opd import models
from lightning_opd.cli import main
from lightning_opd.config import CheckpointError, ConfigError, ModelConfig, load
from lightning_opd.errors import DataError, ModelLoadError, UserError
from lightning_opd.train import train

GOOD = json.dumps({"question": "What is 1+1?", "answer": "#### 2"})


def run_cli(capsys, tmp_path: Path, *overrides: str) -> tuple[int, str]:
    """`lightning-opd train` with the overrides (tiny, CPU, no progress bar) -> (code, stderr)."""
    code = main(["train", "trainer.accelerator=cpu", "trainer.progress_bar=false", "data.val_size=3",
                 f"run.output_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'cache'}", *overrides])  # fmt: skip
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lightning-opd: ") and "Traceback" not in err
    return lines[0]


def jsonl_file(path: Path, bad: bytes, at: int = 3, lines: int = 6) -> Path:
    """`lines` good GSM8K-style lines with the raw `bad` line at line number `at`."""
    rows = [bad if n == at else GOOD.encode() for n in range(1, lines + 1)]
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


# ------------------------------------------------------------------------------------ data


def json_column(text: str) -> int:
    with pytest.raises(json.JSONDecodeError) as err:
        json.loads(text)
    return err.value.colno


@pytest.mark.parametrize("line", [
    'note: {"question": "q", "answer": 1}',  # leading text before the object
    '   {"question": "Wie viel ist 2€+2?", "answer": 4,}',  # leading blanks, non-ASCII before the error
    '{"question": "Über 3 Brücken", "answer" 4}',
])  # fmt: skip
def test_bad_json_line_names_file_line_and_jsons_own_column(capsys, tmp_path, line):
    path = jsonl_file(tmp_path / "bad.jsonl", line.encode())
    code, err = run_cli(capsys, tmp_path, "data.source=jsonl", f"data.path={path}")
    assert code == 2
    message = one_line(err)
    assert f"{path}:3: bad JSON at column {json_column(line)} " in message
    assert "data.on_bad_line=skip" in message


def test_missing_field_names_the_key_and_the_fields_the_line_has(capsys, tmp_path):
    path = jsonl_file(tmp_path / "fields.jsonl", b'{"prompt": "q", "answer": 1}', at=2)
    code, err = run_cli(capsys, tmp_path, "data.source=jsonl", f"data.path={path}")
    assert code == 2
    message = one_line(err)
    assert f"{path}:2: missing field 'question' (data.prompt_field)" in message
    assert "'prompt'" in message and "set data.prompt_field" in message


def test_non_utf8_file_names_line_and_character_column(capsys, tmp_path):
    line = '{"question": "Ça fait combien, 1+1?", "answer": 2}'
    path = jsonl_file(tmp_path / "latin1.jsonl", line.encode("latin-1"), at=4)
    code, err = run_cli(capsys, tmp_path, "data.source=jsonl", f"data.path={path}")
    assert code == 2
    message = one_line(err)
    column = line.index("Ç") + 1  # 1-based, as editors count (UnicodeDecodeError.start is 0-based)
    assert f"{path}:4: not valid UTF-8 at column {column} " in message and "iconv" in message


def test_utf8_column_counts_characters_not_bytes(tmp_path):
    from lightning_opd.data.tasks import json_line

    before = '{"q": "日本 '  # 10 characters, 14 bytes (two 3-byte characters)
    raw = before.encode() + b'\xff"}'
    with pytest.raises(DataError, match=rf"x\.jsonl:7: not valid UTF-8 at column {len(before) + 1} "):
        json_line(tmp_path / "x.jsonl", 7, raw)


def test_byte_order_mark_is_not_an_error(tmp_path):
    from lightning_opd.config import DataConfig
    from lightning_opd.data import build_task

    path = tmp_path / "bom.jsonl"
    path.write_text("\n".join([GOOD] * 4) + "\n", encoding="utf-8-sig")
    assert len(build_task(DataConfig(source="jsonl", path=str(path), val_size=4)).validation_set()) == 4


@pytest.mark.parametrize("key", ["data.path", "data.val_path"])
def test_empty_file_says_so_naming_the_key(capsys, tmp_path, key):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    good = jsonl_file(tmp_path / "good.jsonl", GOOD.encode())
    files = {"data.path": good, "data.val_path": good, key: empty}
    code, err = run_cli(capsys, tmp_path, "data.source=jsonl", *(f"{k}={v}" for k, v in files.items()))
    assert code == 2
    assert one_line(err) == f"lightning-opd: {empty}: the file is empty ({key}); give a JSONL file with one JSON object per line"


def test_train_from_python_raises_the_data_error(tmp_path):
    path = jsonl_file(tmp_path / "bad.jsonl", b"{oops")
    cfg = load(overrides=["data.source=jsonl", f"data.path={path}", "data.val_size=3", "trainer.accelerator=cpu",
                          f"run.output_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    with pytest.raises(DataError, match=f"{path}:3: bad JSON at column 2 "):
        train(cfg)


def test_worker_errors_keep_their_one_line_message(tmp_path):
    """torch re-raises a DataLoader worker's exception with the traceback in its message; the
    user still gets the original line (errors.UserError unwraps it)."""
    from lightning_opd.config import DataConfig
    from lightning_opd.data import PromptDataModule

    train_file = jsonl_file(tmp_path / "train.jsonl", b"[1, 2]", at=5, lines=8)
    val_file = jsonl_file(tmp_path / "val.jsonl", GOOD.encode())
    dm = PromptDataModule(DataConfig(source="jsonl", path=str(train_file), val_path=str(val_file), val_size=2,
                                     batch_size=2, num_workers=2), repeat=False)  # fmt: skip
    with pytest.raises(DataError) as err:
        list(dm.train_dataloader())
    assert str(err.value).startswith(f"{train_file}:5: expected a JSON object") and "\n" not in str(err.value)


# ----------------------------------------------------------------------- models, tokenizers


def test_folder_without_a_tokenizer_names_the_folder_key_and_fix(capsys, tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    code, err = run_cli(capsys, tmp_path, f"student.path={folder}")
    assert code == 2
    message = one_line(err)
    assert f"tokenizer of model '{folder}' (student.path): the folder has no tokenizer files" in message
    assert "save_pretrained" in message


def test_folder_without_config_or_weights_is_not_a_model(capsys, tmp_path, split_tokenizer):
    folder = tmp_path / "tokenizer-only"
    split_tokenizer.save_pretrained(folder)  # a tokenizer, but no config.json and no weights
    code, err = run_cli(capsys, tmp_path, f"student.path={folder}", f"teacher.path={folder}")
    assert code == 2
    message = one_line(err)
    assert f"model '{folder}' (teacher.path): the folder has no config.json and no weights" in message
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.load_model(ModelConfig(path=str(folder)))


def test_missing_tokenizer_file_names_the_key(capsys, tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    code, err = run_cli(capsys, tmp_path, f"student.tokenizer.source={missing}")
    assert code == 2
    assert f"tokenizer '{missing}' (student.tokenizer.source): no such file" in one_line(err)


def test_corrupt_tokenizer_file_is_one_line(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ not a tokenizer")
    from lightning_opd.config import TokenizerConfig

    with pytest.raises(ModelLoadError, match="not a readable tokenizer file"):
        models.load_tokenizer(TokenizerConfig(source=str(bad)))


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "no connection"])
def test_hub_id_while_offline_fails_fast_naming_the_id_and_a_local_folder(capsys, tmp_path, monkeypatch, how):
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(models, "_hub_connection", lambda: "huggingface.co:443 cannot be reached: test")
    start = time.perf_counter()
    code, err = run_cli(capsys, tmp_path, "student.path=nobody/unknown-model-xyz")
    assert code == 2
    assert time.perf_counter() - start < 15  # transformers' own retries take about a minute
    message = one_line(err)
    assert "'nobody/unknown-model-xyz' (student.path)" in message
    assert "huggingface-cli download nobody/unknown-model-xyz" in message and "save_pretrained" in message
    assert (how if how == "HF_HUB_OFFLINE" else "cannot be reached") in message


def test_hub_check_honours_offline_mode_and_tries_one_connection(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_unreachable() == "HF_HUB_OFFLINE is set"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    models._hub_connection.cache_clear()
    try:
        start = time.perf_counter()
        assert "127.0.0.1:9" in (models.hub_unreachable() or "")
        assert time.perf_counter() - start <= models.HUB_CHECK_TIMEOUT_S + 1
    finally:
        models._hub_connection.cache_clear()


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64)}, "global_step": 1}, path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a checkpoint"])
def test_corrupt_checkpoint_stops_at_config_time_naming_the_key(capsys, tmp_path, checkpoint, damage):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "not a checkpoint": b"hello"}[damage])
    with pytest.raises(CheckpointError) as err:
        load(overrides=[f"run.resume_from={checkpoint}"])
    assert isinstance(err.value, ConfigError) and isinstance(err.value, UserError)
    code, stderr = run_cli(capsys, tmp_path, f"run.resume_from={checkpoint}")
    assert code == 2
    message = one_line(stderr)
    assert f"run.resume_from='{checkpoint}'" in message and "drop run.resume_from" in message
    assert not (tmp_path / "runs").exists()  # stopped before any work


def test_missing_checkpoint_is_the_same_kind_of_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(overrides=[f"run.resume_from={tmp_path / 'absent.ckpt'}"])


def test_a_whole_checkpoint_is_accepted(checkpoint):
    assert load(overrides=[f"run.resume_from={checkpoint}"]).run.resume_from == str(checkpoint)
