"""A scripted fake engine and the real app around it, for fast API tests (issue #10).

`ScriptedEngine` is a real `ThreadedEngine` (worker thread, inbox, asyncio bridge, failure path)
whose "model" is a script: for each request and sequence index the script gives the reply text,
tokenized with the real tokenizer and emitted one token per `_step` for every running sequence
(at most `max_num_seqs` running, the rest waiting). Each step builds a logits row per sequence that
puts its scripted token far ahead of the rest, samples the batch with the real sampler and passes
every token through the real `SequenceState` (stop strings, max_tokens, token controllers such as
the reasoning budget, logprobs, the final report). After the script, the model "samples" EOS.

Forced tokens (a controller closing a thought, a continuation cue) replace scripted ones position by
position: the script's cursor advances one token per step whatever was accepted.

Knobs: `max_model_len`; `max_waiting` (admission as NativeEngine._validate: waiting + queued
sequences, an empty queue always takes one; EngineOverloaded / RequestTooLarge); `max_num_seqs`;
`gated=True`: while `engine.gate` is clear, requests are queued (drained into the waiting queue) but
no step runs, so tests fill the queue deterministically; `gate.set()` wakes the worker;
`fail_at_step=k`: step k raises after scheduling (ThreadedEngine's failure path; `failed_with`
records the running/waiting sequences then). Tests wait on engine state with `await
engine.until(predicate)` (a condition notified at every change), never with sleeps.

`build_app` builds `create_app(Settings(...))` with the fake (and an embedder) injected into the
model pool under their own manifests; `run` drives a scenario through an in-process ASGI client with
the app's lifespan (RAG store start / save, engines stopped at the end).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable

import httpx
import torch

from service.api.app import create_app
from service.config import Settings
from service.engine.output_processor import token_logprobs
from service.engine.sampler import sample
from service.engine.sequence import SequenceState
from service.engine.threaded import ThreadedEngine
from service.engine.types import GenerationRequest, RequestOutput, RequestTooLarge
from service.pool.manifest import Manifest, Task
from service.pool.pool import LoadedModel

CHAT, EMBED = "fake-chat", "fake-embed"
MARGIN = 100.0  # scripted token's logit over every other token: sampling at any temperature picks it
Script = Callable[[GenerationRequest, int], str]


class _Gate(threading.Event):
    """Holds every step while clear; setting it wakes the engine's worker at once."""

    def __init__(self, wake: threading.Event):
        super().__init__()
        self._wake_worker = wake

    def set(self) -> None:
        super().set()
        self._wake_worker.set()


@dataclass(eq=False)
class _Seq:
    state: SequenceState
    script: list[int]
    request_id: str
    pos: int = 0


