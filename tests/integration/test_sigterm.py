"""Graceful stop (issue #16): SIGTERM a real server while 16 streams, a non-streamed chat and a RAG
ingest are in flight. Every stream ends with a final event (a finish_reason, or an error event)
and `data: [DONE]`; the non-streamed request is answered (200, or 503 in the envelope); the ingest
is acknowledged and then present after a restart (index saved at shutdown, not rebuilt), or refused
in the envelope; new requests during the drain get 503 + Retry-After in the envelope; exit code 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

DRAIN_S = 6.0


def _env(data_dir) -> dict[str, str]:
    return {"FRONTIER_DATA_DIR": str(data_dir), "FRONTIER_QUANTIZATION": "none",
            "FRONTIER_SHUTDOWN_DRAIN_S": str(DRAIN_S), "FRONTIER_SHUTDOWN_GRACE_S": "20",
            "FRONTIER_RAG_SAVE_INTERVAL_S": "3600"}  # only the shutdown saves the index


def _envelope_ok(body: dict, code: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert err["message"] and err["type"]
    if code:
        assert err["code"] == code, body


def _stream(base: str, max_tokens: int, started: threading.Event, out: dict) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    events: list = []
    out["events"] = events
    try:
        with httpx.Client(base_url=base, timeout=120) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                started.set()
    except httpx.HTTPError as exc:
        out["exc"] = repr(exc)
    finally:
        started.set()


def test_sigterm_drains_streams_ingest_and_exits_zero(chat_model_dir, embed_model_dir, tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(_env(data), tmp_path / "server1.log")
    try:
        srv.wait_ready()
        base = srv.base_url
        r = httpx.post(f"{base}/v1/rag/collections", json={"name": "docs", "chunk_size": 32}, timeout=60)
        assert r.status_code == 200, r.text
        # 8 short streams that finish within the drain, 8 long ones that cannot (ended with an error event)
        results = [{} for _ in range(16)]
        started = [threading.Event() for _ in range(16)]
        threads = [threading.Thread(target=_stream, args=(base, 4 if i % 2 else 400, started[i], results[i]))
                   for i in range(16)]
        for t in threads:
            t.start()
        for e in started:
            assert e.wait(120), "a stream never started"
        non_streamed: dict = {}

        def chat():
            try:
                non_streamed["r"] = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
                    "messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 400,
                    "ignore_eos": True})
            except httpx.HTTPError as exc:
                non_streamed["exc"] = repr(exc)

        ingest: dict = {}
        docs = [{"id": f"doc-{i}", "text": f"Lighthouse record {i} keyword zq{i}x. " + "The keeper wrote notes. " * 40}
                for i in range(24)]

        def add():
            try:
                ingest["r"] = httpx.post(f"{base}/v1/rag/collections/docs/documents", json={"documents": docs},
                                         timeout=120)
            except httpx.HTTPError as exc:
                ingest["exc"] = repr(exc)

        others = [threading.Thread(target=chat), threading.Thread(target=add)]
        for t in others:
            t.start()
        time.sleep(0.3)  # both are in flight (the ingest embeds 24 documents beside 16 streams)
        t_term = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the drain begins on the server's next tick (0.1 s)
        late = httpx.post(f"{base}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert late.status_code == 503, late.text
        assert int(late.headers["retry-after"]) >= 1
        _envelope_ok(late.json(), "server_shutting_down")
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # liveness during the drain
        assert srv.proc.wait(DRAIN_S + 60) == 0, srv.log_path.read_text()[-3000:]
        stop_s = time.monotonic() - t_term
        for t in threads + others:
            t.join(30)
    finally:
        srv.stop()
    assert stop_s < DRAIN_S + 25, stop_s

    ended_by_error = 0
    for i, res in enumerate(results):
        assert res.get("status") == 200 and "exc" not in res, (i, res)
        events = res["events"]
        assert events[-1] == "[DONE]", (i, events[-3:])
        last = events[-2]
        if "error" in last:
            _envelope_ok(last, "server_shutting_down")
            ended_by_error += 1
        else:
            assert last["choices"] and last["choices"][0]["finish_reason"] in ("stop", "length"), (i, last)
    assert ended_by_error >= 1  # the 400-token streams cannot finish in the drain time
    assert all("error" not in e for r in results[1::2] for e in r["events"][:-1] if e != "[DONE]"), \
        "a short stream should have finished within the drain time"

    assert "exc" not in non_streamed, non_streamed
    resp = non_streamed["r"]
    if resp.status_code == 200:
        assert resp.json()["choices"][0]["finish_reason"] == "length"
    else:
        assert resp.status_code == 503, resp.text
        _envelope_ok(resp.json(), "server_shutting_down")

    assert "exc" not in ingest, ingest
    acked = ingest["r"].status_code == 200
    if not acked:
        assert ingest["r"].status_code == 503, ingest["r"].text
        _envelope_ok(ingest["r"].json())

    srv = ServerProcess(_env(data), tmp_path / "server2.log")
    try:
        srv.wait_ready()
        with httpx.Client(base_url=f"{srv.base_url}/v1/rag/collections", timeout=60) as c:
            info = c.get("/docs").json()
            assert info["index"]["state"] == "loaded", info["index"]  # saved at shutdown, nothing rebuilt
            if acked:
                assert info["num_documents"] == len(docs)
                assert info["num_vectors"] == info["num_chunks"] > 0
                hits = c.post("/docs/search", json={"query": "zq7x", "mode": "keyword", "top_k": 1}).json()["results"]
                assert hits and hits[0]["document_id"] == "doc-7"
            else:
                assert info["num_documents"] == 0
    finally:
        srv.stop()
