"""The thread + asyncio bridge every engine shares.

Model forwards run in one worker thread (they hold the GIL only in Python glue; torch releases it in
kernels), so the event loop keeps serving HTTP. Requests enter through a thread-safe inbox; deltas
come back through `loop.call_soon_threadsafe` into a per-request asyncio.Queue. Subclasses supply
`_add(req)`, `_drop(request_id)`, `_has_work()` and `_step() -> list[RequestOutput]`.

Nothing a step raises may kill the worker or leave a consumer waiting: a step that raises past the
engine's own per-request isolation ends every request the engine holds with an error output
(`_fail_all`), and the worker goes on serving.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator

from service.engine.types import EngineOverloaded, FinishReason, GenerationRequest, RequestOutput

log = logging.getLogger(__name__)


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, num_seqs: int):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.num_open = num_seqs
        self.unfinished = set(range(num_seqs))  # sequence indices not yet published as finished (worker side)


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

    def _request_ids(self) -> set[str]:
        """Ids of the requests the engine holds (waiting or running), for `_fail_all`."""
        return set()

    def _after_failed_step(self) -> None:
        """Called after `_fail_all`: drop whatever per-step state the failed step left behind."""

    def _validate(self, req: GenerationRequest, num_ahead: int = 0) -> None:
        """Raise RequestTooLarge / EngineOverloaded before a request is queued (event loop thread).
        `num_ahead`: sequences of requests admitted together with this one but not queued yet."""

    def _check_queue(self, waiting_seqs: int, req: GenerationRequest, num_ahead: int) -> None:
        """The waiting-queue bound every engine applies: sequences, not requests (one request of many
        prompts x n must not fill the queue for everyone), counting the engine's waiting sequences,
        the inbox and `num_ahead`. An empty queue always takes one request (it would never fit)."""
        pending = waiting_seqs + self._num_queued_seqs() + num_ahead
        if pending and pending + req.sampling.n > self.max_waiting:
            raise EngineOverloaded(f"{pending} sequences are waiting (limit {self.max_waiting}); try again shortly")

    def _num_queued_seqs(self) -> int:
        """Sequences of requests in the inbox, not yet seen by the worker (any thread)."""
        with self._inbox.mutex:
            return sum(item.sampling.n for kind, item in self._inbox.queue if kind == "add")

    def check_admission(self, reqs: list[GenerationRequest]) -> None:
        """Raise what `generate` would raise for these requests together (all or nothing), so that
        the API answers 400/429 before the first response byte. `generate` checks again."""
        ahead = 0
        for req in reqs:
            self._validate(req, ahead)
            ahead += req.sampling.n

    # ---- public API ----
    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-worker", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        """Stop the worker, then end every request still open with an error output (a consumer never
        waits forever on a stopped engine). The API ends or answers its requests before this (graceful
        stop: service/api/drain.py), so normally nothing is left open here."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
        self._end_open_streams(f"{self.name} stopped (server shutting down)")
        if thread is None or not thread.is_alive():
            self._stop.clear()  # start() may run the engine again (never beside a worker still in a step)

    def _end_open_streams(self, message: str) -> None:
        with self._streams_lock:
            streams = list(self._streams.items())
            self._streams.clear()  # a worker that outlived the join publishes to no one
        for request_id, stream in streams:
            for i in sorted(stream.unfinished):
                out = _error_output(request_id, i, message)
                try:
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
                except RuntimeError:  # that consumer's event loop is closed already
                    pass
        if streams:
            log.warning("%s: ended %d open request(s) at shutdown", self.name, len(streams))

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
                    if out.finished:
                        stream.unfinished.discard(out.index)
                    try:
                        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
                    except RuntimeError:  # that consumer's event loop is closed: nobody to tell
                        log.warning("%s: dropped an output for %s (event loop closed)", self.name, out.request_id)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self._add(item)
                except Exception as exc:  # e.g. a controller factory: fail this request, not the worker
                    log.exception("%s: could not add request %s", self.name, item.request_id)
                    self._publish(self._fail_request(item.request_id, str(exc), item.sampling.n))
            else:
                self._publish(self._drop(item))

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._drain_inbox()
                    if not self._has_work():
                        self._wake.wait(timeout=0.5)
                        self._wake.clear()
                        continue
                    outputs = self._step()
                except Exception as exc:  # a failed step must not kill the worker nor hang a client
                    log.exception("%s step failed", self.name)
                    outputs = self._fail_all(str(exc))
                self._publish(outputs)

    def _fail_all(self, message: str) -> list[RequestOutput]:
        """Last resort when a failure cannot be traced to its requests (a model forward): every
        request the engine holds, waiting or running, ends with an error. Requests still in the
        inbox were not part of the step: they are served next. If the engine cannot even drop a
        request (its state is broken), that request's open stream is ended here all the same."""
        with self._streams_lock:
            streams = dict(self._streams)
        try:
            held = self._request_ids()
        except Exception:
            log.exception("%s: could not list its requests", self.name)
            held = set()
        outputs: list[RequestOutput] = []
        for rid in [*streams, *(r for r in held if r not in streams)]:
            try:
                outputs += self._fail_request(rid, message)
            except Exception:
                log.exception("%s: could not drop request %s", self.name, rid)
                stream = streams.get(rid)
                ended = {o.index for o in outputs if o.request_id == rid}
                for i in sorted(stream.unfinished - ended) if stream is not None else ():
                    outputs.append(_error_output(rid, i, message))
        try:
            self._after_failed_step()
        except Exception:
            log.exception("%s: cleanup after a failed step failed", self.name)
        return outputs

    def _fail_request(self, request_id: str, message: str, num_seqs: int = 0) -> list[RequestOutput]:
        """Drop one request and end its open sequences with an error. `num_seqs`: the request never
        reached the engine's state (failed in `_add`): end that many sequences from here."""
        dropped = self._drop(request_id)
        if num_seqs and not dropped:
            return [_error_output(request_id, i, message) for i in range(num_seqs)]
        for out in dropped:
            out.finish_reason, out.error, out.finished = FinishReason.ERROR, message, True
        return dropped


def _error_output(request_id: str, index: int, message: str) -> RequestOutput:
    """The final output of a sequence the engine could not finish."""
    return RequestOutput(request_id, index, "", [], finished=True, finish_reason=FinishReason.ERROR, error=message)