class ScriptedEngine(ThreadedEngine):
    name = "scripted"

    def __init__(self, tokenizer, script: str | Script = "Hello from the script.", *, max_model_len: int = 2048,
                 max_num_seqs: int = 8, max_waiting: int = 64, gated: bool = False, fail_at_step: int | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.script: Script = (lambda _req, _i: script) if isinstance(script, str) else script
        self.max_model_len, self.max_num_seqs, self.max_waiting = max_model_len, max_num_seqs, max_waiting
        self.eos_token_ids = frozenset({tokenizer.eos_token_id})
        self.kernels = {"quantization": "none", "dtype": "float32"}
        self.device = torch.device("cpu")
        self.vocab_size = len(tokenizer)
        self.gate = _Gate(self._wake)
        if not gated:
            self.gate.set()
        self.fail_at_step = fail_at_step
        self.failed_with: tuple[int, int] | None = None  # (running, waiting) sequences at the failed step
        self.requests: list[GenerationRequest] = []  # every request added, in order (worker thread)
        self.num_steps = 0
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []
        self._open: dict[str, list[_Seq]] = {}  # request id -> its unfinished sequences
        self._changed = threading.Condition()
        self._snapshot: dict[str, float] = {}
        self._publish_state()

    # ---- admission (event loop thread): NativeEngine._validate's rules ----
    def _validate(self, req: GenerationRequest, num_ahead: int = 0) -> None:
        n = len(req.prompt_token_ids)
        if n == 0:
            raise RequestTooLarge("The prompt is empty; at least one token is required.")
        if n + 1 > self.max_model_len:
            raise RequestTooLarge(f"The prompt has {n} tokens and cannot fit: this model's maximum context "
                                  f"length is {self.max_model_len} tokens; at least 1 token must be generated.")
        if min(req.prompt_token_ids) < 0 or max(req.prompt_token_ids) >= self.vocab_size:
            raise RequestTooLarge(f"The prompt contains a token id outside the vocabulary [0, {self.vocab_size}).")
        self._check_queue(len(self._waiting), req, num_ahead)

    # ---- worker thread hooks ----
    def _add(self, req: GenerationRequest) -> None:
        p = req.sampling
        seqs = []
        for i in range(p.n):
            ids = self.tokenizer.encode(self.script(req, i), add_special_tokens=False)
            seqs.append(_Seq(SequenceState(req, i, self.tokenizer, self.eos_token_ids, self.max_model_len,
                                           self.device), ids, req.request_id))
        if p.prompt_logprobs is not None:
            values = self._prompt_logprobs(req.prompt_token_ids, p.prompt_logprobs)
            for s in seqs:
                s.state.set_prompt_logprobs(values)
        self.requests.append(req)
        self._open[req.request_id] = list(seqs)
        self._waiting.extend(seqs)
        self._publish_state()

    def _prompt_logprobs(self, prompt: list[int], k: int):
        """The "model" predicted every prompt token: logits put each next prompt token first."""
        targets = torch.tensor(prompt[1:], dtype=torch.long)
        logits = torch.zeros(len(targets), self.vocab_size)  # [T-1, V]
        logits[torch.arange(len(targets)), targets] = MARGIN
        return [None, *token_logprobs(logits, targets, k)] if len(targets) else [None]

    def _drop(self, request_id: str) -> list[RequestOutput]:
        seqs = self._open.pop(request_id, [])
        self._waiting = collections.deque(s for s in self._waiting if s.request_id != request_id)
        self._running = [s for s in self._running if s.request_id != request_id]
        outs = [s.state.abort() for s in seqs if not s.state.finished]
        self._publish_state()
        return outs

    def _request_ids(self) -> set[str]:
        return set(self._open)

    def _has_work(self) -> bool:
        return self.gate.is_set() and bool(self._waiting or self._running)

    def _step(self) -> list[RequestOutput]:
        self.num_steps += 1
        while self._waiting and len(self._running) < self.max_num_seqs:  # schedule
            self._running.append(self._waiting.popleft())
        if self.num_steps == self.fail_at_step:  # the "model forward" fails for the whole batch
            self.failed_with = (len(self._running), len(self._waiting))
            raise RuntimeError(f"scripted engine failure at step {self.num_steps}")
        outputs: list[RequestOutput] = []
        for s in [s for s in self._running if s.state.out.params.max_tokens == 0]:  # echo only: no sampling
            outputs.append(s.state.finish_prompt_only())
            self._finish(s)
        batch = list(self._running)
        if batch:
            outputs += self._sample_and_accept(batch)
        self._publish_state()
        return outputs

    def _sample_and_accept(self, batch: list[_Seq]) -> list[RequestOutput]:
        for s in batch:
            s.state.before_sample()
        logits = torch.zeros(len(batch), self.vocab_size)  # [B, V]
        eos = min(self.eos_token_ids)
        for i, s in enumerate(batch):
            logits[i, s.script[s.pos] if s.pos < len(s.script) else eos] = MARGIN
        tokens, lps = sample(logits, [s.state.row for s in batch])  # the real sampler, one batch
        outputs = []
        for i, s in enumerate(batch):
            if s.state.finished:  # a sibling's failure ended it earlier in this loop
                continue
            try:
                delta = s.state.accept(int(tokens[i]), lps[i] if lps else None, logits[i])
            except Exception as exc:  # a controller that raises fails its own request, not the batch
                outputs += self._fail_request(s.request_id, str(exc))
                continue
            s.pos += 1
            if delta is not None:
                outputs.append(delta)
            if s.state.finished:
                self._finish(s)
        return outputs

    def _finish(self, s: _Seq) -> None:
        self._running.remove(s)
        seqs = self._open.get(s.request_id, [])
        if s in seqs:
            seqs.remove(s)
        if not seqs:
            self._open.pop(s.request_id, None)

    # ---- state for tests and /metrics (any thread) ----
    def _publish_state(self) -> None:
        running = {s.request_id for s in self._running}
        with self._changed:
            self._snapshot = {
                "num_requests_running": float(len(running)),
                "num_requests_waiting": float(len(set(self._open) - running)),
                "num_running_seqs": float(len(self._running)),
                "num_waiting_seqs": float(len(self._waiting)),
                "num_steps": float(self.num_steps),
                "num_requests_added": float(len(self.requests)),
            }
            self._changed.notify_all()

    def stats(self) -> dict[str, float]:
        return dict(self._snapshot)

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 10.0) -> None:
        """Block until predicate(stats) holds (checked at every state change); AssertionError after timeout."""
        with self._changed:
            ok = self._changed.wait_for(lambda: predicate(self._snapshot), timeout)
        assert ok, f"engine state not reached in {timeout}s: {self._snapshot}"

    async def until(self, predicate: Callable[[dict], bool], timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.wait_for, predicate, timeout)


