"""Issue #16, RAG part: hostile input never costs a 500, a lockout or data. One test per reproducer
(2: '..' ids; 5: lone surrogates stored for good, damaged collections; 6: 500s for bad Unicode, big
integers, deep nesting); each gets its 4xx, then checks the collection still answers normally.
In-process: the real /v1/rag router and error handlers over a RagStore with the fake embedder."""

from __future__ import annotations

import json
import sqlite3

import pytest
from fastapi.testclient import TestClient

from service.rag.errors import RagError
from service.rag.grounding import parse_spec
from service.rag.validate import MAX_DEPTH, check_json, readable_json
from tests.unit.rag_fakes import make_rag_app

R = "/v1/rag/collections"
KEEP = {"id": "keep", "text": "Otters hold hands while they sleep.", "metadata": {"kind": "animal", "n": 7}}


@pytest.fixture
def root(tmp_path):
    return tmp_path / "rag"


def client(root) -> TestClient:
    return TestClient(make_rag_app(root), raise_server_exceptions=False)


def setup_collection(c, name="c"):
    assert c.post(R, json={"name": name, "metadata": {"team": "zoo"}}).status_code == 200
    r = c.post(f"{R}/{name}/documents", json={"documents": [KEEP]})
    assert r.status_code == 200, r.text


def assert_healthy(c, name="c"):
    """list, get, list documents, get document and a filtered search all answer, with only what was accepted."""
    r = c.get(R)
    assert r.status_code == 200, r.text
    assert {x["name"]: x["status"] for x in r.json()["data"]}[name] == "ready"
    r = c.get(f"{R}/{name}")
    assert r.status_code == 200 and r.json()["num_documents"] == 1 and r.json()["metadata"] == {"team": "zoo"}
    r = c.get(f"{R}/{name}/documents")
    assert r.status_code == 200 and [d["id"] for d in r.json()["data"]] == ["keep"]
    assert c.get(f"{R}/{name}/documents/keep").json()["text"] == KEEP["text"]
    r = c.post(f"{R}/{name}/search", json={"query": "otters sleep", "filter": {"kind": "animal"}})
    assert r.status_code == 200 and [x["document_id"] for x in r.json()["results"]] == ["keep"]


def expect(r, param, status=400):
    """The status, and a param naming the field (or a place inside it, e.g. metadata.k)."""
    assert r.status_code == status, r.text
    got = r.json()["error"]["param"] or ""
    assert got == param or got.startswith(param + "."), r.json()


def raw(c, method, url, body: str):
    """Send JSON text as is: lone surrogates (\\ud800) and NaN are only expressible this way."""
    return c.request(method, url, content=body.encode(), headers={"content-type": "application/json"})


# ---- reproducer 2: ids that are path segments ----
def test_2_dot_segment_ids_are_400s_and_never_reach_the_collection(root):
    with client(root) as c:
        setup_collection(c)
        for bad in [".", "..", "a/b", "a\\b", "a\nb", "tail\n", "\x7f", "", "x" * 257]:
            expect(c.post(f"{R}/c/documents", json={"documents": [{"id": bad, "text": "x"}]}), "documents.0.id")
        r = c.post(f"{R}/c/documents", files={"file": ("a.txt", b"hello", "text/plain")}, data={"id": ".."})
        expect(r, "id")
        # Clients that do not normalise send the segment encoded: it reaches the route and is refused
        # (before the fix '..' was ingested, and DELETE .../documents/.. deleted the collection).
        for seg in ["%2E%2E", "%2E", "a%5Cb", "a%0A", "x" * 257]:
            expect(c.delete(f"{R}/c/documents/{seg}"), "document_id")
            expect(c.get(f"{R}/c/documents/{seg}"), "document_id")
            expect(c.put(f"{R}/c/documents/{seg}", json={"text": "x"}), "document_id")
        for bad in [".", "..", "a/b", "a\\b", "c\n", "", "x" * 65, "-lead"]:
            expect(c.post(R, json={"name": bad}), "name")
        for seg in ["%2E%2E", "%2E", "a%5Cb", "c%0A"]:
            expect(c.get(f"{R}/{seg}"), "collection")
            expect(c.delete(f"{R}/{seg}"), "collection")
            expect(c.post(f"{R}/{seg}/search", json={"query": "x"}), "collection")
        assert sorted(p.name for p in root.iterdir()) == ["c"]  # no directory for a refused name
        assert_healthy(c)


