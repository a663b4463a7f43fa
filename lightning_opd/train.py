"""`train(cfg) -> summary`: the whole experiment as one function, callable from tests.

prepare (tokenizers, teacher SFT, student warm start; cached) -> OPDModule -> Lightning
Trainer.fit -> summary.json. The run directory holds the resolved config (`config.yaml`),
the logged metrics (`metrics.csv`), checkpoints and `summary.json`.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from lightning_opd.config import Config, ConfigError, save
from lightning_opd.data import PromptDataModule
from lightning_opd.evaluation import evaluate_accuracy
from lightning_opd.module import OPDModule
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


def build_trainer(cfg: Config, run_dir: Path, extra_callbacks: list | None = None) -> L.Trainer:
    from lightning_opd.strategy import build_strategy

    t = cfg.trainer
    callbacks = [ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True,
                                 every_n_train_steps=t.checkpoint_every_n_steps or None)]  # fmt: skip
    if t.progress_bar:
        callbacks.append(RichProgressBar(leave=True))
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


def train(cfg: Config, callbacks: list | None = None) -> dict:
    """Run one experiment; returns the summary (also written to <run_dir>/summary.json).

    `callbacks` are extra Lightning callbacks (tests use one to stop a run part-way).
    """
    start = time.time()
    if cfg.tools.enabled and (refused := sandbox_refusal(cfg.tools.sandbox.allow_unsandboxed)):
        raise ConfigError(f"tools.enabled=true: {refused}")  # before minutes of preparation
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    run_dir = run_directory(cfg)
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
    trainer = build_trainer(cfg, run_dir, callbacks)
    train_start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.run.resume_from)
    train_seconds = time.time() - train_start
    if earlier_metrics and trainer.is_global_zero:
        _merge_metrics(run_dir, earlier_metrics)
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
    return list(csv.DictReader(path.open())) if path.is_file() else []


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
