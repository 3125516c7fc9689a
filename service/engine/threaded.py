"""The thread + asyncio bridge every engine shares.

Model forwards run in one worker thread (they hold the GIL only in Python glue; torch releases it in
kernels), so the event loop keeps serving HTTP. Requests enter through a thread-safe inbox; deltas
come back through `loop.call_soon_threadsafe` into a per-request asyncio.Queue. Subclasses supply
`_add(req)`, `_drop(request_id)`, `_has_work()` and `_step() -> list[RequestOutput]`.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator

from service.engine.types import FinishReason, GenerationRequest, RequestOutput

log = logging.getLogger(__name__)


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, num_seqs: int):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.num_open = num_seqs


class ThreadedEngine(abc.ABC):
    name = "engine"

    def __init__(self) -> None:
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- subclass hooks (called on the worker thread only) ----
    @abc.abstractmethod
    def _add(self, req: GenerationRequest) -> None:
        """Queue a new request (its n sequences) for scheduling."""

    @abc.abstractmethod
    def _drop(self, request_id: str) -> list[RequestOutput]:
        """Forget a request (aborted): free its resources, return final outputs if any."""

    @abc.abstractmethod
    def _has_work(self) -> bool:
        """Whether any request is waiting or running."""

    @abc.abstractmethod
    def _step(self) -> list[RequestOutput]:
        """Advance every running request by one token; return their deltas."""

    def _validate(self, req: GenerationRequest) -> None:
        """Raise RequestTooLarge / EngineOverloaded before a request is queued (event loop thread)."""

    # ---- public API ----
    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-worker", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
            self._thread = None

    async def generate(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        self._validate(req)
        if self._thread is None:
            await self.start()
        if not req.arrival_time:
            req.arrival_time = time.monotonic()
        stream = _Stream(asyncio.get_running_loop(), req.sampling.n)
        with self._streams_lock:
            self._streams[req.request_id] = stream
        self._inbox.put(("add", req))
        self._wake.set()
        finished = False
        try:
            while stream.num_open > 0:
                out = await stream.queue.get()
                if out.finished:
                    stream.num_open -= 1
                yield out
            finished = True
        finally:
            with self._streams_lock:
                self._streams.pop(req.request_id, None)
            if not finished:  # consumer went away (client disconnect, cancellation)
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # ---- worker thread ----
    def _publish(self, outputs: list[RequestOutput]) -> None:
        with self._streams_lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(item)
            else:
                self._publish(self._drop(item))

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stop.is_set():
                self._drain_inbox()
                if not self._has_work():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    outputs = self._step()
                except Exception as exc:  # a failed step must not kill the engine or hang clients
                    log.exception("%s step failed", self.name)
                    outputs = self._fail_all(str(exc))
                self._publish(outputs)

    def _fail_all(self, message: str) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        with self._streams_lock:
            ids = list(self._streams)
        for rid in ids:
            dropped = self._drop(rid)
            for out in dropped:
                out.finish_reason, out.error, out.finished = FinishReason.ERROR, message, True
            outputs.extend(dropped)
        return outputs
