"""Fakes for the RAG unit tests: a whitespace tokenizer with offsets and a deterministic embedder
(hashed bag of words, L2-normalized: texts sharing words are similar). No model, no download."""

from __future__ import annotations

import asyncio
import hashlib
import re

import numpy as np


class _Encoding:
    def __init__(self, offsets):
        self.offsets = offsets


class WordTokenizer:
    """Words and single punctuation marks are tokens."""

    def __init__(self):
        self.backend_tokenizer = self

    def encode(self, text, add_special_tokens=False):
        return _Encoding([(m.start(), m.end()) for m in re.finditer(r"\w+|[^\w\s]", text)])


def hash_vector(text: str, dim: int) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    for w in re.findall(r"\w+", text.lower()):
        h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        v[h % dim] += 1.0 if (h >> 32) & 1 else -1.0
    n = np.linalg.norm(v)
    return v / n if n else v


class FakeEmbedder:
    def __init__(self, dim: int = 64, max_seq_length: int = 256):
        self.dim, self.max_seq_length = dim, max_seq_length
        self.tokenizer = WordTokenizer()
        self.calls: list[int] = []  # batch sizes

    def encode_sync(self, texts):
        self.calls.append(len(texts))
        return np.stack([hash_vector(t, self.dim) for t in texts])

    async def encode(self, texts):
        return await asyncio.to_thread(self.encode_sync, texts)


class TokenizerEmbedder:
    """What the embeddings route and the RAG store need of service.pool.embedder.Embedder, over a
    real (tiny) tokenizer: token counts from it, hashed bag-of-words vectors."""

    def __init__(self, tokenizer, dim: int = 32, max_seq_length: int = 256):
        self.tokenizer, self.dim, self.max_seq_length = tokenizer, dim, max_seq_length

    def count_tokens(self, texts):
        return [len(self.tokenizer.encode(t)) for t in texts]

    async def encode(self, texts):
        import torch

        if not texts:
            return torch.empty(0, self.dim)
        return torch.from_numpy(np.stack([hash_vector(t, self.dim) for t in texts]))


def random_unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_rag_app(root, **cfg):
    """The /v1/rag router and the real error handlers over a RagStore with FakeEmbedder (model "fake"):
    in-process HTTP tests without a model pool. Use it through fastapi.testclient.TestClient (a `with`
    block runs the lifespan: store start / close)."""
    from contextlib import asynccontextmanager
    from types import SimpleNamespace

    from fastapi import FastAPI

    from service.api.errors import install_error_handlers
    from service.api.routes import rag as rag_routes
    from service.rag.errors import RagError
    from service.rag.store import RagConfig, RagStore

    emb = FakeEmbedder()

    async def embedder_for(model_id):
        if model_id != "fake":
            raise RagError(404, f"no model {model_id}", param="embedding_model")
        return emb

    store = RagStore(root, RagConfig(**{"save_interval_s": 3600, **cfg}), embedder_for)

    @asynccontextmanager
    async def lifespan(_app):
        await store.start()
        try:
            yield
        finally:
            await store.close()

    app = FastAPI(lifespan=lifespan)
    app.state.frontier = SimpleNamespace(rag=store, settings=SimpleNamespace(default_embedding_model="fake"))
    install_error_handlers(app)
    app.include_router(rag_routes.router)
    return app
