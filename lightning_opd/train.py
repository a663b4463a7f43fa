"""`train(cfg) -> summary`: the whole experiment as one function, callable from tests.

prepare (tokenizers, teacher SFT, student warm start; cached) -> OPDModule -> Lightning
Trainer.fit -> summary.json. The run directory holds the resolved config (`config.yaml`),
the logged metrics (`metrics.csv`), checkpoints, `summary.json`, and the distilled student as a
plain Hugging Face folder (`student/`, export.py) that loads without this package.

Ctrl-C during training saves `checkpoints/last.ckpt` as of the last finished step
(`SaveOnInterrupt`), prints one line saying how to resume, and raises `TrainingInterrupted`
(the CLI exits 130).
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import CustomBarColumn
from rich.progress import ProgressColumn, TextColumn
from rich.text import Text

from lightning_opd.config import Config, ConfigError, save
from lightning_opd.data import PromptDataModule
from lightning_opd.errors import TrainingInterrupted
from lightning_opd.evaluation import evaluate_accuracy
from lightning_opd.export import save_student
from lightning_opd.module import OPDModule, rng_state, set_rng_state
from lightning_opd.output import ProgressLines, clock, eta_seconds, quiet_library_noise
from lightning_opd.prepare import prepare
from lightning_opd.rollout.sandbox import refusal as sandbox_refusal

SUMMARY_KEYS = ("student_accuracy_before", "student_accuracy_after", "teacher_accuracy", "coverage",
                "aligner", "steps", "seconds")  # fmt: skip


def run_directory(cfg: Config) -> Path:
    name = cfg.run.name or f"{cfg.experiment}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.run.output_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_logger(cfg: Config, run_dir: Path):
    from lightning.pytorch import loggers

    if cfg.run.logger == "tensorboard":
        return loggers.TensorBoardLogger(save_dir=str(run_dir), name="", version="")
    if cfg.run.logger == "wandb":
        return loggers.WandbLogger(save_dir=str(run_dir), name=run_dir.name, project="lightning_opd")
    return loggers.CSVLogger(save_dir=str(run_dir), name="", version="")


class StepTimeColumn(ProgressColumn):
    """'elapsed • ETA • rate' of the training task, the ETA at the mean rate of this fit's steps
    (rich's own estimate looks back 30 s only: no ETA at all when a step takes longer)."""

    max_refresh = 0.5  # as Lightning's time column: no jitter

    def __init__(self, bar: StepProgressBar) -> None:
        self.bar = bar
        super().__init__()

    def render(self, task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        done = int(task.completed) - self.bar.first_step
        eta = eta_seconds(elapsed or 0.0, int(task.completed), int(task.total or 0), self.bar.first_step)
        rate = ""
        if done > 0 and elapsed:
            per_step = elapsed / done
            rate = f" • {per_step:.2f} s/step" if per_step >= 1 else f" • {1 / per_step:.2f} steps/s"
        text = f"{clock(elapsed or 0.0)} • ETA {clock(eta) if eta is not None else '-:--:--'}{rate}"
        return Text(text, style=self.bar.theme.time)


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar counting optimizer steps of `trainer.max_steps` ("step 12/200", elapsed,
    ETA, time per step) instead of the batches of an epoch: the prompt stream is endless
    (max_epochs=-1), where the stock bar reads "Epoch 0/-2". A resumed run's bar starts at the
    checkpoint's step. Where the output is no terminal (a log file), rich draws only the final
    bar: a plain progress line is printed after the first step and every `line_every_s` seconds."""

    def __init__(self, *args: Any, line_every_s: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first_step = 0  # global step when this fit's steps began (a resumed run's checkpoint)
        self.line_every_s = line_every_s
        self._lines: ProgressLines | None = None

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        total = self.total_train_batches
        return f"step {self.trainer.global_step}/{total if total != float('inf') else '--'}"

    def configure_columns(self, trainer: L.Trainer) -> list:
        return [
            TextColumn("[progress.description]{task.description}"),
            CustomBarColumn(complete_style=self.theme.progress_bar, finished_style=self.theme.progress_bar_finished,
                            pulse_style=self.theme.progress_bar_pulse, bar_width=30),  # fmt: skip
            StepTimeColumn(self),
        ]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_step = int(trainer.global_step)
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_step(trainer)  # a resumed run starts at its checkpoint's step
        total = self.total_train_batches
        if self.is_enabled and self._console is not None and not self._console.is_terminal and math.isfinite(total):
            self._lines = ProgressLines("step", int(total), every_s=self.line_every_s, start=self.first_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # as RichProgressBar's, with the step in place of the batch index
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # a run resumed mid-epoch
        self._show_step(trainer)
        self._update_metrics(trainer, pl_module)
        self.refresh()
        if self._lines is not None:
            self._lines.update(int(trainer.global_step), extra=self._metrics_text(trainer, pl_module),
                               force=trainer.global_step == self.first_step + 1)  # fmt: skip

    def _show_step(self, trainer: L.Trainer) -> None:
        if self.progress is None or self.train_progress_bar_id is None or self.is_disabled:
            return
        description = self._get_train_description(trainer.current_epoch)
        if self.theme.description:
            description = f"[{self.theme.description}]{description}"
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, description=description)
        self.refresh()

    def _metrics_text(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        metrics = self.get_metrics(trainer, pl_module)
        return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def build_trainer(cfg: Config, run_dir: Path, extra_callbacks: list | None = None) -> L.Trainer:
    from lightning_opd.strategy import build_strategy

    t = cfg.trainer
    callbacks = [ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True,
                                 every_n_train_steps=t.checkpoint_every_n_steps or None)]  # fmt: skip
    if t.progress_bar:
        callbacks.append(StepProgressBar(leave=True))
    callbacks += list(extra_callbacks or [])
    return L.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        precision=t.precision,
        logger=build_logger(cfg, run_dir),
        callbacks=callbacks,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=cfg.optim.grad_clip or None,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )


class SaveOnInterrupt(Callback):
    """On Ctrl-C during fit, saves the state of the last finished step to `path`.

    Lightning catches the KeyboardInterrupt, calls `on_exception`, tears down and exits with code
    1; `train` turns that exit into `TrainingInterrupted`. A step cut off before its optimizer
    update is dropped, so that the resumed run takes it again exactly as an uninterrupted run
    would: the datamodule's batch count and the RNG go back to their values at the end of the
    last finished step (kept at each step end), and the loop's counters back to that step's end.
    Nothing is saved when the cut falls inside the optimizer update (the weights may be half
    changed), before any step of this call finished, or with several processes (another rank
    may sit in a collective that never completes, and saving would hang)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.interrupted = False  # a KeyboardInterrupt reached on_exception
        self.saved: Path | None = None
        self.reason = ""  # why nothing was saved
        self._step_end: tuple[int, int | None, dict] | None = None  # (global step, batches consumed, RNG)
        self._updating = False  # between the backward pass and the end of the optimizer step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._updating = False
        consumed = getattr(trainer.datamodule, "batches_consumed", None)
        self._step_end = (trainer.global_step, consumed, rng_state())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._updating = True  # the closure (rollout, loss, backward) is done; the weights change next

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            return
        self.interrupted = True
        if trainer.world_size > 1:
            self.reason = f"no checkpoint is saved on Ctrl-C with {trainer.world_size} processes"
            return
        if self._step_end is None:
            self.reason = "no step of this run had finished"
            return
        step, consumed, rng = self._step_end
        if trainer.global_step == step:  # the current step's update has not happened
            if self._updating:
                self.reason = "the interrupt came during the optimizer update (weights may be half-updated)"
                return
            if consumed is not None:
                trainer.datamodule.batches_consumed = consumed  # the cut-off batch is trained on resume
            set_rng_state(rng)  # OPDModule.on_save_checkpoint saves the RNG as it is now
            for progress in (trainer.fit_loop.epoch_loop.batch_progress.total,
                             trainer.fit_loop.epoch_loop.batch_progress.current):  # fmt: skip
                # as at the end of the last finished step: Lightning then restarts with the next batch
                progress.ready = progress.started = progress.processed = progress.completed
        # else the step's update is done (the interrupt came while its hooks ran): save it as it is
        trainer.save_checkpoint(self.path, weights_only=False)  # all of it: optimizer, loops, data
        self.saved = self.path


def _interrupted(cfg: Config, run_dir: Path, trainer: L.Trainer, saver: SaveOnInterrupt) -> TrainingInterrupted:
    """The one line printed (rank 0) after Ctrl-C, as an exception to raise."""
    step = int(trainer.global_step)
    if saver.saved is not None:
        message = (f"interrupted after {step} finished step(s): saved {saver.saved}; to resume, run the same "
                   f"command with run.name={run_dir.name} run.resume_from={saver.saved}")  # fmt: skip
    elif cfg.run.resume_from:
        message = (f"interrupted ({saver.reason}): nothing new saved; to resume, run the same command again "
                   f"(run.resume_from={cfg.run.resume_from})")  # fmt: skip
    else:
        periodic = run_dir / "checkpoints" / "last.ckpt"
        where = (f"to resume from the last periodic checkpoint, run the same command with run.name={run_dir.name} "
                 f"run.resume_from={periodic}") if periodic.exists() else "run the command again to start over"  # fmt: skip
        message = f"interrupted ({saver.reason}): nothing saved; {where}"
    if trainer.is_global_zero:
        print(f"lightning-opd: {message}", file=sys.stderr, flush=True)
    return TrainingInterrupted(message, saver.saved)


def preflight(cfg: Config) -> None:
    """Checks of the machine (not of the config) that would otherwise fail after preparation.

    Not in `config.validate`: that also runs for `lightning-opd config` and for loading the GPU
    paper configs on a CPU machine, where a missing GPU is no error."""
    if cfg.tools.enabled and (refused := sandbox_refusal(cfg.tools.sandbox.allow_unsandboxed)):
        raise ConfigError(f"tools.enabled=true: {refused}")
    if cfg.trainer.accelerator == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator=gpu, but no CUDA GPU is visible to torch; "
                              "use trainer.accelerator=cpu (or auto)")  # fmt: skip
        devices = cfg.trainer.devices
        if isinstance(devices, int) and devices > torch.cuda.device_count():
            raise ConfigError(f"trainer.devices={devices}, but this machine has {torch.cuda.device_count()} "
                              f"CUDA GPU(s); set trainer.devices to at most that")  # fmt: skip


def _restore_sigint(handler: Any) -> None:
    """Lightning ignores SIGINT after catching a KeyboardInterrupt (so a second Ctrl-C cannot cut
    its shutdown short); give the caller's handler back."""
    try:
        signal.signal(signal.SIGINT, handler)
    except (ValueError, TypeError):  # not the main thread, or a handler Python did not install
        pass


def quiet_expected_directory_warnings(run_dir: Path, resuming: bool) -> None:
    """Ignore (inside the caller's `warnings.catch_warnings`) Lightning's "directory exists and is
    not empty" warnings where they are false for this run.

    The CSV logger writes into the run directory itself, which already holds config.yaml (written
    before the minutes of preparation): it warns that previous log files will be deleted, while the
    only one it deletes is metrics.csv. So its warning holds only when metrics.csv is there and
    the run does not resume (a resumed run merges the earlier rows back, `_merge_metrics`). The
    checkpoint directory exists only in a run directory used before; a resumed run continues
    its checkpoints on purpose (or starts a new directory: no best-k state is lost, as only the
    last checkpoint is kept). A new run into a used run directory keeps both warnings."""
    if resuming or not (run_dir / "metrics.csv").exists():
        warnings.filterwarnings("ignore", message=f"Experiment logs directory {re.escape(str(run_dir))}")
    if resuming:
        checkpoints = re.escape(str(run_dir / "checkpoints"))
        warnings.filterwarnings("ignore", message=f"Checkpoint directory {checkpoints}/? exists and is not empty")
        # resumed into another run directory: the checkpoint keeps no best-k state to reload
        warnings.filterwarnings("ignore", message=f"The dirpath has changed from .* to '{checkpoints}'")


def train(cfg: Config, callbacks: list | None = None) -> dict:
    """Run one experiment; returns the summary (also written to <run_dir>/summary.json).

    `callbacks` are extra Lightning callbacks (tests use one to stop a run part-way). Ctrl-C
    during training raises `TrainingInterrupted`, after saving the last finished step. The
    libraries' messages that say nothing to a user are kept off the terminal
    (`output.quiet_library_noise`), and so are the false "directory not empty" warnings.
    """
    with quiet_library_noise():
        return _train(cfg, callbacks)


def _train(cfg: Config, callbacks: list | None) -> dict:
    start = time.time()
    preflight(cfg)  # before minutes of preparation
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    run_dir = run_directory(cfg)
    quiet_expected_directory_warnings(run_dir, resuming=bool(cfg.run.resume_from))
    save(cfg, run_dir / "config.yaml")

    datamodule = PromptDataModule(cfg.data)
    prepared = prepare(cfg, datamodule.task)
    module = OPDModule(cfg, prepared.student, prepared.teacher, prepared.student_tokenizer,
                       prepared.teacher_tokenizer, datamodule.task)  # fmt: skip
    module.run_dir = run_dir
    teacher_accuracy = prepared.info.get("teacher_accuracy")
    if teacher_accuracy is None:
        teacher_accuracy = evaluate_accuracy(prepared.teacher, prepared.teacher_tokenizer,
                                             datamodule.val_examples(), datamodule.task,
                                             max_new_tokens=cfg.rollout.max_new_tokens, tools=cfg.tools)  # fmt: skip

    # seed again: preparation consumes randomness only when it trains (a cache miss), and a run
    # must not depend on whether its teacher was cached
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    # Lightning's CSVLogger starts metrics.csv afresh: keep the rows of the interrupted part
    earlier_metrics = _read_metrics(run_dir) if cfg.run.resume_from else []
    saver = SaveOnInterrupt(run_dir / "checkpoints" / "last.ckpt")
    trainer = build_trainer(cfg, run_dir, [*(callbacks or []), saver])
    train_start = time.time()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.run.resume_from)
    except SystemExit:  # how Lightning ends a fit that a KeyboardInterrupt stopped
        if not saver.interrupted:
            raise
        if earlier_metrics and trainer.is_global_zero:  # a resumed part: keep the earlier parts' rows
            _merge_metrics(run_dir, earlier_metrics)
        raise _interrupted(cfg, run_dir, trainer, saver) from None
    finally:
        _restore_sigint(sigint)
    train_seconds = time.time() - train_start
    if earlier_metrics and trainer.is_global_zero:
        _merge_metrics(run_dir, earlier_metrics)
    # the model to take away: a plain HF folder (every rank calls it: FSDP gathers the shards)
    student_dir = save_student(module.student, module.student_tokenizer, cfg, run_dir / "student",
                               is_global_zero=trainer.is_global_zero)  # fmt: skip
    history = module.accuracy_history
    metrics = _read_metrics(run_dir)
    summary = {
        "experiment": cfg.experiment,
        "aligner": cfg.aligner.name,
        "student_accuracy_before": history[0][1] if history else None,
        "student_accuracy_after": history[-1][1] if history else None,
        "teacher_accuracy": teacher_accuracy,
        "coverage": _mean(_column(metrics, "train/coverage")),
        "final_loss": None,
        "steps": int(trainer.global_step),
        "seconds": time.time() - start,
        "train_seconds": train_seconds,
        # steps trained by this call (a resumed run counts only its own), per second of fit
        "steps_per_second": _rate(trainer.global_step - module.start_step, train_seconds),
        "bad_lines": datamodule.bad_lines,
        "skipped_prompts": module.skipped_prompts,
        "accuracy_history": history,
        "run_dir": str(run_dir),
        "student_dir": str(student_dir),  # AutoModelForCausalLM / AutoTokenizer.from_pretrained(it)
        "global_rank": int(trainer.global_rank),
        "world_size": int(trainer.world_size),
        **{f"prepare/{k}": v for k, v in prepared.info.items()},
    }
    if cfg.tools.enabled:  # means over the training steps' rollouts
        summary["tool_calls"] = _mean(_column(metrics, "train/tool_calls"))
        summary["tool_success_rate"] = _mean(_column(metrics, "train/tool_success_rate"))
    losses_logged = _column(metrics, "train/loss")
    summary["final_loss"] = losses_logged[-1] if losses_logged else None
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_rank_record(run_dir, trainer.global_rank, module)
    return summary


