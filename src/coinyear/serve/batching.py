"""Micro-batching: concurrent requests share one forward pass, whatever they ask for.

Each request decodes its own photos (in a worker thread), then `submit`s its tensors. One dispatcher
coroutine takes whatever is queued, waits at most `max_wait_ms` for more while other requests are still
decoding (and not at all when none are, so a lone client pays no wait), concatenates up to `max_size` rows
that target the same model object and runs one scoring pass on one of `workers` inference threads (more than
one lets a new batch start while another runs: with ONNX Runtime a batch of 16 costs about 16 single passes, so
serial batches only queue, measured in benchmarks/README.md). The pass returns
named per-row arrays (`year`, `spread`, `features`: see `CoinYearModel.score_tensors`); each request gets its
own rows of every array, so plain and interval requests share batches. Requests that started on a model
before a hot swap are batched with their own model, so they finish on it.

The dispatcher survives any exception: a failing pass, concatenation or metrics callback fails that batch's
requests and the loop goes on. Should the dispatcher task end anyway, `failure` says why and every queued
and later request fails at once with `DispatcherDown` instead of waiting for an answer that cannot come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

Scored = dict[str, np.ndarray]


class DispatcherDown(RuntimeError):
    """The batch dispatcher is not running: no request can be scored by this process."""


@dataclass
class _Item:
    model: object
    fronts: torch.Tensor
    backs: torch.Tensor
    future: asyncio.Future = field(repr=False)

    @property
    def rows(self) -> int:
        return len(self.fronts)


def split_rows(scored: Scored, sizes: list[int]) -> list[Scored]:
    """One batch's arrays cut into consecutive slices of `sizes` rows; ValueError unless every array has one
    row per input row."""
    total = sum(sizes)
    for key, values in scored.items():
        if len(values) != total:
            raise ValueError(f"scoring returned {len(values)} {key!r} rows for {total} input rows")
    slices, start = [], 0
    for size in sizes:
        slices.append({key: values[start:start + size] for key, values in scored.items()})
        start += size
    return slices


class MicroBatcher:
    def __init__(self, run: Callable[[Any, torch.Tensor, torch.Tensor], Scored], max_size: int,
                 max_wait_ms: float, on_batch: Callable[[int], None] | None = None, workers: int = 1):
        self.run, self.max_size, self.max_wait = run, max(1, max_size), max(0.0, max_wait_ms) / 1000
        self.on_batch = on_batch
        self.preparing = 0  # requests decoding photos right now: the only ones worth waiting for
        self.failure: str | None = None  # why the dispatcher stopped, when it did
        self.failed_batches = 0
        self._queue: list[_Item] = []
        self._arrived: asyncio.Event  # made by start(), in the loop that serves
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.workers = max(1, workers)
        self._slots: asyncio.Semaphore  # free inference threads, made by start()
        self._running: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="forward")

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="batch-dispatcher")
        self._task.add_done_callback(self._ended)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._running:  # batches already scoring finish and answer their requests
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, model, fronts: torch.Tensor, backs: torch.Tensor) -> Scored:
        """This request's rows of one scoring pass; raises DispatcherDown when the dispatcher is not running."""
        if not self.alive:
            raise DispatcherDown(self.failure or "the batch dispatcher is not running")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(model, fronts, backs, future))
        self._arrived.set()
        return await future

    def _ended(self, task: asyncio.Task) -> None:
        """The dispatcher task finished: record why and fail whatever still waits for it."""
        if self._stopping:
            self.failure = "stopped"
        elif task.cancelled():
            self.failure = "the batch dispatcher was cancelled"
        else:
            error = task.exception()
            self.failure = f"the batch dispatcher died: {type(error).__name__}: {error}"
        if not self._stopping:
            log.critical("%s; every scoring request now fails with 503 until the gateway restarts", self.failure)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(DispatcherDown(self.failure))
        self._queue.clear()

    def _queued_rows(self, model) -> int:
        return sum(item.rows for item in self._queue if item.model is model)

    async def _dispatch(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()  # while every thread is busy the queue grows into the next batch
            try:
                batch = await self._take_batch() if self._queue else []
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._score_batch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _score_batch(self, batch: list[_Item]) -> None:
        try:
            await self._score(batch)
        except Exception as error:  # any failure costs this batch's answers, never the dispatcher
            self.failed_batches += 1
            log.exception("scoring a batch of %d request(s) failed", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        finally:
            self._slots.release()

    async def _take_batch(self) -> list[_Item]:
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
        batch: list[_Item] = []
        rows = 0
        for item in list(self._queue):
            if item.model is model and (not batch or rows + item.rows <= self.max_size):
                batch.append(item)
                rows += item.rows
                self._queue.remove(item)
        return [item for item in batch if not item.future.done()]  # requests past their deadline are gone

    async def _score(self, batch: list[_Item]) -> None:
        model = batch[0].model
        fronts = torch.cat([item.fronts for item in batch])
        backs = torch.cat([item.backs for item in batch])
        scored = await asyncio.get_running_loop().run_in_executor(self._executor, self.run, model, fronts, backs)
        slices = split_rows(scored, [item.rows for item in batch])
        for item, rows in zip(batch, slices):
            if not item.future.done():
                item.future.set_result(rows)
        if self.on_batch:
            self.on_batch(len(fronts))
