"""Micro-batching: concurrent requests share one forward pass.

Each request decodes its own photos (in a worker thread), then `submit`s its tensors. One dispatcher
coroutine takes whatever is queued, waits at most `max_wait_ms` for more while other requests are still
decoding (and not at all when none are, so a lone client pays no wait), concatenates up to `max_size` rows
that target the same model object and runs one forward pass on a single inference thread. Requests that
started on a model before a hot swap are batched with their own model, so they finish on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class _Item:
    model: object
    fronts: torch.Tensor
    backs: torch.Tensor
    future: asyncio.Future = field(repr=False)

    @property
    def rows(self) -> int:
        return len(self.fronts)


class MicroBatcher:
    def __init__(self, run: Callable[[object, torch.Tensor, torch.Tensor], np.ndarray], max_size: int,
                 max_wait_ms: float, on_batch: Callable[[int], None] | None = None):
        self.run, self.max_size, self.max_wait = run, max(1, max_size), max(0.0, max_wait_ms) / 1000
        self.on_batch = on_batch
        self.preparing = 0  # requests decoding photos right now: the only ones worth waiting for
        self._queue: list[_Item] = []
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, model, fronts: torch.Tensor, backs: torch.Tensor) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(model, fronts, backs, future))
        self._arrived.set()
        return await future

    def _queued_rows(self, model) -> int:
        return sum(item.rows for item in self._queue if item.model is model)

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            model = self._queue[0].model
            deadline = time.monotonic() + self.max_wait
            while self.preparing > 0 and self._queued_rows(model) < self.max_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout=left)
                except TimeoutError:
                    break
            batch, rows = [], 0
            for item in list(self._queue):
                if item.model is model and (not batch or rows + item.rows <= self.max_size):
                    batch.append(item)
                    rows += item.rows
                    self._queue.remove(item)
            batch = [item for item in batch if not item.future.cancelled()]
            if not batch:
                continue
            fronts = torch.cat([item.fronts for item in batch])
            backs = torch.cat([item.backs for item in batch])
            try:
                years = await loop.run_in_executor(self._executor, self.run, model, fronts, backs)
            except Exception as error:  # a failed forward pass fails its requests, never the dispatcher
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            if self.on_batch:
                self.on_batch(rows)
            start = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(years[start:start + item.rows])
                start += item.rows
