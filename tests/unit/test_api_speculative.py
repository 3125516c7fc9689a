"""Speculative decoding around the engine (issue #11): the request's `speculative` field resolved
against the settings and the manifest and handed to the engine, its 400s, the engine's counts as
OpenAI's predicted-output usage fields (chat and completions, streamed and not), and the
per-position acceptance counters in /metrics. The engine's own speculation is tested elsewhere."""

from __future__ import annotations

import pytest

from service.engine.types import SpeculativeParams
from service.metrics import _EngineStatsCollector
from service.pool.drafts import DraftUnavailable
from service.pool.manifest import Manifest, SpeculativeConfig
from tests.unit.fake_engine import CHAT, ScriptedEngine, build_app, metric, run, sse_events, user

REPLY = "Hello from the script."
ROUTES = {"chat": ("/v1/chat/completions", {"messages": user("Hi")}),
          "completions": ("/v1/completions", {"prompt": "Hi"})}


def spec_counts(sampling, index: int) -> tuple[int, int]:
    """What SpecEngine reports for one sequence: (draft tokens, accepted tokens)."""
    k = sampling.speculative.num_tokens
    return 3 * k, k + index


class SpecEngine(ScriptedEngine):
    """A scripted engine whose speculative sequences end with the counts the native engine reports,
    and whose stats carry its spec_decode_* counters (per draft position too)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._sampling = {}  # request id -> its SamplingParams (worker thread)

    def _sample_and_accept(self, batch):
        outputs = super()._sample_and_accept(batch)
        for out in outputs:
            sampling = self._sampling[out.request_id]
            if out.finished and sampling.speculative is not None and sampling.speculative.enabled:
                draft, accepted = spec_counts(sampling, out.index)
                out.report = {**(out.report or {}), "spec_draft_tokens": draft, "spec_accepted_tokens": accepted}
        return outputs

    def _add(self, req):
        self._sampling[req.request_id] = req.sampling
        super()._add(req)

    def stats(self):
        return {**super().stats(), "spec_decode_num_drafts_total": 10.0, "spec_decode_num_draft_tokens_total": 40.0,
                "spec_decode_num_accepted_tokens_total": 25.0, "spec_decode_num_accepted_tokens_per_pos_total:0": 9.0,
                "spec_decode_num_accepted_tokens_per_pos_total:1": 7.0}


@pytest.fixture
def make(tmp_path, chat_tokenizer):
    def build(manifest_spec: dict | None = None, script=REPLY, **settings):
        engine = SpecEngine(chat_tokenizer, script)
        app = build_app(tmp_path, engine, **settings)
        if manifest_spec is not None:
            app.state.frontier.pool.loaded[CHAT].manifest.speculative = SpeculativeConfig(**manifest_spec)
        return engine, app

    return build


def post(route: str, body: dict, *extra_paths):
    path, base = ROUTES[route]

    async def scenario(client):
        r = await client.post(path, json={"model": CHAT, **base, **body})
        return r, *[(await client.get(p)).text for p in extra_paths]

    return scenario


OFF = None
CASES = [  # (request's speculative, settings, manifest's speculative) -> what the engine gets
    (None, {}, None, OFF),  # nothing set anywhere: off
    ({"method": "ngram"}, {}, None, SpeculativeParams("ngram", 4)),
    ({"method": "ngram", "num_tokens": 7}, {}, None, SpeculativeParams("ngram", 7)),
    (None, {}, {"method": "ngram", "num_tokens": 6}, SpeculativeParams("ngram", 6)),  # the manifest's default
    ({"num_tokens": 8}, {}, {"method": "ngram", "num_tokens": 6}, SpeculativeParams("ngram", 8)),  # field by field
    ({"method": "off"}, {}, {"method": "ngram"}, OFF),  # request > manifest
    (None, {"speculative_method": "off"}, {"method": "ngram"}, OFF),  # setting > manifest
    (None, {"speculative_method": "auto"}, {"method": "ngram"}, SpeculativeParams("ngram", 4)),
    (None, {"speculative_method": "ngram", "speculative_num_tokens": 3}, {"num_tokens": 6},
     SpeculativeParams("ngram", 3)),  # setting > manifest, both fields
    ({"method": "ngram"}, {"speculative_method": "off"}, None, SpeculativeParams("ngram", 4)),  # request > setting
    ({"num_tokens": 5}, {"speculative_method": "ngram", "speculative_num_tokens": 3}, None,
     SpeculativeParams("ngram", 5)),
    ({"num_tokens": 5}, {}, None, OFF),  # num_tokens alone does not switch it on
    (None, {"speculative_num_tokens": 3}, {"method": "ngram", "num_tokens": 6}, SpeculativeParams("ngram", 3)),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("requested,config,manifest_spec,expected", CASES)
def test_precedence_request_setting_manifest(make, route, requested, config, manifest_spec, expected):
    engine, app = make(manifest_spec, **config)
    body = {} if requested is None else {"speculative": requested}
    r, = run(app, post(route, body))
    assert r.status_code == 200, r.text
    assert engine.requests[0].sampling.speculative == expected


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("spec,param", [
    ({"method": "medusa"}, "speculative.method"),
    ({"method": None, "num_tokens": 0}, "speculative.num_tokens"),
    ({"method": "ngram", "num_tokens": 17}, "speculative.num_tokens"),
    ({"method": "ngram", "num_tokens": "4"}, "speculative.num_tokens"),
    ({"method": "ngram", "num_tokens": 2.5}, "speculative.num_tokens"),
    ({"method": "ngram", "num_tokens": True}, "speculative.num_tokens"),
    ({"method": "ngram", "model": "smollm2-135m-instruct"}, "speculative.model"),
    ({"model": "smollm2-135m-instruct"}, "speculative.model"),
    ({"method": "ngram", "num_speculative_tokens": 4}, "speculative.num_speculative_tokens"),
    ("ngram", "speculative"),
])
def test_invalid_speculative_fields_are_400s_naming_the_field(make, route, spec, param):
    engine, app = make()
    r, = run(app, post(route, {"speculative": spec}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert param in err["message"]
    assert engine.requests == []


def with_drafts(app, usable=("d1", "d2")):
    """The pool's draft loader, faked: ids in `usable` attach; others are refused naming both models."""
    lm = app.state.frontier.pool.loaded[CHAT]
    calls = []

    async def attach(draft_id):
        calls.append(draft_id)
        if draft_id not in usable:
            raise DraftUnavailable(f"draft model {draft_id!r} cannot draft for {CHAT!r}: their vocabularies differ")
        lm.drafts.add(draft_id)

    lm.attach_draft = attach
    return calls


