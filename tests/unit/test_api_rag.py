"""/v1/rag/* and the chat `rag` extension over the real app (issue #10): collections, documents,
search, grounded chat with citations (streamed and not), 404 shapes, and `rag` + `reasoning` in
one chat request. Embeddings: tests/unit/rag_fakes.py's hashed bag of words over the real tokenizer;
the chat model: the scripted engine."""

from __future__ import annotations

import pytest

from tests.unit.fake_engine import (CHAT, EMBED, ScriptedEngine, assert_envelope, build_app, run, sse_events,
                                    user)
from tests.unit.rag_fakes import TokenizerEmbedder

DOCS = [
    {"id": "lighthouse", "text": "The lighthouse keeper lights the lamp at dusk every evening.", "metadata": {"k": 1}},
    {"id": "bakery", "text": "The bakery sells fresh bread and rolls each morning.", "metadata": {"k": 2}},
]
REPLY = "The keeper lights the lamp at dusk [1]."


@pytest.fixture
def make(tmp_path, chat_tokenizer):
    def build(script=REPLY, max_model_len=2048):
        engine = ScriptedEngine(chat_tokenizer, script, max_model_len=max_model_len)
        return engine, build_app(tmp_path, engine, TokenizerEmbedder(chat_tokenizer))

    return build


async def filled(client, name="docs", docs=DOCS):
    r = await client.post("/v1/rag/collections", json={"name": name})
    assert r.status_code == 200, r.text
    r = await client.post(f"/v1/rag/collections/{name}/documents", json={"documents": docs})
    assert r.status_code == 200, r.text
    return r


def test_collection_and_document_lifecycle(make):
    _, app = make()

    async def scenario(client):
        added = await filled(client)
        listed = await client.get("/v1/rag/collections")
        described = await client.get("/v1/rag/collections/docs")
        docs = await client.get("/v1/rag/collections/docs/documents")
        one = await client.get("/v1/rag/collections/docs/documents/bakery", params={"include_chunks": True})
        found = await client.post("/v1/rag/collections/docs/search", json={"query": "when is the lamp lit?",
                                                                           "top_k": 1})
        deleted_doc = await client.delete("/v1/rag/collections/docs/documents/bakery")
        deleted = await client.delete("/v1/rag/collections/docs")
        gone = await client.get("/v1/rag/collections/docs")
        return added, listed, described, docs, one, found, deleted_doc, deleted, gone

    added, listed, described, docs, one, found, deleted_doc, deleted, gone = run(app, scenario)
    assert [d["id"] for d in added.json()["data"]] == ["lighthouse", "bakery"] and added.json()["num_chunks"] == 2
    assert [c["name"] for c in listed.json()["data"]] == ["docs"]
    assert described.json()["embedding_model"] == EMBED and described.json()["object"] == "rag.collection"
    assert {d["id"] for d in docs.json()["data"]} == {"lighthouse", "bakery"}
    assert one.json()["object"] == "rag.document" and len(one.json()["chunks"]) == 1
    body = found.json()
    assert body["object"] == "list" and body["collection"] == "docs" and body["mode"] == "hybrid"
    assert [r["document_id"] for r in body["results"]] == ["lighthouse"]
    assert deleted_doc.json() == {"object": "rag.document.deleted", "id": "bakery", "deleted": True, "num_chunks": 1}
    assert deleted.json() == {"object": "rag.collection.deleted", "name": "docs", "deleted": True}
    assert gone.status_code == 404


def test_replace_and_upload_documents(make):
    _, app = make()

    async def scenario(client):
        await filled(client)
        replaced = await client.put("/v1/rag/collections/docs/documents/bakery",
                                    json={"text": "The bakery now sells only cakes.", "metadata": {"k": 3}})
        uploaded = await client.post("/v1/rag/collections/docs/documents",
                                     files={"file": ("notes.txt", b"The harbour master logs every ship.",
                                                     "text/plain")}, data={"metadata": '{"k": 4}'})
        found = await client.post("/v1/rag/collections/docs/search", json={"query": "cakes", "mode": "keyword",
                                                                           "top_k": 1})
        doc = await client.get("/v1/rag/collections/docs/documents/bakery")
        upload = await client.get(f"/v1/rag/collections/docs/documents/{uploaded.json()['data'][0]['id']}")
        return replaced, uploaded, found, doc, upload

    replaced, uploaded, found, doc, upload = run(app, scenario)
    assert replaced.status_code == 200 and replaced.json()["num_replaced_chunks"] == 1, replaced.text
    assert uploaded.status_code == 200 and uploaded.json()["num_chunks"] == 1, uploaded.text
    assert [r["document_id"] for r in found.json()["results"]] == ["bakery"]
    assert (doc.json()["text"], doc.json()["metadata"]) == ("The bakery now sells only cakes.", {"k": 3})
    up = upload.json()
    assert (up["text"], up["metadata"], up["source"]) == ("The harbour master logs every ship.",
                                                          {"k": 4, "filename": "notes.txt"}, "notes.txt")