# ---- reproducer 5: persistent poisoning ----
def test_5_lone_surrogates_are_refused_and_nothing_is_stored(root):
    with client(root) as c:
        setup_collection(c)
        r = raw(c, "POST", R, '{"name": "s", "metadata": {"k": "\\ud800"}}')
        expect(r, "metadata")  # before the fix: a 500, yet the collection was created
        expect(c.get(f"{R}/s"), "collection", 404)
        for meta in ['{"k": "\\ud800"}', '{"\\udc00": 1}', '{"k": ["ok", {"deep": "\\udfff"}]}']:
            r = raw(c, "POST", f"{R}/c/documents", f'{{"documents": [{{"id": "m", "text": "x", "metadata": {meta}}}]}}')
            expect(r, "documents.0.metadata")
            assert "metadata" in r.json()["error"]["message"]
        r = c.post(f"{R}/c/documents", files={"file": ("a.txt", b"hello", "text/plain")},
                   data={"metadata": '{"k": "\\ud800"}'})
        expect(r, "metadata")
        assert_healthy(c)
    with client(root) as c:  # and after a restart
        assert_healthy(c)


def test_5_poisoned_or_damaged_collections_never_break_the_others(root):
    with client(root) as c:
        setup_collection(c)
        for name in ("legacy", "badmeta", "garbage"):
            assert c.post(R, json={"name": name}).status_code == 200
        r = c.post(f"{R}/legacy/documents", json={"documents": [{"id": "p", "text": "old row", "metadata": {"k": 1}}]})
        assert r.status_code == 200
    # What older versions wrote (or a disk damaged): a lone surrogate and NaN in stored metadata,
    # settings that are not JSON, a database file that is not a database.
    with sqlite3.connect(root / "legacy" / "store.sqlite3") as db:
        db.execute("""UPDATE documents SET metadata = '{"k": "\\ud800", "x": NaN}'""")
        settings = json.loads(db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()[0])
        settings["metadata"] = {"t": "\udc00"}  # json.dumps writes it as the escape \udc00, as older versions did
        db.execute("UPDATE meta SET value = ? WHERE key = 'settings'", (json.dumps(settings),))
    with sqlite3.connect(root / "badmeta" / "store.sqlite3") as db:
        db.execute("UPDATE meta SET value = '{not json' WHERE key = 'settings'")
    (root / "garbage" / "store.sqlite3").write_bytes(b"this is not a database" * 100)
    with client(root) as c:
        r = c.get(R)
        assert r.status_code == 200, r.text  # before the fix: 500 for everyone
        state = {x["name"]: x for x in r.json()["data"]}
        assert {n: x["status"] for n, x in state.items()} == {
            "badmeta": "damaged", "c": "ready", "garbage": "damaged", "legacy": "ready"}
        assert state["badmeta"]["reason"] and str(root) not in state["badmeta"]["reason"]
        # legacy rows read back, repaired (U+FFFD, null) instead of failing every read
        assert state["legacy"]["metadata"] == {"t": "\ufffd"}
        doc = c.get(f"{R}/legacy/documents/p").json()
        assert doc["metadata"] == {"k": "\ufffd", "x": None}
        assert c.get(f"{R}/legacy/documents").status_code == 200
        assert c.post(f"{R}/legacy/search", json={"query": "old row"}).json()["results"][0]["document_id"] == "p"
        # a damaged collection says so, refuses work with a 409, and can be dropped
        assert c.get(f"{R}/garbage").json()["status"] == "damaged"
        r = c.post(f"{R}/garbage/search", json={"query": "x"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "collection_damaged"
        for name in ("garbage", "badmeta"):
            assert c.delete(f"{R}/{name}").status_code == 200
        assert sorted(x["name"] for x in c.get(R).json()["data"]) == ["c", "legacy"]
        assert_healthy(c)


# ---- reproducer 6: 500s instead of 400s ----
def test_6_bad_unicode_big_integers_and_deep_nesting_are_400s(root):
    deep = lambda n: '{"a": ' * n + "1" + "}" * n  # noqa: E731
    with client(root) as c:
        setup_collection(c)
        cases = [
            (R, '{"name": "\\ud800"}', "name"),
            (R, '{"name": "ok", "metadata": {"n": 1180591620717411303424}}', "metadata"),
            (R, f'{{"name": "ok", "metadata": {deep(MAX_DEPTH + 1)}}}', "metadata"),
            (f"{R}/c/documents", '{"documents": [{"text": "a \\ud800"}]}', "documents.0.text"),
            (f"{R}/c/documents", '{"documents": [{"text": "x", "metadata": {"n": 1180591620717411303424}}]}',
             "documents.0.metadata"),
            (f"{R}/c/documents", '{"documents": [{"text": "x", "metadata": {"n": NaN}}]}', "documents.0.metadata"),
            (f"{R}/c/documents", f'{{"documents": [{{"text": "x", "metadata": {deep(40)}}}]}}', "documents.0.metadata"),
            (f"{R}/c/documents", f'{{"documents": [{{"text": "x", "metadata": {deep(5000)}}}]}}', None),
            (f"{R}/c/documents", '{"documents": [{"text": "x", "metadata": {"n": 1%s}}]}' % ("0" * 5000), None),
            (f"{R}/c/documents/keep", '{"text": "x", "metadata": {"\\ud800": 1}}', "metadata"),
            (f"{R}/c/search", '{"query": "a \\ud800"}', "query"),
            (f"{R}/c/search", '{"query": "a", "filter": {"n": 1180591620717411303424}}', "filter"),
            (f"{R}/c/search", '{"query": "a", "filter": {"n": {"$in": [-1180591620717411303424]}}}', "filter"),
            (f"{R}/c/search", '{"query": "a", "filter": {"k": "\\ud800"}}', "filter"),
            (f"{R}/c/search", '{"query": "a", "filter": {"\\ud800": 1}}', "filter"),
            (f"{R}/c/search", f'{{"query": "a", "filter": {{"$and": [{deep(40)}]}}}}', "filter"),
            (f"{R}/c/search", f'{{"query": "a", "filter": {deep(5000)}}}', None),
            (f"{R}/c/chat", '{"query": "a", "filter": {"k": "\\ud800"}}', "filter"),
            (f"{R}/c/chat", '{"query": "a", "filter": {"n": 1180591620717411303424}}', "filter"),
        ]
        for url, body, param in cases:
            method = "PUT" if url.endswith("/keep") else "POST"
            r = raw(c, method, url, body)
            assert r.status_code == 400, (url, body[:80], r.text)
            if param:
                expect(r, param)
        r = c.post(f"{R}/c/documents", files={"file": ("a.txt", b"hello", "text/plain")},
                   data={"metadata": deep(5000)})
        expect(r, "metadata")
        assert c.get(f"{R}/ok").status_code == 404  # no refused create left a collection behind
        assert_healthy(c)


def test_6_checks_never_recurse_and_cover_the_chat_extension():
    nested: dict = {}
    for _ in range(100_000):  # deeper than any recursion limit: a recursive walk would raise RecursionError
        nested = {"a": nested}
    with pytest.raises(RagError) as e:
        check_json(nested, "metadata")
    assert e.value.status == 400 and e.value.param.startswith("metadata.a.a")
    check_json({"ok": [1, -(2 ** 63), 2 ** 63 - 1, 1.5, None, True, "é🙂", {"x": []}]}, "metadata")
    for spec, param in [({"collection": "..", "filter": {}}, "rag.collection"),
                        ({"collection": "c", "filter": {"n": 2 ** 70}}, "rag.filter.n"),
                        ({"collection": "c", "filter": {"k": "\ud800"}}, "rag.filter.k")]:
        with pytest.raises(RagError) as e:
            parse_spec(spec)
        assert e.value.status == 400 and e.value.param == param
    legacy = json.dumps({"k": ["\ud800", float("nan")], "\udc00": 1})  # as rows written before the checks
    assert readable_json(legacy) == {"k": ["\ufffd", None], "\ufffd": 1}
