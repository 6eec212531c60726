"""Micro-batching: concurrent requests share one model call, with a bounded wait.

Requests wait in a bounded queue; one worker task takes the first, then everything already
queued, then waits at most ``max_wait_s`` (from the first) for more, up to ``max_batch`` items
and a budget of
padded candidate slots (B x the batch's largest C). The batch runs in one worker thread, so the
event loop keeps parsing and validating the next requests meanwhile; under load, requests pile
up while a batch runs and the next batch takes them all. With ``max_batch = 1`` every request
runs alone (the no-batching reference of ``benchmarks/bench_serve.py``).

If a batch fails, its items are retried one by one, so one bad item fails only its own request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatchConfig", "MicroBatcher", "QueueFull"]

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """More requests waiting than ``max_queue``: the caller should answer 429.

    >>> try:
    ...     raise QueueFull("1024 requests waiting")
    ... except QueueFull as e:
    ...     print(429, e)
    429 1024 requests waiting
    """


@dataclass(frozen=True)
class BatchConfig:
    """How requests are grouped.

    >>> BatchConfig(max_batch=1).max_batch  # no batching
    1
    """

    max_batch: int = 32
    max_wait_s: float = 0.002
    max_queue: int = 1024
    max_batch_slots: int = 16_384  # B x max C of one batch (bounds the padded work)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.max_wait_s <= 1.0:
            raise ValueError(f"max_wait_s must be in [0, 1] seconds, got {self.max_wait_s}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_batch_slots < 1:
            raise ValueError(f"max_batch_slots must be >= 1, got {self.max_batch_slots}")


@dataclass
class _Item(Generic[T, R]):
    value: T
    size: int
    future: asyncio.Future[R]


class MicroBatcher(Generic[T, R]):
    """Runs ``fn(list of items) -> list of results`` on batches of concurrently submitted items.

    ``size(item)`` is the item's padded width (candidates); ``expecting(n)`` (optional) says
    whether more items may arrive for a batch of n (the server: more requests in flight than
    n); when it says no, the batch runs at once instead of waiting ``max_wait_s`` for nobody.
    ``start()`` and ``stop()`` run inside the event loop (the app's lifespan); ``stop()``
    finishes every queued item first.

    >>> import asyncio
    >>> async def demo():
    ...     b = MicroBatcher(lambda xs: [x * 2 for x in xs], lambda x: 1, BatchConfig())
    ...     await b.start()
    ...     out = await asyncio.gather(*(b.submit(i) for i in range(5)))
    ...     await b.stop()
    ...     return out, b.batches
    >>> out, batches = asyncio.run(demo())
    >>> out, batches < 5
    ([0, 2, 4, 6, 8], True)
    """

    def __init__(
        self,
        fn: Callable[[Sequence[T]], Sequence[R]],
        size: Callable[[T], int],
        config: BatchConfig,
        expecting: Callable[[int], bool] | None = None,
    ) -> None:
        self.fn, self.size, self.config = fn, size, config
        self.expecting = expecting
        self.batches = 0  # model calls so far
        self.items = 0  # items run so far
        # Items stay in this deque until a batch takes them: a timed-out wait never loses one.
        self._items: deque[_Item[T, R]] = deque()
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def waiting(self) -> int:
        """Items queued and not yet taken by a batch."""
        return len(self._items)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the batcher is already running")
        self._wake, self._stopping = asyncio.Event(), False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hashrec-model")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Finish every queued item, then stop the worker."""
        if self._task is None or self._wake is None:
            return
        self._stopping = True
        self._wake.set()
        await self._task
        self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, value: T) -> R:
        """Queue one item and wait for its result (raises what ``fn`` raised for it)."""
        if self._task is None or self._wake is None or self._stopping:
            raise RuntimeError("the batcher is not running")
        if len(self._items) >= self.config.max_queue:
            raise QueueFull(f"{len(self._items)} requests are waiting (max_queue)")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append(_Item(value, max(1, self.size(value)), fut))
        self._wake.set()
        return await fut

    async def _wait(self, timeout: float | None) -> bool:
        """Sleep until an item arrives or a stop is asked (True) or ``timeout`` passes (False)."""
        assert self._wake is not None
        self._wake.clear()
        if self._items or self._stopping:
            return True
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _take(self, batch: list[_Item[T, R]], widest: int) -> int:
        """Move queued items into ``batch`` while they fit; the new widest size."""
        cfg = self.config
        while self._items and len(batch) < cfg.max_batch:
            w = max(widest, self._items[0].size)
            if w * (len(batch) + 1) > cfg.max_batch_slots:
                break
            batch.append(self._items.popleft())
            widest = w
        return widest

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        while True:
            while not self._items and not self._stopping:
                await self._wait(None)
            if not self._items:
                return  # stopping and drained
            first = self._items.popleft()
            batch, widest = [first], first.size
            deadline = loop.time() + cfg.max_wait_s
            while True:
                widest = self._take(batch, widest)
                full = len(batch) >= cfg.max_batch or bool(self._items)  # next one did not fit
                alone = self.expecting is not None and not self.expecting(len(batch))
                remaining = deadline - loop.time()
                if full or alone or self._stopping or remaining <= 0:
                    break
                if not await self._wait(remaining):
                    widest = self._take(batch, widest)
                    break
            live = [it for it in batch if not it.future.done()]  # skip clients that left
            if live:
                await self._execute(loop, live)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Item[T, R]]) -> None:
        values = [it.value for it in batch]
        self.batches += 1
        self.items += len(batch)
        try:
            results = await loop.run_in_executor(self._executor, self.fn, values)
        except Exception as e:
            if len(batch) == 1:
                _settle(batch[0].future, error=e)
                return
            for it in batch:  # find the bad item(s): each one alone
                await self._execute(loop, [it])
            return
        for it, r in zip(batch, results, strict=True):
            _settle(it.future, result=r)


def _settle(fut: asyncio.Future, result: object = None, error: BaseException | None = None) -> None:
    with contextlib.suppress(asyncio.InvalidStateError):  # the client went away
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