@pytest.mark.parametrize("method, path, body, code", [
    ("GET", "/v1/rag/collections/missing", None, "collection_not_found"),
    ("DELETE", "/v1/rag/collections/missing", None, "collection_not_found"),
    ("POST", "/v1/rag/collections/missing/search", {"query": "lamp"}, "collection_not_found"),
    ("POST", "/v1/rag/collections/missing/documents", {"documents": [{"text": "x"}]}, "collection_not_found"),
    ("POST", "/v1/rag/collections/missing/chat", {"query": "lamp"}, "collection_not_found"),
    ("POST", "/v1/chat/completions", {"messages": user("lamp"), "rag": {"collection": "missing"}},
     "collection_not_found"),
    ("GET", "/v1/rag/collections/docs/documents/nope", None, "document_not_found"),
])
def test_missing_things_are_404_envelopes(make, method, path, body, code):
    engine, app = make()

    async def scenario(client):
        await filled(client)
        return await client.request(method, path, json=body)

    r = run(app, scenario)
    assert r.status_code == 404, r.text
    assert_envelope(r.json(), "not_found_error", code)
    assert engine.requests == []


def test_bad_rag_spec_is_400_naming_the_field(make):
    _, app = make()
    r = run(app, lambda client: client.post("/v1/chat/completions", json={
        "messages": user("x"), "rag": {"collection": "docs", "top_k": 0}}))
    assert r.status_code == 400
    assert_envelope(r.json(), "invalid_request_error", param="rag.top_k")


def _check_grounded(engine, body):
    assert body["choices"][0]["message"]["content"] == REPLY
    cites = body["citations"]
    assert cites and cites[0]["document_id"] == "lighthouse"
    assert set(cites[0]) == {"index", "document_id", "chunk_id", "score", "text"}
    assert [c["index"] for c in cites] == list(range(1, len(cites) + 1))
    prompt = engine.tokenizer.decode(engine.requests[0].prompt_token_ids)
    assert "[1] (document: " in prompt and DOCS[0]["text"] in prompt  # the sources went to the model
    assert prompt.index("Sources:") < prompt.index("when is the lamp lit?")


@pytest.mark.parametrize("route", ["chat", "rag_chat"])
def test_grounded_chat_answers_with_citations(make, route):
    engine, app = make()

    async def scenario(client):
        await filled(client)
        if route == "chat":
            return await client.post("/v1/chat/completions", json={
                "model": CHAT, "messages": user("when is the lamp lit?"), "rag": {"collection": "docs", "top_k": 2}})
        return await client.post("/v1/rag/collections/docs/chat", json={"query": "when is the lamp lit?", "top_k": 2})

    r = run(app, scenario)
    assert r.status_code == 200, r.text
    _check_grounded(engine, r.json())


def test_grounded_chat_streamed_sends_citations_first(make):
    engine, app = make()

    async def scenario(client):
        await filled(client)
        return await client.post("/v1/chat/completions", json={
            "messages": user("when is the lamp lit?"), "rag": {"collection": "docs"}, "stream": True})

    r = run(app, scenario)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    first, rest = events[0], events[1:-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["citations"][0]["document_id"] == "lighthouse"
    assert all("citations" not in c for c in rest)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in rest) == REPLY


def test_rag_and_reasoning_in_one_request(make, chat_tokenizer):
    """Both stages in one chat request: the answer is grounded (citations) and reasoned (a thought)."""
    engine, app = make(f"<think>Source 1 says dusk.</think>{REPLY}")

    async def scenario(client):
        await filled(client)
        return await client.post("/v1/chat/completions", json={
            "messages": user("when is the lamp lit?"), "rag": {"collection": "docs"},
            "reasoning": {"max_tokens": 64}, "max_tokens": 64})

    r = run(app, scenario)
    assert r.status_code == 200, r.text
    body = r.json()
    msg = body["choices"][0]["message"]
    assert (msg["content"], msg["reasoning_content"]) == (REPLY, "Source 1 says dusk.")
    assert body["citations"][0]["document_id"] == "lighthouse"
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    prompt = chat_tokenizer.decode(engine.requests[0].prompt_token_ids)
    assert "Sources:" in prompt and "think step by step" in prompt


def test_rag_and_reasoning_share_one_token_budget(make):
    """Sources that fill the context must leave room for the thinking budget too: grounding keeps
    fewer sources, the request is answered (not a 400 context_length_exceeded)."""
    engine, app = make(f"<think>Source 1 says dusk.</think>{REPLY}", max_model_len=1024)
    long_docs = [{"id": f"d{i}", "text": f"The lighthouse lamp note {i}: " + "the keeper climbs the stairs. " * 12}
                 for i in range(12)]

    async def scenario(client):
        await filled(client, docs=long_docs)
        return await client.post("/v1/chat/completions", json={
            "messages": user("when is the lighthouse lamp lit?"), "rag": {"collection": "docs", "top_k": 12},
            "reasoning_effort": "low", "max_tokens": 32})

    r = run(app, scenario)
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0 < len(body["citations"]) < 12
    assert body["choices"][0]["message"]["reasoning_content"] == "Source 1 says dusk."
    req = engine.requests[0]
    assert len(req.prompt_token_ids) + req.sampling.max_tokens <= 1024
