"""What a person reads during a run (issue #13): progress with an ETA for SFT, validation and the
training bar (step k/max_steps), and no library noise or false warnings in a fresh run."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import lightning as L
import pytest

from lightning_opd.config import DataConfig, SFTConfig, load
from lightning_opd.data import build_task
from lightning_opd.evaluation import evaluate_accuracy
from lightning_opd.output import Heartbeat, ProgressLines, clock, progress_text, quiet_library_noise
from lightning_opd.sft import supervised_finetune
from lightning_opd.train import train

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "student.tiny.hidden_size=32", "student.tiny.num_layers=1", "student.tiny.num_heads=2",
    "student.tiny.intermediate_size=64", "teacher.tiny.hidden_size=32", "teacher.tiny.num_layers=1",
    "teacher.tiny.num_heads=2", "teacher.tiny.intermediate_size=64",
    "student.sft.steps=2", "teacher.sft.steps=2", "student.sft.batch_size=8", "teacher.sft.batch_size=8",
    "data.batch_size=4", "data.val_size=4", "rollout.max_new_tokens=12", "trainer.max_steps=2",
    "trainer.accelerator=cpu",
]  # fmt: skip
TIME = r"\d+:\d\d:\d\d"
# what a fresh run must not show: library noise and the false "directory not empty" warnings
NOISE = ("exists and is not empty", "is deprecated", "in eval mode at the start of training", "Tip:",
         "TPU available", "litlogger", "generation flags", "Loading weights", "Writing model shards",
         "`Trainer.fit` stopped: `max_steps=")  # fmt: skip


def test_progress_text_reads_k_of_n_elapsed_and_eta():
    assert progress_text("sft step", 100, 600, 35.0, "loss 0.8123") == (
        "sft step 100/600  loss 0.8123  elapsed 0:00:35  ETA 0:02:55"
    )
    assert progress_text("validation", 0, 200, 12.0, unit="prompts") == (
        "validation 0/200 prompts  elapsed 0:00:12  ETA -:--:--"  # no rate yet
    )
    # a resumed run: 10 steps in 20 s after starting at step 50 -> 2 s a step for the 40 left
    assert progress_text("step", 60, 100, 20.0, start=50).endswith("ETA 0:01:20")
    assert clock(3 * 3600 + 62.9) == "3:01:02"


def test_sft_prints_step_loss_elapsed_and_eta(capsys, merge_tokenizer, tiny_llama):
    task = build_task(DataConfig(val_size=4))
    model = tiny_llama(merge_tokenizer)
    supervised_finetune(model, merge_tokenizer, task, SFTConfig(steps=2, batch_size=2), log_every=1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    for k, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"  sft step {k}/2  loss \d+\.\d{{4}}  elapsed {TIME}  ETA {TIME}", line), line
    supervised_finetune(model, merge_tokenizer, task, SFTConfig(steps=2, batch_size=2))  # every 100: silent
    assert capsys.readouterr().out == ""


def test_progress_lines_print_every_n_and_every_s(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    lines = ProgressLines("step", 10, every_n=5, every_s=10.0)
    printed = []
    for done in range(1, 11):
        now[0] += 4.0  # 4 s a unit: due at 5 and 10 (every_n) and 10 s after the last line (3, 8)
        if lines.update(done):
            printed.append(done)
    assert printed == [3, 5, 8, 10]
    assert capsys.readouterr().out.splitlines()[0] == "step 3/10  elapsed 0:00:12  ETA 0:00:28"


def test_validation_shows_progress_only_when_slow(capsys, merge_tokenizer, tiny_llama):
    # a job that lasts longer than every_s: a line each every_s, with what is done and the ETA
    with Heartbeat("validation", 8, every_s=0.05, unit="prompts") as beat:
        beat.done = 4
        time.sleep(0.3)
    out = capsys.readouterr().out.splitlines()
    assert out and all(re.fullmatch(rf"  validation 4/8 prompts  elapsed {TIME}  ETA {TIME}", x) for x in out), out
    # a quick validation (as in tests) prints nothing
    task = build_task(DataConfig(val_size=4))
    accuracy = evaluate_accuracy(tiny_llama(merge_tokenizer), merge_tokenizer, task.validation_set(), task,
                                 max_new_tokens=4, batch_size=2)  # fmt: skip
    assert 0.0 <= accuracy <= 1.0
    assert capsys.readouterr().out == ""


class Records(logging.Handler):
    """The messages logged at the loggers it is attached to that passed their filters."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def log_messages():
    """Messages of Lightning's info lines and of transformers' generation config notes (a filter
    on a logger acts before its handlers, so a dropped record never reaches this one)."""
    from lightning_utilities.core import rank_zero

    records = Records()
    loggers = {rank_zero.log, logging.getLogger("lightning.pytorch.utilities.rank_zero"),
               logging.getLogger("transformers.generation.configuration_utils")}  # fmt: skip
    for logger in loggers:
        logger.addHandler(records)
    yield records.messages
    for logger in loggers:
        logger.removeHandler(records)


