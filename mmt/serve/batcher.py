"""Dynamic batching: requests that arrive together go through the model as one batch.

One `Batcher` per model. A request hands in one item (an image, an image and its question) with
the batched function that serves it (the Predictor's own `answer`, `caption`, ...) and a key;
items with the same function and key (e.g. the same decoding options) may share a batch. A
single worker thread runs the model, so the event loop never waits on it (the server's
/healthz answers while a batch runs) and the model never runs twice at once.

When the worker is free, the oldest waiting group is taken as soon as it holds `max_batch`
items or its first item has waited `max_wait` seconds; items arriving while a batch runs wait
for the next one, so under load batches fill up by themselves and at low load a request waits
at most `max_wait`. `max_batch=1` serves one request at a time (the baseline of
benchmarks/serve_load.py).

If a batch fails, its items are retried one by one, so one bad item fails only its own request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Hashable, Sequence

log = logging.getLogger(__name__)

BatchFunction = Callable[[Sequence[Any]], Sequence[Any]]  # items -> one result per item, in order


class Batcher:
    """Collects items into batches for `function`s of one model, run on one worker thread.

    Args:
        max_batch: the most items in one call (1: no batching).
        max_wait: seconds the first item of a batch waits for others to join it.
        name: for the worker thread's name and log messages.
    """

    def __init__(self, max_batch: int = 32, max_wait: float = 0.010, name: str = "model"):
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"max_batch must be at least 1 and max_wait at least 0; got {max_batch}, {max_wait}")
        self.max_batch, self.max_wait, self.name = max_batch, max_wait, name
        self._executor: ThreadPoolExecutor | None = None
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # of the latest batched calls
        self.calls = self.items = 0  # batched calls so far, and the items they served
        self._loop: asyncio.AbstractEventLoop | None = None
        self._groups: dict[tuple, list[tuple[Any, asyncio.Future, float]]] = {}
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The one worker thread that runs the model (started on first use, again after `close`)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mmt-serve-{self.name}")
        return self._executor

    def _started(self) -> None:
        """The collecting task, on the running event loop (a new loop, as a test client makes per
        session, gets a fresh one; the worker thread stays)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._groups, self._arrived = loop, {}, asyncio.Event()
            self._task = loop.create_task(self._collect(), name=f"mmt-serve-batcher-{self.name}")

    async def submit(self, function: BatchFunction, item: Any, key: Hashable = None) -> Any:
        """The result of `function` for `item`, computed in a batch with others of the same
        `function` and `key`; raises what computing it raised."""
        self._started()
        future = self._loop.create_future()
        self._groups.setdefault((function, key), []).append((item, future, time.monotonic()))
        self._arrived.set()
        return await future

    async def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`function(*args, **kwargs)` on the worker thread, alone (e.g. an explanation)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, lambda: function(*args, **kwargs))

    async def _collect(self) -> None:
        while True:
            while not self._groups:
                self._arrived.clear()
                await self._arrived.wait()
            key = min(self._groups, key=lambda k: self._groups[k][0][2])  # the group waiting longest
            deadline = self._groups[key][0][2] + self.max_wait
            while len(self._groups[key]) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            group = self._groups.pop(key)
            batch, rest = group[: self.max_batch], group[self.max_batch :]
            if rest:
                self._groups[key] = rest
            batch = [(item, future) for item, future, _ in batch if not future.done()]  # (a client gone away)
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            self.calls, self.items = self.calls + 1, self.items + len(batch)
            outcomes = await asyncio.get_running_loop().run_in_executor(self.executor, _call, key[0], [item for item, _ in batch])
            for (_, future), (ok, value) in zip(batch, outcomes):
                if not future.done():
                    future.set_result(value) if ok else future.set_exception(value)

    def close(self) -> None:
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _call(function: BatchFunction, items: list[Any]) -> list[tuple[bool, Any]]:
    """(ok, result or exception) per item: the batch in one call, or after a failure one by one."""
    try:
        results = list(function(items))
        if len(results) != len(items):
            raise RuntimeError(f"{function!r} returned {len(results)} results for {len(items)} items")
        return [(True, r) for r in results]
    except Exception as e:
        if len(items) == 1:
            return [(False, e)]
        log.info("a batch of %d failed (%s); serving its items one by one", len(items), e)
    outcomes = []
    for item in items:
        try:
            outcomes.append((True, function([item])[0]))
        except Exception as e:
            outcomes.append((False, e))
    return outcomes
