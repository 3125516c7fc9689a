"""POST /v1/embeddings with a fake embedder (tests/unit/rag_fakes.py: hashed bag of words over the
real tokenizer) in the real app (issue #10): shapes, base64, dimensions, token-id input, limits."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.unit.fake_engine import EMBED, assert_envelope, build_app, run
from tests.unit.rag_fakes import TokenizerEmbedder, hash_vector


@pytest.fixture
def app(tmp_path, chat_tokenizer):
    return build_app(tmp_path, embedder=TokenizerEmbedder(chat_tokenizer, dim=32), max_embedding_inputs=4)


def post(body):
    async def scenario(client):
        return await client.post("/v1/embeddings", json=body)

    return scenario


def test_float_embeddings_shape_and_usage(app, chat_tokenizer):
    texts = ["the lighthouse keeper", "fresh bread", "the lighthouse keeper"]
    r = run(app, post({"input": texts}))  # no model: settings.default_embedding_model
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == EMBED
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and all(d["object"] == "embedding" for d in body["data"])
    vecs = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert vecs.shape == (3, 32)
    np.testing.assert_allclose(vecs[0], hash_vector(texts[0], 32), rtol=1e-6)
    np.testing.assert_allclose(vecs[0], vecs[2])
    n_tokens = sum(len(chat_tokenizer.encode(t)) for t in texts)
    assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}


def test_base64_equals_float(app):
    async def scenario(client):
        f = await client.post("/v1/embeddings", json={"model": EMBED, "input": "fresh bread"})
        b = await client.post("/v1/embeddings", json={"model": EMBED, "input": "fresh bread",
                                                      "encoding_format": "base64"})
        return f, b

    f, b = run(app, scenario)
    decoded = np.frombuffer(base64.b64decode(b.json()["data"][0]["embedding"]), dtype=np.float32)
    np.testing.assert_array_equal(decoded, np.array(f.json()["data"][0]["embedding"], dtype=np.float32))


def test_dimensions_truncate_and_renormalize(app):
    vec = np.array(run(app, post({"input": "the lighthouse keeper lights the lamp", "dimensions": 8}))
                   .json()["data"][0]["embedding"])
    assert vec.shape == (8,) and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)


def test_token_id_input_embeds_the_decoded_text(app, chat_tokenizer):
    ids = chat_tokenizer.encode("fresh bread", add_special_tokens=False)
    body = run(app, post({"input": [ids, ids]})).json()
    np.testing.assert_allclose(body["data"][1]["embedding"], hash_vector("fresh bread", 32), rtol=1e-6)


@pytest.mark.parametrize("body, param, code", [
    ({"input": ""}, "input", None),
    ({"input": ["a", "b", "c", "d", "e"]}, "input", "too_many_inputs"),
    ({"input": [[1, 10**7]]}, "input", None),
    ({"input": "x", "dimensions": 64}, "dimensions", None),
])
def test_bad_inputs_are_400(app, body, param, code):
    r = run(app, post(body))
    assert r.status_code == 400, r.text
    assert_envelope(r.json(), "invalid_request_error", code, param)


@pytest.mark.parametrize("truncate,status,code", [(None, 400, "input_too_long"), (-1, 200, None), (16, 200, None),
                                                  (100, 200, None), (8, 400, "unsupported")])
def test_an_input_over_the_limit_is_a_400_unless_truncation_is_asked(tmp_path, chat_tokenizer, truncate, status,
                                                                      code):
    app = build_app(tmp_path, embedder=TokenizerEmbedder(chat_tokenizer, dim=32, max_seq_length=16))
    long_text = "the lighthouse keeper " * 10
    body = {"input": ["fresh bread", long_text]}
    if truncate is not None:
        body["truncate_prompt_tokens"] = truncate
    r = run(app, post(body))
    assert r.status_code == status, r.text
    if code:
        err = assert_envelope(r.json(), "invalid_request_error", code)
        assert ("input 1 has" in err["message"]) == (code == "input_too_long")
    else:
        assert r.json()["usage"]["prompt_tokens"] == len(chat_tokenizer.encode("fresh bread")) + 16
