"""Sentence embeddings (sentence-transformers), run off the event loop one batch at a time.

Fairness: one call with thousands of texts used to hold the encoder for minutes while every other
embedding request and RAG query waited behind it. Each call is now cut into slices of `slice_size`
texts, and one scheduler runs slices round-robin across the calls waiting, so a small call waits for
at most about one slice of each call ahead of it, whatever their size.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from service.engine.fresh_thread import run_in_fresh_thread


@dataclass
class _Call:
    texts: list[str]
    done: asyncio.Future
    parts: list[torch.Tensor] = field(default_factory=list)
    next: int = 0  # index of the first text not yet encoded


class FairScheduler:
    """Round-robin over waiting calls, one slice at a time (the cores are the bottleneck: running two
    slices at once would only slow both)."""

    def __init__(self, encode_batch: Callable[[list[str]], torch.Tensor], slice_size: int = 32):
        self.encode_batch, self.slice_size = encode_batch, slice_size
        self._queue: deque[_Call] = deque()
        self._runner: asyncio.Task | None = None

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    async def encode(self, texts: list[str]) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        call = _Call(list(texts), loop.create_future())
        self._queue.append(call)
        if self._runner is None or self._runner.done() or self._runner.get_loop() is not loop:
            self._runner = loop.create_task(self._run())  # one runner; it ends when the queue is empty
        return await call.done  # a cancelled caller cancels `done`: its remaining slices are skipped

    async def _run(self) -> None:
        try:
            while self._queue:
                call = self._queue.popleft()
                if call.done.done():
                    continue
                batch = call.texts[call.next: call.next + self.slice_size]
                try:
                    part = await run_in_fresh_thread(self.encode_batch, batch, name="embed")
                except Exception as exc:
                    if not call.done.done():
                        call.done.set_exception(exc)
                    continue
                call.parts.append(part)
                call.next += len(batch)
                if call.next < len(call.texts):
                    self._queue.append(call)  # back of the line: the others get their slice first
                elif not call.done.done():
                    call.done.set_result(torch.cat(call.parts) if len(call.parts) > 1 else call.parts[0])
        finally:  # cancelled (loop shutting down): nobody may wait forever
            while self._queue:
                call = self._queue.popleft()
                if not call.done.done():
                    call.done.set_exception(RuntimeError("embedding scheduler stopped"))


class Embedder:
    def __init__(self, model_dir, device: torch.device, max_batch: int = 64, slice_size: int = 32):
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(model_dir), device=str(device), local_files_only=True)
        self._setup(model, max_batch, slice_size)

    @classmethod
    def from_model(cls, model, max_batch: int = 64, slice_size: int = 32) -> "Embedder":
        """An Embedder over an already built SentenceTransformer-like model (tests use a fake)."""
        self = cls.__new__(cls)
        self._setup(model, max_batch, slice_size)
        return self

    def _setup(self, model, max_batch: int, slice_size: int) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") \
            else model.get_sentence_embedding_dimension()
        self.max_seq_length = model.max_seq_length
        self.max_batch = max_batch
        self.slice_size = slice_size
        self._lock = threading.Lock()  # encode_sync callers outside the scheduler still go one at a time
        self._scheduler = FairScheduler(self.encode_sync, slice_size)

    def count_tokens(self, texts: list[str]) -> list[int]:
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def encode_sync(self, texts: list[str]) -> torch.Tensor:
        # -> [len(texts), dim], L2-normalized (cosine similarity = dot product)
        with self._lock, torch.inference_mode():
            return self.model.encode(texts, batch_size=self.max_batch, convert_to_tensor=True,
                                     normalize_embeddings=True, show_progress_bar=False).float().cpu()

    async def encode(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.empty(0, self.dim)
        # Slices of similar lengths pad less (sentence-transformers sorts within a call; slices need it here).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vecs = await self._scheduler.encode([texts[i] for i in order])
        out = torch.empty_like(vecs)
        out[torch.tensor(order)] = vecs
        return out
