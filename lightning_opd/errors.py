"""Errors that a user can act on: a bad config value, a checkpoint that cannot be read, a data file
that cannot be parsed, a model or tokenizer that cannot be found, and a training run stopped by
Ctrl-C. Their own module, with no heavy imports, so that `config`, `data`, `models`, `fixtures`,
`train` and the command line all use them without importing each other.

Every `UserError` carries a one-line message that names what is wrong (the file and line, the
config key, the model id) and how to fix it; the command line prints it as
`lightning-opd: <message>` and exits with code 2, and library callers (`train(cfg)` from Python,
the tests) get the exception itself.
"""

from __future__ import annotations

import re
from pathlib import Path

# How torch re-raises an exception from a DataLoader worker process: a new exception of the same
# class whose message is "Caught <Class> in DataLoader worker process <n>.\nOriginal Traceback
# ...\n<module>.<Class>: <the original message>" (torch._utils.ExceptionWrapper.reraise).
_WORKER_PREFIX = "Caught "
_WORKER_TRACEBACK = "\nOriginal Traceback"
_QUALIFIED_MESSAGE = re.compile(r"^[\w.]+: (?P<message>.*)$")


def _unwrap_worker_message(message: str) -> str:
    """The original one-line message of an error re-raised from a DataLoader worker, so that a
    user sees the same line with `data.num_workers` > 0 as without workers; other messages as
    they are."""
    if not (message.startswith(_WORKER_PREFIX) and _WORKER_TRACEBACK in message):
        return message
    last = next((line for line in reversed(message.splitlines()) if line.strip()), "")
    found = _QUALIFIED_MESSAGE.match(last)
    return found.group("message") if found else message


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the place and the fix."""

    def __init__(self, message: str = "") -> None:
        super().__init__(_unwrap_worker_message(str(message)))


class ConfigError(UserError, ValueError):
    """A config problem, with the key and the place it came from in the message.

    Defined here and re-exported by `lightning_opd.config` (where callers import it from)."""


class CheckpointError(ConfigError):
    """`run.resume_from` names no checkpoint, or one that cannot be read (truncated, not a
    checkpoint). A config error: the fix is a different value of that key."""


class DataError(UserError, ValueError):
    """Bad task input or settings; the message names the file and line, or the key.

    Re-exported by `lightning_opd.data` (where callers import it from)."""


class ModelLoadError(UserError, RuntimeError):
    """A model or tokenizer could not be found or read; the message says what was looked for,
    where, and what to give instead."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after `train` saved what it could and printed `message` (one line:
    where the checkpoint is and how to resume). `checkpoint` is None when nothing was saved.
    A KeyboardInterrupt, so that callers that let Ctrl-C through (ablate) still stop."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.message, self.checkpoint = message, checkpoint
