"""torch's intra-op thread count, set for a block of CPU work and restored afterwards.

Several hot spots run many small ops (decoding one token at a time, row bookkeeping on index
tensors of a few thousand entries, the fused loss over 1 MiB blocks). torch opens a parallel
region for each, and where the cores are shared every region waits a scheduler slice for its
other threads: on 2 busy cores one thread is several times faster there (docs/performance.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# torch's native backend cannot change the thread count once used; the OpenMP one (Linux and
# macOS wheels) can
_OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextlib.contextmanager
def cpu_threads(threads: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with `threads` torch intra-op threads, restored afterwards. Unchanged when
    `threads` <= 0, when it is already the count, for work on another device, or without OpenMP."""
    before = torch.get_num_threads()
    if threads <= 0 or threads == before or not _OPENMP or torch.device(device).type != "cpu":
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
