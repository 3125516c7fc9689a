"""Draft models through the pool and the API (issue #11): a manifest model of the target's tokenizer
loads into the target's native engine on first use (or at load, as the manifest's default); one
of another tokenizer is a 400 naming both models, before any weight is read; the draft's output
is the plain greedy output. Tiny random Llamas with word-level tokenizers (no download)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from service.pool.drafts import DraftUnavailable, check_tokenizers_match
from tests.golden.test_native_golden import VOCAB, _save_tiny
from tests.unit.fake_engine import build_app, metric, run

PROMPT = " ".join(f"w{i}" for i in (5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6))


def _tokenizer(path, eos="w1", prefix="w"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"{prefix}{i}": i for i in range(VOCAB)}, unk_token=f"{prefix}0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, unk_token=f"{prefix}0").save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    """tiny (target), tiny-draft (its copy), other-vocab and other-eos (the same weights, another
    tokenizer), each with a local manifest."""
    root = tmp_path_factory.mktemp("draft-pool")
    target = root / "weights" / "tiny"
    _save_tiny("llama", target)
    variants = {"tiny-draft": {}, "other-vocab": {"prefix": "x"}, "other-eos": {"eos": "w2"}}
    for name, tok in variants.items():
        shutil.copytree(target, root / "weights" / name)
        if tok:
            _tokenizer(root / "weights" / name, **tok)
    (root / "manifests").mkdir()
    for name in ("tiny", *variants, "embed"):
        (root / "manifests" / f"{name}.yaml").write_text(yaml.safe_dump({
            "id": name, "task": "embedding" if name == "embed" else "completion", "architecture": "llama",
            "license": "x", "source": {"kind": "local", "path": str(root / "weights" / ("tiny" if name == "embed" else name))}}))
    return root


def app_for(models_root, tmp_path, **settings):
    return build_app(tmp_path, manifests_dir=models_root / "manifests", default_chat_model="tiny",
                     kv_cache_memory_bytes=4 << 20, **settings)


def complete(app, *speculative):
    """One completion per `speculative` value (None: the field left out), then /metrics and, while
    the app still runs, the target's LoadedModel (the pool unloads it when the app stops)."""

    async def scenario(client):
        out = []
        for spec in speculative:
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
            out.append(await client.post("/v1/completions", json=body if spec is None else {**body, "speculative": spec}))
        return *out, (await client.get("/metrics")).text, app.state.frontier.pool.loaded["tiny"]

    return scenario


def test_tokenizers_must_match_in_vocabulary_and_special_tokens(tmp_path):
    a = _tokenizer(tmp_path / "a")
    check_tokenizers_match(a, _tokenizer(tmp_path / "b"), "t", "d")
    with pytest.raises(DraftUnavailable, match="'d' cannot draft for 't'.*vocabularies differ"):
        check_tokenizers_match(a, _tokenizer(tmp_path / "c", prefix="x"), "t", "d")
    with pytest.raises(DraftUnavailable, match="special tokens differ \\(eos_token_id"):
        check_tokenizers_match(a, _tokenizer(tmp_path / "e", eos="w2"), "t", "d")


def test_a_draft_of_the_same_tokenizer_gives_the_plain_output(models_root, tmp_path):
    app = app_for(models_root, tmp_path)
    plain, r, metrics, lm = run(app, complete(app, None, {"method": "draft", "model": "tiny-draft"}))
    assert plain.status_code == r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    assert r.json()["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0
    assert metric(metrics, "frontier_spec_decode_num_accepted_tokens_total", model="tiny") > 0
    assert lm.drafts == {"tiny-draft"} and "tiny-draft" in lm.engine.speculation.drafts


@pytest.mark.parametrize("draft,why", [
    ("other-vocab", "vocabularies differ"), ("other-eos", "special tokens differ"),
    ("tiny", "cannot draft for itself"), ("nope", "unknown draft model 'nope'"), ("embed", "its task is embedding"),
])
def test_a_draft_that_cannot_serve_the_target_is_a_400_naming_both(models_root, tmp_path, draft, why):
    app = app_for(models_root, tmp_path)
    r, _, lm = run(app, complete(app, {"method": "draft", "model": draft}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("speculative.model", "draft_unavailable")
    assert why in err["message"] and draft in err["message"]
    if draft.startswith("other") or draft == "embed":
        assert "'tiny'" in err["message"]
        assert draft in lm.draft_errors  # remembered: no second load attempt


def test_the_manifest_default_draft_loads_with_the_target(models_root, tmp_path):
    manifests = tmp_path / "manifests-default"
    shutil.copytree(models_root / "manifests", manifests)
    m = yaml.safe_load((manifests / "tiny.yaml").read_text())
    (manifests / "tiny.yaml").write_text(yaml.safe_dump({**m, "speculative": {"method": "draft", "model": "tiny-draft"}}))
    app = build_app(tmp_path, manifests_dir=manifests, default_chat_model="tiny", kv_cache_memory_bytes=4 << 20)
    r, _, lm = run(app, complete(app, None))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0
    assert lm.drafts == {"tiny-draft"}
    # a default draft that cannot serve the target: plain decoding, not an error
    (manifests / "tiny.yaml").write_text(yaml.safe_dump({**m, "speculative": {"method": "draft", "model": "other-eos"}}))
    (tmp_path / "b").mkdir()
    app = build_app(tmp_path / "b", manifests_dir=manifests, default_chat_model="tiny", kv_cache_memory_bytes=4 << 20)
    r, _, lm = run(app, complete(app, None))
    assert r.status_code == 200, r.text
    assert not r.json()["usage"].get("completion_tokens_details")
    assert lm.drafts == set() and "other-eos" in lm.draft_errors
