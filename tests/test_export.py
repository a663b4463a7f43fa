"""The distilled student as a model to take away: the end-of-run Hugging Face folder,
`lightning-opd export` from a checkpoint, and `lightning-opd eval` of a folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_opd.cli import main
from lightning_opd.cli.main import print_summary
from lightning_opd.config import load
from lightning_opd.export import PROBE_TEXT, auto_tokenizer_problem
from lightning_opd.models import render_prompt
from lightning_opd.train import train
from tests.test_train import ROOT, TINY, tiny_cfg

DEFAULT = str(ROOT / "configs" / "experiment" / "default.yaml")
TEXT = "What is 123+45? 3+5=8 #### 168"


def parity_of_text(response: str, answer: str, kind: str = "number") -> bool:
    """A stand-in answer check that depends on every character of the response and of the
    reference: a two-step tiny student answers nothing right (it writes the same newlines to
    every prompt), so the real check would give 0 on both sides and prove nothing; with this
    one, equal accuracies need the same held-out examples, in the same order, answered alike."""
    return (sum(map(ord, response)) + sum(map(ord, str(answer)))) % 2 == 0


class KeepModule(L.Callback):
    """Keeps the trained LightningModule, to compare its student with the written folder."""

    module: L.LightningModule | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.module = pl_module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny 2-step run of the default (the answer check replaced, see parity_of_text):
    (summary, trained module, output dir, cache dir)."""
    root = tmp_path_factory.mktemp("export")
    keep = KeepModule()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lightning_opd.metrics.is_correct", parity_of_text)
        summary = train(tiny_cfg(root / "runs", root / "cache", "run.name=run"), callbacks=[keep])
    return summary, keep.module, root / "runs", root / "cache"


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits.float()


def folder_contents(directory: Path) -> dict[str, object]:
    """Everything a folder says: tensors of the safetensors files, parsed JSON, other text."""
    contents: dict[str, object] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix == ".safetensors":
            contents[path.name] = load_file(path)
        elif path.suffix == ".json":
            contents[path.name] = json.loads(path.read_text())
        else:
            contents[path.name] = path.read_text()
    return contents


def assert_same_folder(a: Path, b: Path) -> None:
    first, second = folder_contents(a), folder_contents(b)
    assert sorted(first) == sorted(second)
    for name, value in first.items():
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            other = second[name]
            assert sorted(value) == sorted(other), name
            for key, tensor in value.items():
                assert tensor.dtype == other[key].dtype and torch.equal(tensor, other[key]), (name, key)
        else:
            assert value == second[name], name


def test_run_writes_a_student_folder_that_plain_transformers_loads(run):
    summary, module, _, _ = run
    student_dir = Path(summary["run_dir"]) / "student"
    assert summary["student_dir"] == str(student_dir)
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text())["student_dir"] == str(student_dir)

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    trained = module.student_tokenizer
    assert auto_tokenizer_problem(student_dir, trained) is None
    assert model.dtype == torch.float32  # student.dtype's default
    # the tokenizer the student was trained with: same ids, EOS, pad and chat template
    for text in (TEXT, PROBE_TEXT):
        assert tokenizer(text)["input_ids"] == trained(text)["input_ids"]
    assert (tokenizer.eos_token, tokenizer.pad_token) == (trained.eos_token, trained.pad_token)
    assert render_prompt(tokenizer, "What is 1+2?") == render_prompt(trained, "What is 1+2?")
    assert model.generation_config.eos_token_id == trained.eos_token_id
    assert model.generation_config.pad_token_id == trained.pad_token_id

    ids = trained(render_prompt(trained, "What is 123+45?") + "3+5=8", add_special_tokens=False)["input_ids"]
    assert torch.equal(logits(model, ids), logits(module.student, ids))  # the same float32 weights


