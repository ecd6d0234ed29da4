"""Batching that costs a lone request nothing: requests wait only while the model is busy.

A model replica runs one batch at a time. A request that finds it idle starts at once; requests
that arrive while a batch runs queue up and go together, up to ``max_size``, the moment it ends.
Under load batches fill by themselves; at one request at a time nobody waits.

Ray Serve's ``@serve.batch`` forms a batch as soon as its first request arrives and then waits up
to ``batch_wait_timeout_s`` for more (``ray/serve/batching.py``, ``_process_batches``), even while
an earlier batch still holds the model: a wait of 50 ms was most of the HTTP overhead of a lone
request (+67 ms), and a wait of 0 makes batches of one under load. This is asyncio only, so a
test drives it without Ray.

    batcher = Batcher(run_batch, max_size=4)      # run_batch: async (list of items) -> list of results
    result = await batcher.submit(item)
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable


class Batcher:
    """Runs ``run`` on lists of submitted items, one list at a time, in arrival order.

    ``run(items)`` returns one result per item (an exception fails every item of that call).
    ``wait_s``: how long a batch that starts on an idle model waits for company; 0 (the default)
    starts it at once, which is right unless requests arrive faster than a batch runs. ``sizes``
    keeps the sizes of the last 1000 batches (for /v1/info and the benchmark)."""

    def __init__(self, run: Callable[[list], Awaitable[list]], max_size: int, wait_s: float = 0.0):
        if max_size < 1:
            raise ValueError(f"max_size={max_size}: a batch holds at least one request")
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self.sizes: list[int] = []
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    @property
    def pending(self) -> int:
        """Items waiting for a batch (not counting the batch running now)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: Any) -> Any:
        """``item``'s result, once the batch it joined has run."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            # created on first use, in the replica's running loop (none exists at __init__; a test
            # client may run each request in a loop of its own)
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._loop())
        future = loop.create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _loop(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            if self.wait_s > 0 and queue.qsize() < self.max_size - 1:
                await asyncio.sleep(self.wait_s)
            while len(batch) < self.max_size and not queue.empty():
                batch.append(queue.get_nowait())
            batch = [(item, fut) for item, fut in batch if not fut.cancelled()]  # clients gone
            if not batch:
                continue
            self.sizes = (self.sizes + [len(batch)])[-1000:]
            try:
                results = await self.run([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # every waiting request gets the error; the loop keeps serving
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)