DRAFT_CASES = [  # (request's speculative, settings, manifest's speculative) -> what the engine gets
    ({"method": "draft", "model": "d1"}, {}, None, SpeculativeParams("draft", 4, "d1")),
    ({"model": "d2"}, {}, {"method": "draft", "model": "d1"}, SpeculativeParams("draft", 4, "d2")),  # request > manifest
    (None, {}, {"method": "draft", "model": "d1", "num_tokens": 5}, SpeculativeParams("draft", 5, "d1")),
    (None, {"speculative_model": "d2"}, {"method": "draft", "model": "d1"}, SpeculativeParams("draft", 4, "d2")),
    (None, {"speculative_method": "draft", "speculative_model": "d2"}, {"method": "ngram"},
     SpeculativeParams("draft", 4, "d2")),
    ({"method": "ngram"}, {}, {"method": "draft", "model": "d1"}, SpeculativeParams("ngram", 4)),
    (None, {}, {"method": "draft", "model": "bad"}, OFF),  # a default draft that cannot serve: plain decoding
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("requested,config,manifest_spec,expected", DRAFT_CASES)
def test_draft_precedence_and_loading(make, route, requested, config, manifest_spec, expected):
    engine, app = make(manifest_spec, **config)
    calls = with_drafts(app)
    r, = run(app, post(route, {} if requested is None else {"speculative": requested}))
    assert r.status_code == 200, r.text
    assert engine.requests[0].sampling.speculative == expected
    assert calls == ([expected.model] if expected and expected.model else ["bad"] if expected is OFF else [])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("spec,loader,words", [
    ({"method": "draft", "model": "bad"}, True, ["'bad' cannot draft for", CHAT]),  # another tokenizer
    ({"method": "draft"}, True, ["has no default draft model"]),  # nothing names one
    ({"method": "draft", "model": "d1"}, False, ["cannot load draft models"]),  # an engine without drafts
])
def test_a_draft_that_cannot_be_used_is_a_400(make, route, spec, loader, words):
    engine, app = make()
    if loader:
        with_drafts(app)
    r, = run(app, post(route, {"speculative": spec}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("speculative.model", "draft_unavailable")
    assert all(w in err["message"] for w in words), err
    assert engine.requests == []


def details(usage: dict) -> dict | None:
    return usage.get("completion_tokens_details")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stream", [False, True])
def test_usage_reports_accepted_and_rejected_prediction_tokens(make, route, stream):
    _, app = make()
    body = {"speculative": {"method": "ngram", "num_tokens": 4}, "n": 2, "max_tokens": 32}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    r, = run(app, post(route, body))
    assert r.status_code == 200, r.text
    usage = sse_events(r.text)[-2]["usage"] if stream else r.json()["usage"]
    # two sequences: drafts 12 + 12, accepted 4 + 5
    assert details(usage) == {"accepted_prediction_tokens": 9, "rejected_prediction_tokens": 15}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stream", [False, True])
def test_no_prediction_fields_without_speculation(make, route, stream):
    _, app = make()
    body = {"speculative": {"method": "off"}}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    r, = run(app, post(route, body))
    usage = sse_events(r.text)[-2]["usage"] if stream else r.json()["usage"]
    assert details(usage) is None


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_and_prediction_tokens_share_the_details(make, stream):
    _, app = make(script="<think>4.</think>Four.")
    body = {"speculative": {"method": "ngram", "num_tokens": 2}, "reasoning": {"max_tokens": 16}, "max_tokens": 16}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    r, = run(app, post("chat", body))
    assert r.status_code == 200, r.text
    usage = sse_events(r.text)[-2]["usage"] if stream else r.json()["usage"]
    d = details(usage)
    assert set(d) == {"reasoning_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens"}
    assert d["reasoning_tokens"] > 0
    assert (d["accepted_prediction_tokens"], d["rejected_prediction_tokens"]) == (2, 4)


def test_per_position_acceptance_counters_in_metrics(make):
    _, app = make()
    _, text = run(app, post("chat", {}, "/metrics"))
    assert metric(text, "frontier_spec_decode_num_drafts_total", model=CHAT) == 10
    assert metric(text, "frontier_spec_decode_num_accepted_tokens_total", model=CHAT) == 25
    name = "frontier_spec_decode_num_accepted_tokens_per_pos_total"
    assert metric(text, name, model=CHAT, position="0") == 9
    assert metric(text, name, model=CHAT, position="1") == 7
    assert any(line.startswith("# TYPE frontier_spec_decode_num_accepted_tokens_per_pos") and line.endswith(" counter")
               for line in text.splitlines())


class _Engine:
    def __init__(self, stats):
        self._stats = stats

    def stats(self):
        return self._stats


class _Loaded:
    def __init__(self, stats):
        self.engine = _Engine(stats)


class _Pool:
    def __init__(self, **engines):
        self.loaded = {model: _Loaded(stats) for model, stats in engines.items()}


def samples(pool) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in _EngineStatsCollector(pool).collect() for s in fam.samples}


def test_collector_positions_per_model_and_malformed_keys_skipped():
    pool = _Pool(a={"x_total:0": 1, "x_total:1": 2, "num_running": 3, "gauge:0": 4},
                 b={"x_total:0": 5, "x_total": 6, "y_total": 7})
    got = samples(pool)
    assert got[("frontier_x_total", (("model", "a"), ("position", "0")))] == 1
    assert got[("frontier_x_total", (("model", "a"), ("position", "1")))] == 2
    assert got[("frontier_x_total", (("model", "b"), ("position", "0")))] == 5
    assert got[("frontier_num_running", (("model", "a"),))] == 3
    assert got[("frontier_y_total", (("model", "b"),))] == 7
    # a positional family keeps one label set; a position on a gauge is not exposed
    assert not any(name.startswith("frontier_gauge") for name, _ in got)
    assert ("frontier_x_total", (("model", "b"),)) not in got


def test_manifest_section_is_typed():
    base = {"id": "m", "task": "chat", "architecture": "llama", "license": "x", "source": {"kind": "local", "path": "."}}
    assert Manifest(**base).speculative == SpeculativeConfig(method="off", num_tokens=4)
    assert Manifest(**base, speculative={"method": False}).speculative.method == "off"  # YAML's bare `off`
    assert Manifest(**base, speculative={"method": "draft", "model": "d"}).speculative.model == "d"
    for bad in ({"method": "draft"}, {"num_tokens": 0}, {"method": "ngram", "extra": 1}):
        with pytest.raises(ValueError):
            Manifest(**base, speculative=bad)
