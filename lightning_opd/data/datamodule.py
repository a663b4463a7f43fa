"""The LightningDataModule: prompt batches streamed from a task, sharded and resumable.

Sharding. Each (rank, DataLoader worker) pair reads its own shard of the task's stream:
shard = rank * W + worker, num_shards = world_size * W, with W = max(num_workers, 1). A shard
batches its own examples, so a batch never mixes shards.

Epochs. An unbounded task (arith) never ends. A finite one (a file) is one pass per shard;
with `repeat=True` (the default, for training under `max_steps`) a shard runs pass after
pass in the same order, batches running on across pass boundaries, so each pass still shows
every line exactly once. With `repeat=False` the iterator ends after one pass (the last
batch may be short), and the next `iter()` starts a new pass.

Resume. `state_dict()` holds the number of batches this rank has consumed. Ranks step
together, so rank 0's count (the one Lightning saves) holds for every rank. The DataLoader
deals batches round-robin over its workers, so after k batches worker j of the new loader
takes over the role (shard) of old worker (j + k) % W and skips that worker's share of the
k; the resumed sequence is then exactly the one the old run would have produced (same world
size and workers, and while every worker still has batches: always so with repeat=True).
"Consumed" means handed to the training step: under a Trainer (given `datamodule=` in
`fit`) the `on_before_batch_transfer` hook counts, since Lightning fetches a batch ahead;
without one, the loader counts what it yields.

Batches are `Batch` objects: lists of `Example` that also carry their shard and that shard's
count of skipped malformed lines, which is how `bad_lines` hears of lines parsed in worker
processes. `transfer_batch_to_device` passes them through untouched: they hold only strings,
and Lightning's default would reject the frozen dataclasses.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from itertools import islice
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import DataConfig
from .tasks import DataError, Example, Task, build_task


class Batch(list):
    """A list of Examples from one shard, with that shard's skipped-line count so far."""

    def __init__(self, examples: Any = (), *, shard: int = 0, bad_lines: int = 0):
        super().__init__(examples)
        self.shard = shard
        self.bad_lines = bad_lines


