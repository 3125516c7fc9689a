"""One huge /v1/embeddings call must not starve small embedding calls or RAG query embeddings
(issue #16 item 7): the Embedder runs slices round-robin across callers. Fake slow encoder, no model."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import torch

from service.pool.embedder import Embedder
from service.rag.batcher import QueryBatcher

PER_TEXT_S = 0.002  # the fake encoder's cost: a 512-text call takes ~1 s, one 32-text slice ~64 ms


class SlowModel:
    """SentenceTransformer-like: text "t<i>" encodes to the row [i, 1, 0, 0] after PER_TEXT_S per text."""

    tokenizer = None
    max_seq_length = 256

    def __init__(self):
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def get_embedding_dimension(self):
        return 4

    def encode(self, texts, batch_size, convert_to_tensor, normalize_embeddings, show_progress_bar):
        self.batches.append(len(texts))
        self.threads.add(threading.current_thread().name)
        time.sleep(PER_TEXT_S * len(texts))
        return torch.tensor([[float(t[1:]), 1.0, 0.0, 0.0] for t in texts])


def _texts(n, start=0):
    return [f"t{i}" for i in range(start, start + n)]


def test_small_call_finishes_long_before_a_large_call_in_progress():
    model = SlowModel()
    emb = Embedder.from_model(model, slice_size=32)

    async def main():
        big = asyncio.create_task(emb.encode(_texts(512)))
        await asyncio.sleep(0.1)  # the large call is encoding
        t0 = time.monotonic()
        small = await emb.encode(_texts(3, start=10_000))
        waited = time.monotonic() - t0
        big_done_then = big.done()
        return await big, small, waited, big_done_then

    big, small, waited, big_done_then = asyncio.run(main())
    assert not big_done_then, "the small call waited for the whole large call"
    assert waited < 0.4, waited  # about one slice (~64 ms) plus its own, not the ~1 s of the large call
    # Results stay in order and complete, whatever the interleaving.
    assert big[:, 0].tolist() == list(range(512)) and small[:, 0].tolist() == [10_000, 10_001, 10_002]
    assert max(model.batches) <= 32
    # Each slice ran off the event loop, in a short-lived "embed" thread.
    assert model.threads == {"embed"}


def test_rag_query_batcher_is_not_starved_by_an_ingest_sized_call():
    model = SlowModel()
    emb = Embedder.from_model(model, slice_size=32)
    batcher = QueryBatcher(emb)
    assert batcher.max_batch == 32  # one query batch is one embedder slice

    async def main():
        big = asyncio.create_task(emb.encode(_texts(512)))
        await asyncio.sleep(0.1)
        vec = await asyncio.wait_for(batcher.encode("t7"), timeout=0.5)
        done_then = big.done()
        await big
        return vec, done_then

    vec, done_then = asyncio.run(main())
    assert not done_then and np.allclose(vec, [7, 1, 0, 0])


def test_cancelled_caller_stops_using_the_encoder():
    model = SlowModel()
    emb = Embedder.from_model(model, slice_size=32)

    async def main():
        big = asyncio.create_task(emb.encode(_texts(512)))
        await asyncio.sleep(0.1)
        big.cancel()  # e.g. the client disconnected
        return await emb.encode(_texts(2))

    out = asyncio.run(main())
    assert out.shape == (2, 4)
    assert sum(model.batches) < 512 / 2, model.batches  # the rest of the large call was skipped


def test_encoder_error_reaches_its_caller_only():
    class Flaky(SlowModel):
        def encode(self, texts, **kw):
            if "bad" in texts:
                raise ValueError("cannot encode")
            return super().encode(texts, **kw)

    emb = Embedder.from_model(Flaky(), slice_size=32)

    async def main():
        bad = asyncio.create_task(emb.encode(["bad"]))
        good = asyncio.create_task(emb.encode(_texts(40)))
        res = await asyncio.gather(bad, good, return_exceptions=True)
        return res

    bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError) and good.shape == (40, 4)
