"""Reading, computing and writing at once: the streaming tools (merges, conversion) hand their
per-tensor work to ``ordered_map``, which runs it on worker threads ahead of the writer and gives
the results back in order, so reading the next tensors, the arithmetic and writing the last one
overlap. Threads suffice: file reads and writes, and torch's kernels, release the GIL.

``parallel_work`` holds torch's own intra-op pool to one thread meanwhile: the parallelism is the
workers', and an intra-op pool on a loaded machine makes every small operation wait at a barrier
for threads the scheduler has not run (measured: a blocked merge ran 30x slower with two intra-op
threads than with one on a 2-core machine at load 8).
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

# Bytes of work produced ahead of a writer (always at least one item): bounds what the overlap of
# producing and writing costs in memory (an 8B model's embedding alone is 1 GB in bf16).
AHEAD_BYTES = 512 * 2**20


def default_workers() -> int:
    """Worker threads for the streaming tools: the cores this process may use, at least 2 (one
    reads while the other computes), at most 8 (memory bandwidth is shared)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(2, min(8, cores))


def ordered_map[T, R](
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int | None = None,
    ahead: int | None = None,
    cost: Callable[[T], int] | None = None,
    budget: int | None = None,
) -> Iterator[R]:
    """``fn(item)`` for every item, computed on ``workers`` threads, yielded in the items' order.
    At most ``ahead`` items (default ``2 * workers``) are in flight or waiting, and, with ``cost``
    (an item's bytes) and ``budget``, at most ``budget`` bytes of them (one item always), which
    bounds the memory. An exception in ``fn`` is raised here, at its item."""
    workers = workers or default_workers()
    ahead = max(1, ahead or 2 * workers)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="stream")
    pending: deque[tuple[Future, int]] = deque()
    in_flight = 0
    it = iter(items)
    waiting: list = []  # an item read from ``it`` that did not fit the budget yet

    def fill() -> None:
        nonlocal in_flight
        while len(pending) < ahead:
            item = waiting.pop() if waiting else next(it, _END)
            if item is _END:
                return
            size = cost(item) if cost else 0
            if pending and budget is not None and in_flight + size > budget:
                waiting.append(item)
                return
            pending.append((pool.submit(fn, item), size))
            in_flight += size

    try:
        fill()
        while pending:
            future, size = pending.popleft()
            result = future.result()
            in_flight -= size
            fill()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()


@contextlib.contextmanager
def parallel_work(threads: int = 1):
    """torch's intra-op threads set to ``threads`` inside the block (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
