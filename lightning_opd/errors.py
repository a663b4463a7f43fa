"""Errors that a user can act on, apart from config errors (`config.ConfigError`): models and
tokenizers that cannot be found, and a training run stopped by Ctrl-C. Their own module, with no
heavy imports, so that `models`, `fixtures`, `train` and the command line all use them without
importing each other."""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found; the message says what was looked for."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after `train` saved what it could and printed `message` (one line:
    where the checkpoint is and how to resume). `checkpoint` is None when nothing was saved.
    A KeyboardInterrupt, so that callers that let Ctrl-C through (ablate) still stop."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.message, self.checkpoint = message, checkpoint
