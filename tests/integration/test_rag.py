"""RAG over HTTP against the real server: collections, ingest (JSON and files), search modes,
filters, deletes, limits, and grounded chat with citations (plain, streamed, /chat endpoint)."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest

from tests.conftest import CHAT_MODEL
from tests.integration.rag_corpus import DOCUMENTS, PLANTED, QUERIES, mrr
from tests.integration.rag_files import make_pdf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"{server.base_url}/v1/rag", timeout=120) as c:
        yield c


def new_collection(http, **settings) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    r = http.post("/collections", json={"name": name, **settings})
    assert r.status_code == 200, r.text
    return name


@pytest.fixture(scope="module")
def corpus(http):
    name = new_collection(http)
    r = http.post(f"/collections/{name}/documents",
                  json={"documents": [{"id": d, "text": t, "metadata": {"group": d.split("-")[0]}}
                                      for d, t in DOCUMENTS]})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == len(DOCUMENTS)
    return name


def search(http, name, query, mode="hybrid", top_k=5, **extra):
    r = http.post(f"/collections/{name}/search", json={"query": query, "mode": mode, "top_k": top_k, **extra})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_collection_lifecycle(http):
    name = new_collection(http, chunk_size=64, chunk_overlap=8, metadata={"owner": "tests"})
    info = http.get(f"/collections/{name}").json()
    assert info["embedding_model"] == "all-minilm-l6-v2" and info["dimensions"] == 384
    assert info["chunking"] == {"chunk_size": 64, "chunk_overlap": 8} and info["metadata"] == {"owner": "tests"}
    assert info["num_documents"] == info["num_chunks"] == info["num_vectors"] == 0 and info["size_bytes"] > 0
    assert name in [c["name"] for c in http.get("/collections").json()["data"]]
    assert http.post("/collections", json={"name": name}).status_code == 409
    bad = http.post("/collections", json={"name": "no spaces!"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"
    assert http.post("/collections", json={"name": "x", "chunk_size": 5000}).status_code == 400
    assert http.post("/collections", json={"name": "x", "topk": 1}).status_code == 400  # typo'd field
    assert http.delete(f"/collections/{name}").json()["deleted"] is True
    r = http.get(f"/collections/{name}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found"
    assert http.post(f"/collections/{name}/search", json={"query": "x"}).status_code == 404


@pytest.mark.parametrize("mode", ["dense", "keyword", "hybrid"])
def test_search_finds_the_planted_passage(http, corpus, mode):
    results = search(http, corpus, "What is the capital of Zubrowka?", mode)
    top = results[0]
    assert top["document_id"] == PLANTED[0]
    assert set(top) >= {"document_id", "chunk_id", "score", "text", "metadata"}
    assert "Lutz" in top["text"] and top["metadata"] == {"group": "planted"}
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:]))


def test_hybrid_beats_dense_and_keyword_on_a_mixed_query_set(http, corpus):
    scores = {}
    for mode in ("dense", "keyword", "hybrid"):
        ranked = [[r["document_id"] for r in search(http, corpus, q, mode)] for q, _, _ in QUERIES]
        scores[mode] = mrr(ranked, [d for _, d, _ in QUERIES])
    assert scores["hybrid"] > scores["dense"] and scores["hybrid"] > scores["keyword"], scores


def test_metadata_filter(http, corpus):
    got = search(http, corpus, "What does error E7731 mean?", filter={"group": "sem"})
    assert got and all(r["metadata"]["group"] == "sem" for r in got)
    got = search(http, corpus, "coolant sensor", mode="keyword", filter={"group": {"$in": ["x", "planted"]}})
    assert got == []
    r = http.post(f"/collections/{corpus}/search", json={"query": "x", "filter": {"$bad": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "filter"


def test_documents_get_list_replace_delete(http):
    name = new_collection(http, chunk_size=32, chunk_overlap=8)
    text = "# Otters\n\n" + " ".join(f"Sea otters hold hands while sleeping, fact {i}." for i in range(20))
    r = http.post(f"/collections/{name}/documents", json={"documents": [{"id": "otters", "text": text}]})
    assert r.status_code == 200 and r.json()["num_chunks"] > 3
    doc = http.get(f"/collections/{name}/documents/otters", params={"include_chunks": True}).json()
    assert doc["text"] == text and doc["num_chunks"] == len(doc["chunks"])
    for c in doc["chunks"]:
        assert text[c["start"]:c["end"]] == c["text"] and c["heading"] == "Otters"
    assert [c["position"] for c in doc["chunks"]] == list(range(doc["num_chunks"]))
    assert [d["id"] for d in http.get(f"/collections/{name}/documents").json()["data"]] == ["otters"]
    dup = http.post(f"/collections/{name}/documents", json={"documents": [{"id": "otters", "text": "x"}]})
    assert dup.status_code == 409
    r = http.put(f"/collections/{name}/documents/otters", json={"text": "Beavers build dams.", "metadata": {"v": 2}})
    assert r.status_code == 200 and r.json()["num_replaced_chunks"] == doc["num_chunks"]
    assert search(http, name, "otters hold hands", "keyword") == []
    info = http.get(f"/collections/{name}").json()
    assert info["num_chunks"] == info["num_vectors"] == 1
    assert http.delete(f"/collections/{name}/documents/otters").json()["deleted"] is True
    assert http.get(f"/collections/{name}/documents/otters").status_code == 404
    assert http.delete(f"/collections/{name}/documents/otters").status_code == 404
    for mode in ("dense", "keyword", "hybrid"):
        assert search(http, name, "Beavers build dams", mode) == []
    info = http.get(f"/collections/{name}").json()
    assert info["num_documents"] == info["num_chunks"] == info["num_vectors"] == 0
    http.delete(f"/collections/{name}")


def test_file_uploads(http):
    name = new_collection(http)
    files = [
        ("files", ("notes.md", b"# Llamas\n\nLlamas hum to communicate with their herd.\n", "text/markdown")),
        ("files", ("page.html", b"<html><body><h1>Axolotls</h1><p>Axolotls regrow lost limbs.</p>"
                                b"<script>ignore()</script></body></html>", "text/html")),
        ("files", ("facts.txt", b"Octopuses have three hearts.", "text/plain")),
        ("files", ("report.pdf", make_pdf(["Capybaras are the largest rodents on Earth."]), "application/pdf")),
    ]
    r = http.post(f"/collections/{name}/documents", files=files, data={"metadata": json.dumps({"src": "upload"})})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 4
    for query, filename in [("llamas hum", "notes.md"), ("axolotl limbs", "page.html"),
                            ("octopus hearts", "facts.txt"), ("largest rodent", "report.pdf")]:
        top = search(http, name, query)[0]
        assert top["metadata"] == {"src": "upload", "filename": filename}, (query, top)
    assert "ignore()" not in json.dumps(search(http, name, "axolotl", top_k=10))
    # a broken PDF: 400 naming it, and nothing of the request stays (the good file neither)
    before = http.get(f"/collections/{name}").json()["num_documents"]
    r = http.post(f"/collections/{name}/documents", files=[
        ("files", ("good.txt", b"Narwhal tusks are teeth.", "text/plain")),
        ("files", ("broken.pdf", b"%PDF-1.4\nthis is not really a pdf", "application/pdf"))])
    assert r.status_code == 400 and "broken.pdf" in r.json()["error"]["message"]
    r = http.post(f"/collections/{name}/documents", files=[("files", ("x.exe", b"MZ", "application/octet-stream"))])
    assert r.status_code == 400 and "x.exe" in r.json()["error"]["message"]
    assert http.get(f"/collections/{name}").json()["num_documents"] == before
    assert search(http, name, "narwhal tusks", "keyword") == []
    http.delete(f"/collections/{name}")


def test_large_inputs_are_bounded(http):
    name = new_collection(http, chunk_size=8, chunk_overlap=0)
    big = "word " * (8 * 2100)  # > 2000 chunks of 8 tokens
    r = http.post(f"/collections/{name}/documents", json={"documents": [{"text": big}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_chunks"
    huge = b"a " * (3 * 1024 * 1024)  # 6 MB file > 5 MB per-file limit
    r = http.post(f"/collections/{name}/documents", files=[("files", ("huge.txt", huge, "text/plain"))])
    assert r.status_code == 413 and "huge.txt" in r.json()["error"]["message"]
    assert http.post(f"/collections/{name}/documents", json={"documents": []}).status_code == 400
    assert http.post(f"/collections/{name}/documents", json={"documents": [{"text": ""}]}).status_code == 400
    assert http.get(f"/collections/{name}").json()["num_chunks"] == 0
    http.delete(f"/collections/{name}")


def _prefix_hits(server) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    m = re.search(rf'^frontier_prefix_cache_hits_total\{{model="{CHAT_MODEL}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else -1.0


def test_chat_with_rag_cites_the_right_document(client, server, corpus):
    rag = {"collection": corpus, "top_k": 3, "mode": "hybrid"}
    question = [{"role": "user", "content": "What is the capital of Zubrowka?"}]
    hits0 = _prefix_hits(server)
    r = client.chat.completions.create(model=CHAT_MODEL, messages=question, max_tokens=12, temperature=0,
                                       extra_body={"rag": rag})
    citations = r.model_extra["citations"]
    assert citations and {"index", "document_id", "chunk_id", "score", "text"} <= set(citations[0])
    assert [c["index"] for c in citations] == list(range(1, len(citations) + 1))
    best = max(citations, key=lambda c: c["score"])
    assert best["document_id"] == PLANTED[0]
    assert r.choices[0].message.content and r.usage.prompt_tokens > 60
    # same sources again: the sources system message comes first, so the prefix cache serves it
    client.chat.completions.create(model=CHAT_MODEL, messages=question, max_tokens=4, temperature=0,
                                   extra_body={"rag": rag})
    models = httpx.get(f"{server.base_url}/v1/models").json()["data"]
    if any(m["id"] == CHAT_MODEL and m.get("engine") == "native" for m in models):  # the engine with a prefix cache
        assert hits0 >= 0 and _prefix_hits(server) - hits0 >= 32

    stream = client.chat.completions.create(model=CHAT_MODEL, messages=question, max_tokens=6, temperature=0,
                                            stream=True, extra_body={"rag": rag})
    chunks = list(stream)
    assert chunks[0].model_extra.get("citations") == citations
    assert all("citations" not in (c.model_extra or {}) for c in chunks[1:])

    bad = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60, json={
        "model": CHAT_MODEL, "messages": question, "rag": {"collection": "does-not-exist"}})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "collection_not_found"
    bad = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60, json={
        "model": CHAT_MODEL, "messages": question, "rag": {"collection": corpus, "top_k": 0}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rag.top_k"


def test_collection_chat_endpoint(http, corpus):
    r = http.post(f"/collections/{corpus}/chat", json={"query": "What does error E7733 mean?", "top_k": 2,
                                                       "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["citations"]
    assert "lex-errC" in [c["document_id"] for c in body["citations"]]


def test_rag_metrics(server, corpus):
    text = httpx.get(f"{server.base_url}/metrics").text
    assert "frontier_rag_ingest_latency_seconds_bucket" in text
    assert "frontier_rag_search_latency_seconds_bucket" in text
    m = re.search(rf'^frontier_rag_chunks\{{collection="{corpus}"\}} (\S+)$', text, re.M)
    v = re.search(rf'^frontier_rag_vectors\{{collection="{corpus}"\}} (\S+)$', text, re.M)
    assert m and v and float(m.group(1)) == float(v.group(1)) == len(DOCUMENTS)
