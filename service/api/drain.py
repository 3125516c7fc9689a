"""Graceful stop: on SIGTERM stop admitting, let running work finish, end the rest cleanly.

The sequence (driven by `DrainingServer`, the uvicorn.Server that `frontier serve` runs; uvicorn itself would close the
listener at once and, after its grace period, cut every connection without a word):

1. `Drain.begin()`: new requests get 503 in the error envelope with Retry-After (and
   `Connection: close`); /health and /metrics still answer. The listener stays open meanwhile, so a
   client that still reaches this process is told to go elsewhere instead of being refused a TCP
   connection.
2. Requests already in flight go on, up to `shutdown_drain_s`.
3. Generations still running then are ended: a stream gets a final SSE error event
   (`server_shutting_down`) and `data: [DONE]`; a non-streamed request that has not answered yet gets
   503 in the envelope. Their tasks are cancelled, which aborts the sequences in the engine.
   Other requests (RAG writes, embeddings) are never cut here: a RAG write that was cancelled while
   its SQLite transaction commits in a thread could be answered "failed" and still be stored.
4. uvicorn then stops (waiting `shutdown_grace_s` for what is left) and the lifespan saves the RAG
   indexes and stops the engines.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import uvicorn

from service.api.errors import envelope
from service.api.streaming import sse

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2  # another replica usually answers at once; a restarting one takes longer anyway
CODE = "server_shutting_down"
OPEN_WHILE_DRAINING = frozenset({"/health", "/metrics"})  # liveness and scrapes, not work
_GENERATION = re.compile(r"/v1/(chat/completions|completions|rag/collections/[^/]+/chat)/?")


def is_generation(path: str) -> bool:
    return _GENERATION.fullmatch(path) is not None


def _json_response(status: int, body: dict, extra_headers: list[tuple[bytes, bytes]] = ()) -> list[dict]:
    import json

    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close"), *extra_headers]
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": data, "more_body": False}]


def refusal(message: str) -> list[dict]:
    return _json_response(503, envelope(message, "server_error", None, CODE))


class _Flight:
    """One request in flight: its task, and what of its response has gone out."""

    def __init__(self, scope, send):
        self.path = scope["path"]
        self._send = send
        self.lock = asyncio.Lock()
        self.task: asyncio.Task | None = None
        self.started = self.complete = self.sse = self.closed = self.cut = False

    async def send(self, message) -> None:
        async with self.lock:
            if self.closed:  # ended by the drain: nothing more from the app goes out
                return
            if message["type"] == "http.response.start":
                self.started = True
                ctype = next((v for k, v in message.get("headers", ()) if k.lower() == b"content-type"), b"")
                self.sse = ctype.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.complete = True
            await self._send(message)

    async def end(self, message: str) -> None:
        """Answer now (error event + [DONE] on a stream, 503 envelope before the first byte) and
        cancel the handler. A client that stopped reading gets no event: it is cut after 1 s."""
        self.cut = True
        try:
            await asyncio.wait_for(self.lock.acquire(), 1.0)
        except TimeoutError:
            pass
        else:
            try:
                if not self.complete:
                    self.closed = True
                    if not self.started:
                        msgs = refusal(message)
                    elif self.sse:
                        body = (sse(envelope(message, "server_error", None, CODE)) + sse("[DONE]")).encode()
                        msgs = [{"type": "http.response.body", "body": body, "more_body": False}]
                    else:  # some other streamed body: it ends when the task is cancelled
                        msgs = []
                    for m in msgs:
                        await asyncio.wait_for(self._send(m), 1.0)
            except Exception:  # the client is gone: nothing to tell it
                pass
            finally:
                self.lock.release()
        if self.task is not None:
            self.task.cancel()


class Drain:
    """The app's stop state: whether it still admits requests, and what is in flight."""

    def __init__(self, drain_s: float):
        self.drain_s = drain_s
        self.draining = False
        self.flights: set[_Flight] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            log.info("draining: new requests get 503; %d in flight may run up to %gs", len(self.flights),
                     self.drain_s)

    def add(self, flight: _Flight) -> None:
        self.flights.add(flight)
        self._idle.clear()

    def discard(self, flight: _Flight) -> None:
        self.flights.discard(flight)
        if not self.flights:
            self._idle.set()

    async def wait_idle(self, timeout: float | None) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def end_generations(self, reason: str) -> int:
        """End every generation still in flight (see `_Flight.end`); returns how many."""
        ending = [f for f in self.flights if is_generation(f.path) and not f.cut]
        await asyncio.gather(*(f.end(reason) for f in ending))
        return len(ending)

    async def run(self, drain_s: float | None = None) -> None:
        """Steps 1-3 of the module docstring."""
        self.begin()
        t0 = time.monotonic()
        budget = self.drain_s if drain_s is None else drain_s
        if await self.wait_idle(budget):
            log.info("drained in %.1fs", time.monotonic() - t0)
            return
        n = await self.end_generations(f"the server is shutting down: the generation did not finish within "
                                       f"the {budget:g}s drain time (FRONTIER_SHUTDOWN_DRAIN_S); retry it")
        log.warning("drain time of %gs over: ended %d generation(s); %d other request(s) still running",
                    budget, n, sum(1 for f in self.flights if not f.cut))


class DrainMiddleware:
    """Counts requests in flight and refuses new ones once the drain began (inside EdgeMiddleware,
    so refusals are counted in frontier_requests_total and auth still answers first)."""

    def __init__(self, app, *, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_WHILE_DRAINING:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            for m in refusal("the server is shutting down and accepts no new requests; retry (another "
                             "replica, or this one after its restart)"):
                await send(m)
            return
        flight = _Flight(scope, send)
        self.drain.add(flight)
        try:
            flight.task = asyncio.create_task(self.app(scope, receive, flight.send))
            try:
                await flight.task  # cancelling this request (uvicorn at its end) cancels the task too
            except asyncio.CancelledError:
                if flight.cut and not _cancelling():
                    return  # ended by the drain, already answered
                raise
        finally:
            self.drain.discard(flight)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM / SIGINT first drains (`Drain.run`) while still listening, so late clients
    get a 503 envelope instead of a refused connection; then uvicorn's own shutdown (it waits
    `timeout_graceful_shutdown` = shutdown_grace_s for what is left; then the lifespan saves the RAG
    indexes and stops the engines). A second signal ends the drain at once, a third skips the waits.
    The signal is not re-raised after the stop (uvicorn's default), so a graceful stop exits 0."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        self.num_signals = 0
        self._drainer: asyncio.Task | None = None
        self._hurried = False

    def handle_exit(self, sig, frame) -> None:  # runs as a signal handler: only flags, on_tick acts
        self.num_signals += 1
        if self.num_signals >= 3:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.num_signals and self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        elif self.num_signals >= 2 and not self._hurried and not self._drainer.done():
            self._hurried = True
            self._drainer.cancel()
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        try:
            await self.drain.run()
        except asyncio.CancelledError:  # a second signal: end what is running now
            await self.drain.end_generations("the server is shutting down; retry the request")
        finally:
            self.should_exit = True
