"""Prompt data: tasks (what the prompts and rewards are) and the datamodule (how they stream).

`build_task(cfg)` picks a registered task by `data.source` (`arith` | `jsonl`, see
`tasks.py`); `PromptDataModule(cfg)` streams its examples in batches, sharded over ranks and
DataLoader workers, resumable from `state_dict()` (see `datamodule.py`). Importing this package
adds the `data.source` name check to `config.validate` (as `align` does for aligner names).
"""

from ..config import REGISTRY_CHECKS, Config, ConfigError
from .datamodule import Batch, PromptDataModule, PromptStream
from .tasks import (
    ARITH_OPS,
    TASKS,
    ArithTask,
    DataError,
    Example,
    JsonlTask,
    Task,
    build_task,
    register_task,
    split_reference,
)

__all__ = [
    "ARITH_OPS",
    "TASKS",
    "ArithTask",
    "Batch",
    "DataError",
    "Example",
    "JsonlTask",
    "PromptDataModule",
    "PromptStream",
    "Task",
    "build_task",
    "register_task",
    "split_reference",
]
from . import (
    chain_tool_task,  # noqa: F401,E402  (registers chain_tool)
    tool_task,  # noqa: F401,E402  (registers arith_tool)
)


def _check_task_name(cfg: Config) -> None:
    names = sorted(TASKS)
    if cfg.data.source not in names:
        raise ConfigError(f"data.source={cfg.data.source!r} is not a registered task; choose from {names}")


REGISTRY_CHECKS.append(_check_task_name)  # `config.validate` runs it, before any data is read