def test_export_of_the_last_checkpoint_equals_the_end_of_run_folder(run, tmp_path, capsys):
    summary, _, _, _ = run
    out = tmp_path / "exported"
    assert main(["export", str(Path(summary["run_dir"]) / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert_same_folder(out, Path(summary["student_dir"]))
    # --overwrite replaces the folder whole: nothing of what was there stays
    (out / "model-00001-of-00002.safetensors").write_text("stale")
    assert main(["export", str(Path(summary["run_dir"]) / "checkpoints" / "last.ckpt"), "--out", str(out),
                 "--overwrite"]) == 0  # fmt: skip
    assert_same_folder(out, Path(summary["student_dir"]))


def test_export_in_another_dtype(run, tmp_path):
    summary, _, _, _ = run
    out = tmp_path / "bf16"
    ckpt = Path(summary["run_dir"]) / "checkpoints" / "last.ckpt"
    assert main(["export", str(ckpt), "--out", str(out), "student.dtype=bfloat16"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    weights = load_file(Path(summary["student_dir"]) / "model.safetensors")
    for name, tensor in load_file(out / "model.safetensors").items():
        assert torch.equal(tensor, weights[name].to(torch.bfloat16)), name


def test_eval_of_the_exported_folder_gives_the_runs_accuracy(run, tmp_path, capsys, monkeypatch):
    summary, _, runs, cache = run
    monkeypatch.setattr("lightning_opd.metrics.is_correct", parity_of_text)  # as during the run
    out = tmp_path / "exported"
    assert main(["export", str(Path(summary["run_dir"]) / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0

    def files() -> list[tuple[Path, int]]:  # every file, with its time of last change
        return sorted((p, p.stat().st_mtime_ns) for root in (tmp_path, runs, cache) for p in root.rglob("*"))

    before = files()
    capsys.readouterr()
    args = ["eval", str(out), str(Path(summary["run_dir"]) / "config.yaml")]  # the run's own config
    assert main(args) == 0
    printed = capsys.readouterr().out
    match = re.search(r"accuracy (\S+) \((\d+) of (\d+) held-out prompts", printed)
    assert match, printed
    accuracy, right, count = float(match[1]), int(match[2]), int(match[3])
    assert count == 4  # data.val_size of the tiny settings
    assert right == round(summary["student_accuracy_after"] * count)
    assert accuracy == pytest.approx(summary["student_accuracy_after"], abs=1e-4)
    assert files() == before  # it wrote nothing: not in the folder, the run, or the cache

    assert main([*args, "--limit", "2"]) == 0
    assert " of 2 held-out prompts" in capsys.readouterr().out


def test_export_refuses_a_bad_checkpoint_in_one_line(run, tmp_path, capsys):
    summary, _, _, _ = run
    out = str(tmp_path / "out")

    def refused(*args: str) -> str:
        capsys.readouterr()
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "checkpoint not found" in refused(str(tmp_path / "nope.ckpt"), "--out", out)

    # a corrupt file where a run's checkpoint would be, its config.yaml beside it
    run_dir = tmp_path / "torn"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(Path(summary["run_dir"]) / "config.yaml", run_dir / "config.yaml")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 not a checkpoint")
    assert "cannot read checkpoint" in refused(str(run_dir / "checkpoints" / "last.ckpt"), "--out", out)

    # a good checkpoint without the run's config.yaml
    alone = tmp_path / "alone" / "last.ckpt"
    alone.parent.mkdir()
    shutil.copy(Path(summary["run_dir"]) / "checkpoints" / "last.ckpt", alone)
    assert "no config.yaml" in refused(str(alone), "--out", out)

    # --out holding files is not overwritten unless asked
    assert "--overwrite" in refused(str(Path(summary["run_dir"]) / "checkpoints" / "last.ckpt"), "--out",
                                    summary["run_dir"])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_eval_of_a_missing_folder_exits_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a Hugging Face model folder" in err


def test_printed_summary_names_the_student_folder(capsys):
    print_summary({"experiment": "default", "run_dir": "runs/x", "steps": 2, "student_dir": "runs/x/student"})
    assert "runs/x/student" in capsys.readouterr().out


def test_a_qwen2_student_warns_that_autotokenizer_changes_its_tokenizer(tmp_path, capsys, monkeypatch):
    """transformers forces Qwen2Tokenizer on a qwen2 folder, which re-splits a tokenizer trained
    here: the run says so, and `eval` scores with the folder's tokenizer.json as it is."""
    monkeypatch.setattr("lightning_opd.metrics.is_correct", parity_of_text)
    with pytest.warns(UserWarning, match="AutoTokenizer loads it as Qwen2Tokenizer"):
        summary = train(tiny_cfg(tmp_path / "runs", tmp_path / "cache", "run.name=qwen", "trainer.max_steps=1",
                                 "student.tiny.arch=qwen2"))  # fmt: skip
    capsys.readouterr()
    assert main(["eval", summary["student_dir"], DEFAULT, *TINY]) == 0
    captured = capsys.readouterr()
    assert "evaluating with tokenizer.json as it is" in captured.err
    right = int(re.search(r"\((\d+) of 4 held-out", captured.out)[1])
    assert right == round(summary["student_accuracy_after"] * 4)


def test_a_student_given_by_path_round_trips(tmp_path, split_tokenizer, tiny_llama):
    """A student from a local HF folder (`student.path`, its own tokenizer): the end-of-run folder
    and the export, which builds the architecture from the path's config.json, agree."""
    folder = tmp_path / "mine"
    tiny_llama(split_tokenizer).save_pretrained(folder)
    split_tokenizer.save_pretrained(folder)
    summary = train(load(overrides=[
        f"student.path={folder}", f"teacher.path={folder}", "data.batch_size=2", "data.val_size=2",
        "rollout.max_new_tokens=8", "trainer.max_steps=1", "trainer.progress_bar=false",
        "trainer.accelerator=cpu", f"run.output_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'cache'}",
        "run.name=mine",
    ]))  # fmt: skip
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "runs" / "mine" / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    assert_same_folder(out, Path(summary["student_dir"]))
    trained = load_file(Path(summary["student_dir"]) / "model.safetensors")
    assert any(not torch.equal(t, load_file(folder / "model.safetensors")[k]) for k, t in trained.items())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_run_writes_the_student_once_and_export_reads_its_checkpoint(tmp_path, strategy):
    from tests.test_distributed import two_process_run

    # fsdp: rank 0 writes the gathered shards; activation checkpointing wraps every decoder
    # layer, and its names must not reach the folder
    extra = ["trainer.activation_checkpointing=true"] if strategy == "fsdp" else []
    run_dir = two_process_run(tmp_path, strategy, "trainer.max_steps=1", *extra)
    student_dir = run_dir / "student"
    assert AutoModelForCausalLM.from_pretrained(student_dir).num_parameters() > 0
    assert not list(run_dir.glob("student.*"))  # no partial or old folder left by either rank
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() == (strategy == "fsdp")  # fsdp: torch.distributed.checkpoint shards
    out = tmp_path / "exported"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    assert_same_folder(out, student_dir)
