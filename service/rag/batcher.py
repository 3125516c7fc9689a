"""Query embeddings in batches: queries that arrive while one batch encodes go together in the next,
so a burst of searches costs a few forward passes instead of one each, with no added wait."""

from __future__ import annotations

import asyncio

import numpy as np


class QueryBatcher:
    """Encodes queries in batches: whatever queued while the previous batch ran goes next."""

    def __init__(self, embedder, max_batch: int | None = None):
        # One embedder slice per batch: the embedder schedules slices round-robin across callers, so a
        # batch of queries waits for about one slice of a large embedding call, not for all of it.
        self.embedder = embedder
        self.max_batch = max_batch or getattr(embedder, "slice_size", 64)
        self.pending: list[tuple[str, asyncio.Future]] = []
        self.running = False

    async def encode(self, text: str) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((text, fut))
        if not self.running:
            self.running = True
            asyncio.create_task(self._run())
        return await fut

    async def _run(self):
        try:
            while self.pending:
                batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch:]
                try:
                    vecs = np.asarray(await self.embedder.encode([t for t, _ in batch]), dtype=np.float32)
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), vec in zip(batch, vecs):
                    if not fut.done():
                        fut.set_result(vec)
        finally:
            self.running = False