class Descriptions(L.Callback):
    """The training bar's description after each step."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        bar = trainer.progress_bar_callback
        self.seen.append(str(bar.progress.tasks[bar.train_progress_bar_id].description))


def tiny_cfg(tmp_path: Path, *extra: str):
    overrides = [*TINY, f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'cache'}", "run.name=a", *extra]
    return load(ROOT / "configs" / "experiment" / "default.yaml", overrides=overrides)


def test_fresh_run_is_quiet_and_its_bar_counts_steps(tmp_path, capfd, recwarn, log_messages):
    probe = Descriptions()
    train(tiny_cfg(tmp_path, "trainer.progress_bar=true"), callbacks=[probe])
    assert probe.seen == ["step 1/2", "step 2/2"]
    out, err = capfd.readouterr()
    said = [str(w.message) for w in recwarn] + log_messages + (out + err).splitlines()
    for noise in NOISE:
        assert not [x for x in said if noise in x], (noise, said)
    assert "GPU available: False, used: False" in log_messages  # the useful banner line stays
    # without a terminal, a plain progress line (after the first step) stands in for the live bar
    assert re.search(rf"^step 1/2  train/loss \S+  train/coverage \S+  elapsed {TIME}  ETA {TIME}$", out, re.M), out

    # resumed into its own directory: the bar goes on from the checkpoint's step, and nothing warns
    # that the directories are not empty (the run continues them; metrics.csv rows are merged)
    recwarn.clear()
    probe = Descriptions()
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    train(tiny_cfg(tmp_path, "trainer.progress_bar=true", "trainer.max_steps=3", f"run.resume_from={ckpt}"),
          callbacks=[probe])  # fmt: skip
    assert probe.seen == ["step 3/3"]
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]

    # a new run into the used directory is told that its metrics.csv will be replaced
    recwarn.clear()
    train(tiny_cfg(tmp_path, "trainer.progress_bar=false"))
    assert any(str(w.message).startswith("Experiment logs directory") for w in recwarn)


def test_quiet_library_noise_filters_only_while_active(merge_tokenizer, tiny_llama, log_messages):
    from transformers.utils import logging as hf_logging

    from lightning_opd.config import RolloutConfig
    from lightning_opd.rollout.generate import generate

    model = tiny_llama(merge_tokenizer)
    model.generation_config.temperature = 0.7  # a sampling flag, as real models' generation configs set

    def greedy() -> None:
        logging.Logger.warning_once.cache_clear()  # transformers says it once per process
        generate(model, [merge_tokenizer("What is 12+34?")["input_ids"]], RolloutConfig(max_new_tokens=2),
                 eos_id=merge_tokenizer.eos_token_id, pad_id=merge_tokenizer.pad_token_id, greedy=True)  # fmt: skip

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    filters, hook = list(rank_zero.filters), getattr(hf_logging, "_tqdm_hook", None)
    with quiet_library_noise():
        greedy()
        rank_zero.info("💡 Tip: an advert")
        rank_zero.info("GPU available: False, used: False")
    assert log_messages == ["GPU available: False, used: False"]
    # everything is as before once the block is left
    assert rank_zero.filters == filters and getattr(hf_logging, "_tqdm_hook", None) is hook
    greedy()
    assert any("generation flags" in m for m in log_messages)
