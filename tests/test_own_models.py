"""Distilling your own models: a `path` brings its own tokenizer and is used as it is (no SFT)
unless the user says otherwise; a local folder of tiny random HF models trains one step."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_opd.cli import main
from lightning_opd.config import load
from lightning_opd.train import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def model_folders(tmp_path, split_tokenizer, merge_tokenizer, tiny_llama) -> tuple[Path, Path]:
    """(student, teacher): tiny random Llama / Qwen2 models with their tokenizers, saved as HF
    folders, with different vocabularies (the student splits digit runs, the teacher merges them)."""
    folders = []
    for name, tokenizer, arch in (("student", split_tokenizer, "llama"), ("teacher", merge_tokenizer, "qwen2")):
        folder = tmp_path / name
        tiny_llama(tokenizer, arch=arch).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


def test_a_model_path_means_its_own_tokenizer_and_no_sft(model_folders):
    student, teacher = model_folders
    cfg = load(overrides=[f"student.path={student}", f"teacher.path={teacher}"])
    for role in ("student", "teacher"):
        assert getattr(cfg, role).tokenizer.source == "model", role
        assert getattr(cfg, role).sft.steps == 0, role


def test_without_a_path_the_tiny_defaults_stay():
    cfg = load(overrides=["teacher.path=Org/teacher"])
    assert (cfg.student.tokenizer.source, cfg.student.sft.steps) == ("train", 250)
    assert (cfg.teacher.tokenizer.source, cfg.teacher.sft.steps) == ("model", 0)


def test_keys_set_in_an_experiment_file_or_on_the_command_line_win(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("student:\n  path: Org/student\n  sft: {steps: 5}\n")
    cfg = load(exp, overrides=["teacher.path=Org/teacher", "teacher.tokenizer.source=fixture:gpt2"])
    assert (cfg.student.tokenizer.source, cfg.student.sft.steps) == ("model", 5)
    assert (cfg.teacher.tokenizer.source, cfg.teacher.sft.steps) == ("fixture:gpt2", 0)
    # a path cleared on the command line leaves the tiny model's defaults
    cfg = load(exp, overrides=["student.path=null"])
    assert (cfg.student.tokenizer.source, cfg.student.sft.steps) == ("train", 5)


def test_a_path_with_an_explicitly_trained_tokenizer_is_refused_naming_the_fix(capsys):
    code = main(["config", "student.path=Org/student", "student.tokenizer.source=train"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "student.tokenizer.source=train" in err and "student.tokenizer.source=model" in err


def test_every_paper_config_names_its_own_tokenizers_and_no_sft():
    for path in sorted((ROOT / "configs" / "experiment").glob("*.yaml")):
        cfg = load(path)
        for role in ("student", "teacher"):
            model = getattr(cfg, role)
            if model.path:
                assert (model.tokenizer.source, model.sft.steps) == ("model", 0), (path.stem, role)


def test_own_models_from_local_folders_train_one_step(tmp_path, model_folders):
    student, teacher = model_folders
    cfg = load(overrides=[
        f"student.path={student}", f"teacher.path={teacher}", "data.batch_size=2", "data.val_size=2",
        "rollout.max_new_tokens=8", "trainer.max_steps=1", "trainer.progress_bar=false",
        "trainer.accelerator=cpu", f"run.output_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'cache'}",
    ])  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == 1 and summary["final_loss"] is not None
    # loaded as they are: no tokenizer trained, no SFT'd copy cached
    assert not list((tmp_path / "cache").iterdir())
    assert "prepare/student_cache" not in summary and "prepare/teacher_cache" not in summary
