"""Helpers for the /v1/responses tests: requests in one app lifetime, named SSE events, and
responses compared without their generated ids."""

from __future__ import annotations

import json

from tests.unit.fake_engine import CHAT, run


def post(body, path="/v1/responses"):
    async def scenario(client):
        return await client.post(path, json=body)

    return scenario


def created(app, **body) -> dict:
    r = run(app, post({"model": CHAT, **body}))
    assert r.status_code == 200, r.text
    return r.json()


def named_events(text: str) -> list[dict]:
    """`event: <type>` + `data: {...}` blocks; each data's type matches its event name."""
    events = []
    for block in filter(None, (b.strip() for b in text.split("\n\n"))):
        name, data = block.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: "), block
        events.append(json.loads(data[len("data: "):]))
        assert events[-1]["type"] == name[len("event: "):]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def without_ids(value):
    """A response with its generated ids and times blanked (two runs of one request compare equal), and
    the SDK's own `parsed` fields (a streamed response's) left out."""
    if isinstance(value, dict):
        return {k: (None if k in ("id", "call_id", "created_at", "completed_at") else without_ids(v))
                for k, v in value.items() if k != "parsed"}
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


def message_text(response: dict) -> str:
    [msg] = [item for item in response["output"] if item["type"] == "message"]
    assert msg["role"] == "assistant" and msg["content"][0]["type"] == "output_text"
    return msg["content"][0]["text"]


def both(app, **body) -> tuple[dict, list[dict]]:
    """(the response, the streamed events) of the same request, in one app lifetime."""
    body = {"model": CHAT, **body}

    async def scenario(client):
        return await client.post("/v1/responses", json=body), await client.post("/v1/responses",
                                                                                json={**body, "stream": True})

    whole, streamed = run(app, scenario)
    assert whole.status_code == 200 and streamed.status_code == 200, (whole.text, streamed.text)
    return whole.json(), named_events(streamed.text)