def parameter_checksum(model) -> float:
    """A position-weighted sum of all parameters (gathered when sharded): equal across ranks
    exactly when they hold the same parameters."""
    import torch

    total = 0.0
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            weights = torch.linspace(1.0, 2.0, full.numel(), dtype=torch.float64, device=full.device)
            total += (i + 1) * float((full.detach().double().flatten() * weights).sum())
    return total


def write_rank_record(run_dir: Path, rank: int, module: OPDModule) -> None:
    """ranks/rank<r>.json: this rank's parameter checksum and the prompts it trained on."""
    record = {"rank": rank, "param_checksum": parameter_checksum(module.student), "prompt_uids": module.seen_uids}
    (run_dir / "ranks").mkdir(exist_ok=True)
    (run_dir / "ranks" / f"rank{rank}.json").write_text(json.dumps(record))


def _rate(steps: int, seconds: float) -> float | None:
    return steps / seconds if steps > 0 and seconds > 0 else None


def _read_metrics(run_dir: Path) -> list[dict]:
    import csv

    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _merge_metrics(run_dir: Path, earlier: list[dict]) -> None:
    """metrics.csv = the earlier rows before the first step this call logged + this call's rows
    (steps after the checkpoint that the interrupted part had logged are trained again)."""
    import csv

    later = _read_metrics(run_dir)
    first_new = min((int(r["step"]) for r in later if r.get("step")), default=None)
    rows = [r for r in earlier if r.get("step") and (first_new is None or int(r["step"]) < first_new)] + later
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _column(metrics: list[dict], column: str) -> list[float]:
    """One logged metric's values, in step order, from the rows of metrics.csv."""
    return [float(r[column]) for r in metrics if r.get(column) not in (None, "")]
