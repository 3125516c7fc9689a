"""/v1/embeddings with the default embedding model."""

from __future__ import annotations

import base64

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_embeddings_dimension_and_similarity(client):
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly tax filing deadlines for firms."]
    r = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (3, 384)
    cos = vecs @ vecs.T / np.outer(np.linalg.norm(vecs, axis=1), np.linalg.norm(vecs, axis=1))
    assert cos[0, 1] > cos[0, 2] + 0.2
    assert r.usage.prompt_tokens > 0


def test_embeddings_base64_matches_float(server):
    import httpx

    body = {"model": "all-minilm-l6-v2", "input": "hello world"}
    f = httpx.post(f"{server.base_url}/v1/embeddings", json=body).json()["data"][0]["embedding"]
    b = httpx.post(f"{server.base_url}/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b["data"][0]["embedding"]), dtype=np.float32)
    assert np.allclose(decoded, np.array(f, dtype=np.float32))