# ---- the real app around the fakes ----
def _manifest(model_id: str, task: Task, tmp_path) -> Manifest:
    return Manifest(id=model_id, task=task, architecture="llama", license="apache-2.0",
                    source={"kind": "local", "path": str(tmp_path)})


def scripted_app(tmp_path, tokenizer, script, **engine_kw):
    """(a ScriptedEngine for `script`, the app around it)."""
    engine = ScriptedEngine(tokenizer, script, **engine_kw)
    return engine, build_app(tmp_path, engine)


def build_app(tmp_path, engine=None, embedder=None, **settings):
    """create_app with only the fakes: an empty manifests dir (nothing real can load), the chat
    engine as CHAT (task chat) and the embedder as EMBED, both registered, loaded and pinned."""
    (tmp_path / "manifests").mkdir(exist_ok=True)
    defaults = dict(models=[], data_dir=tmp_path / "data", manifests_dir=tmp_path / "manifests",
                    models_dir=tmp_path / "models", default_chat_model=CHAT, default_embedding_model=EMBED)
    app = create_app(Settings(**{**defaults, **settings}))
    pool = app.state.frontier.pool
    for model_id, task, model in ((CHAT, Task.CHAT, engine), (EMBED, Task.EMBEDDING, embedder)):
        if model is None:
            continue
        m = _manifest(model_id, task, tmp_path)
        pool.registry.manifests[model_id] = m
        pool.loaded[model_id] = LoadedModel(m, tmp_path, 0, engine=model if model is engine else None,
                                            embedder=model if model is embedder else None,
                                            tokenizer=model.tokenizer, engine_kind="native" if model is engine else "",
                                            pinned=True)
    return app


@asynccontextmanager
async def client_for(app, timeout: float = 30.0):
    """An in-process client inside the app's lifespan (its end stops the pool's engines)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://frontier", timeout=timeout) as client:
            yield client


def run(app, scenario, timeout: float = 30.0):
    """`await scenario(client)` in a fresh event loop; fails (never hangs) past `timeout`."""

    async def main():
        async with client_for(app, timeout) as client:
            return await asyncio.wait_for(scenario(client), timeout)

    return asyncio.run(main())


# ---- response helpers ----
def sse_events(text: str) -> list:
    """The `data:` payloads of an SSE body: dicts, and the final "[DONE]" as a string."""
    out = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_envelope(body: dict, status_type: str | None = None, code: str | None = None, param=...) -> dict:
    """The OpenAI error envelope, exactly its four fields; returns the inner error."""
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    if status_type is not None:
        assert err["type"] == status_type, err
    if code is not None:
        assert err["code"] == code, err
    if param is not ...:
        assert err["param"] == param, err
    return err


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (0.0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