def worker_share(batches: int, worker: int, num_workers: int) -> int:
    """How many of the first `batches` batches, dealt round-robin, came from `worker`."""
    return max(0, (batches - worker + num_workers - 1) // num_workers)


class PromptStream(IterableDataset):
    """Batches of one rank's shards of a task's examples (see the module docstring)."""

    def __init__(
        self,
        task: Task,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        repeat: bool = True,
    ):
        if batch_size < 1:
            raise DataError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.task, self.batch_size, self.repeat = task, batch_size, repeat
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        return self.worker_batches(*((info.id, info.num_workers) if info else (0, 1)))

    def worker_batches(self, worker: int, num_workers: int) -> Iterator[Batch]:
        """What DataLoader worker `worker` of `num_workers` yields (0 of 1: no workers)."""
        role = (worker + self.start_batch) % num_workers  # the old worker this one continues
        shard, num_shards = self.rank * num_workers + role, self.world_size * num_workers
        start = worker_share(self.start_batch, role, num_workers)
        return self.shard_batches(shard, num_shards, start)

    def shard_batches(self, shard: int, num_shards: int, start_batch: int = 0) -> Iterator[Batch]:
        """Shard `shard`'s batches, from its `start_batch`-th on."""
        examples = self._examples(shard, num_shards, start_batch * self.batch_size)
        counts = getattr(self.task, "train_bad_lines", {})
        chunk = list(islice(examples, self.batch_size))
        while chunk:
            ahead = list(islice(examples, self.batch_size))  # so a count covers a finished pass
            yield Batch(chunk, shard=shard, bad_lines=counts.get((shard, num_shards), 0))
            if len(chunk) < self.batch_size:
                return
            chunk = ahead

    def _examples(self, shard: int, num_shards: int, skip: int) -> Iterator[Example]:
        while True:
            seen = 0
            for example in self.task.stream(shard=shard, num_shards=num_shards, start=skip):
                seen += 1
                yield example
            if not self.repeat:
                return
            if seen:
                skip = 0
                continue
            # nothing after `skip`: a resume past the end of a pass, or an empty shard
            length = skip and sum(1 for _ in self.task.stream(shard=shard, num_shards=num_shards))
            if not length:
                raise DataError(
                    f"shard {shard} of {num_shards} has no training examples "
                    f"(fewer training lines than ranks x workers?)"
                )
            skip %= length


def _as_is(batch: Batch) -> Batch:
    return batch


def _is_examples(batch: Any) -> bool:
    return isinstance(batch, list) and all(isinstance(x, Example) for x in batch)


class _TrackedLoader(DataLoader):
    """A DataLoader over a PromptStream that tells its datamodule about each batch."""

    def __init__(self, dataset: PromptStream, datamodule: PromptDataModule, **kwargs: Any):
        super().__init__(dataset, batch_size=None, collate_fn=_as_is, **kwargs)
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        self.dataset.start_batch = self.datamodule._begin_pass()  # type: ignore[attr-defined]
        for batch in super().__iter__():
            self.datamodule._delivered(batch)
            yield batch
        self.datamodule._pass_ended = True


class PromptDataModule(L.LightningDataModule):
    """Training batches (`list[Example]`, `cfg.batch_size` per rank) and validation examples."""

    def __init__(self, cfg: DataConfig, *, repeat: bool = True):
        super().__init__()
        self.cfg, self.repeat = cfg, repeat
        self.task: Task = build_task(cfg)
        self.batches_consumed = 0  # by this rank, in the current pass (all of them if repeat)
        self._shard_bad: dict[int, int] = {}
        self._pass_ended = False

    def rank_and_world(self) -> tuple[int, int]:
        """(rank, world size): from the Trainer, else torch.distributed, else (0, 1)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def train_dataloader(self) -> DataLoader:
        self.task.validation_set()  # fix the held-out set (and its exclusions) before pickling
        rank, world = self.rank_and_world()
        stream = PromptStream(
            self.task,
            self.cfg.batch_size,
            rank=rank,
            world_size=world,
            start_batch=self.batches_consumed,
            repeat=self.repeat,
        )
        self._shard_bad = {}
        return _TrackedLoader(stream, self, num_workers=self.cfg.num_workers)

    def val_examples(self) -> list[Example]:
        return self.task.validation_set()

    @property
    def bad_lines(self) -> int:
        """Malformed lines skipped so far: the validation source's plus this rank's shards'."""
        return getattr(self.task, "val_bad_lines", 0) + sum(self._shard_bad.values())

    # --- bookkeeping called by the loader and by Lightning

    def _begin_pass(self) -> int:
        if self._pass_ended:  # a finite pass ran out (repeat=False): the next starts at the top
            self.batches_consumed, self._pass_ended = 0, False
        return self.batches_consumed

    def _delivered(self, batch: Batch) -> None:
        self._shard_bad[batch.shard] = max(batch.bad_lines, self._shard_bad.get(batch.shard, 0))
        if self.trainer is None:
            self.batches_consumed += 1

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, Batch) and self.trainer is not None and self.trainer.training:
            self.batches_consumed += 1
        return batch

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        if _is_examples(batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self.batches_consumed, "batch_size": self.cfg.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "batches_consumed" not in state_dict:
            raise DataError(
                f"datamodule state has no 'batches_consumed' (keys: {sorted(state_dict)})"
            )
        if state_dict.get("batch_size", self.cfg.batch_size) != self.cfg.batch_size:
            warnings.warn(
                f"resuming with data.batch_size={self.cfg.batch_size}, saved with "
                f"{state_dict['batch_size']}: the stream position is approximate",
                stacklevel=2,
            )
        self.batches_consumed = int(state_dict["batches_consumed"])
        self._pass_ended = False
