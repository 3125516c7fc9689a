"""service/pool/manifest.py and service/pool/sources.py: the registry, and `pull` from local
sources (no network). GGUF conversion is replaced by a stub: the checksum/marker/atomic-rename
logic around it is what is tested here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from service.config import REPO_MANIFESTS
from service.pool import sources
from service.pool.manifest import Manifest, ManifestError, Registry, load_manifest
from service.pool.sources import MARKER, PullError, is_pulled, manifest_digest, model_dir, pull

# ---------------------------------------------------------------- registry


def test_registry_loads_the_repo_manifests():
    reg = Registry(REPO_MANIFESTS)
    files = sorted(REPO_MANIFESTS.glob("*.yaml"))
    assert files and len(reg.ids()) == len(files)
    for path in files:
        m = load_manifest(path)
        assert isinstance(m, Manifest) and reg.get(m.id) == m
        assert path.stem == m.id
        for f in m.files:
            assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0
        if m.format == "gguf":
            assert m.gguf_file in [f.name for f in m.files]
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2"} <= set(reg.ids())


def test_unknown_id_lists_known_ids():
    reg = Registry(REPO_MANIFESTS)
    with pytest.raises(ManifestError) as exc:
        reg.get("no-such-model")
    msg = str(exc.value)
    assert "no-such-model" in msg and all(i in msg for i in reg.ids())


def _manifest_dict(model_id="tiny", **overrides) -> dict:
    d = {"id": model_id, "task": "chat", "architecture": "llama", "license": "MIT",
         "source": {"kind": "local", "path": "/nonexistent"}}
    d.update(overrides)
    return d


def test_duplicate_id_raises(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(_manifest_dict("same")))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(_manifest_dict("same")))
    with pytest.raises(ManifestError, match="duplicate model id 'same'"):
        Registry(tmp_path)


def test_empty_registry_says_none(tmp_path):
    with pytest.raises(ManifestError, match="known models: none"):
        Registry(tmp_path).get("x")


@pytest.mark.parametrize("bad", [
    {"unknown_key": 1},
    {"task": "dance"},
    {"source": {"kind": "ftp", "path": "x"}},
    {"format": "onnx"},
    {"reasoning": {"formt": "scaffold"}},  # a typo in the reasoning section is an error, not dropped
    {"reasoning": {"format": "thinky"}},
    {"reasoning": {"efforts": {"medium": 0}}},
])
def test_invalid_manifest_raises_manifest_error(tmp_path, bad):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_manifest_dict(**bad)))
    with pytest.raises(ManifestError, match="invalid manifest"):
        load_manifest(path)


def test_malformed_yaml_raises_manifest_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("id: [unclosed\n")
    with pytest.raises(ManifestError):
        Registry(tmp_path)


# ---------------------------------------------------------------- pull: local, used in place


def _local(path: Path, fmt="hf", files=(), **kw) -> Manifest:
    return Manifest.model_validate(_manifest_dict(source={"kind": "local", "path": str(path)}, format=fmt,
                                                  files=list(files), **kw))


def test_local_hf_directory_is_used_in_place(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    models_dir = tmp_path / "models"
    m = _local(src)
    assert not is_pulled(models_dir, m)
    with pytest.raises(PullError, match="no config.json"):
        pull(m, models_dir, progress=False)
    (src / "config.json").write_text("{}")
    assert is_pulled(models_dir, m)
    assert pull(m, models_dir, progress=False) == src == model_dir(models_dir, m)
    assert not models_dir.exists()  # nothing copied


def test_local_sentence_transformers_directory_needs_modules_json(tmp_path):
    m = _local(tmp_path, fmt="sentence-transformers", task="embedding")
    assert not is_pulled(tmp_path / "models", m)
    (tmp_path / "modules.json").write_text("[]")
    assert is_pulled(tmp_path / "models", m)


def test_local_non_gguf_source_skips_checksums(tmp_path):
    """Gap: a local hf/sentence-transformers source is used in place; `files` checksums are never verified."""
    (tmp_path / "config.json").write_text("{}")
    m = _local(tmp_path, files=[{"name": "config.json", "sha256": "0" * 64}])
    assert pull(m, tmp_path / "models", progress=False) == tmp_path


# ---------------------------------------------------------------- pull: local GGUF (copied, verified)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def gguf_src(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.gguf").write_bytes(b"GGUF fake weights")
    (src / "sub").mkdir()
    (src / "sub" / "extra.json").write_text('{"a": 1}')
    return src


@pytest.fixture
def fake_convert(monkeypatch):
    calls = []

    def convert(m, raw, out):
        calls.append(m.id)
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"from": sorted(p.name for p in raw.iterdir())}))

    monkeypatch.setattr(sources, "_convert_gguf", convert)
    return calls


def _gguf(src: Path, files, model_id="tiny") -> Manifest:
    return _local(src, fmt="gguf", gguf_file="model.gguf", files=files, id=model_id)


def _nothing_left(models_dir: Path, model_id="tiny"):
    assert not (models_dir / model_id).exists()
    assert not list(models_dir.glob(f".{model_id}.partial-*"))  # the temp dir was cleaned up


def test_checksum_mismatch_raises_and_leaves_nothing(tmp_path, gguf_src, fake_convert):
    models_dir = tmp_path / "models"
    m = _gguf(gguf_src, [{"name": "model.gguf", "sha256": "ab" * 32}])
    with pytest.raises(PullError) as exc:
        pull(m, models_dir, progress=False)
    assert "checksum mismatch" in str(exc.value) and "model.gguf" in str(exc.value)
    assert _sha(b"GGUF fake weights") in str(exc.value)  # reports the actual digest
    _nothing_left(models_dir)
    assert fake_convert == [] and not is_pulled(models_dir, m)


def test_checksum_mismatch_of_a_nested_file(tmp_path, gguf_src, fake_convert):
    models_dir = tmp_path / "models"
    m = _gguf(gguf_src, [{"name": "model.gguf", "sha256": _sha(b"GGUF fake weights")},
                         {"name": "sub/extra.json", "sha256": "0" * 64}])
    with pytest.raises(PullError, match="checksum mismatch for sub/extra.json"):
        pull(m, models_dir, progress=False)
    _nothing_left(models_dir)


def test_missing_file_raises_pull_error_naming_it(tmp_path, gguf_src, fake_convert):
    models_dir = tmp_path / "models"
    m = _gguf(gguf_src, [{"name": "model.gguf", "sha256": _sha(b"GGUF fake weights")},
                         {"name": "tokenizer.json", "sha256": "0" * 64}])
    with pytest.raises(PullError, match="tokenizer.json"):
        pull(m, models_dir, progress=False)
    _nothing_left(models_dir)


def test_missing_source_raises_pull_error(tmp_path, fake_convert):
    m = _gguf(tmp_path / "nope", [{"name": "model.gguf", "sha256": "0" * 64}])
    with pytest.raises(PullError, match="does not exist"):
        pull(m, tmp_path / "models", progress=False)


def test_correct_checksum_pulls_with_marker(tmp_path, gguf_src, fake_convert):
    models_dir = tmp_path / "models"
    m = _gguf(gguf_src, [{"name": "model.gguf", "sha256": _sha(b"GGUF fake weights")},
                         {"name": "sub/extra.json", "sha256": _sha(b'{"a": 1}')}])
    assert not is_pulled(models_dir, m)
    final = pull(m, models_dir, progress=False)
    assert final == models_dir / "tiny" == model_dir(models_dir, m)
    marker = json.loads((final / MARKER).read_text())
    assert marker == {"id": "tiny", "digest": manifest_digest(m)}
    assert (final / "config.json").exists()
    assert is_pulled(models_dir, m)
    assert sorted(p.name for p in models_dir.iterdir()) == ["tiny"]  # no partial dirs left

    # idempotent: a second pull converts nothing
    assert pull(m, models_dir, progress=False) == final and fake_convert == ["tiny"]
    # a changed manifest no longer counts as pulled; pulling again replaces the directory
    changed = m.model_copy(update={"description": "new revision"})
    assert manifest_digest(changed) != manifest_digest(m)
    assert not is_pulled(models_dir, changed)
    pull(changed, models_dir, progress=False)
    assert is_pulled(models_dir, changed) and not is_pulled(models_dir, m)
    assert fake_convert == ["tiny", "tiny"]
    # force re-pulls even when cached
    pull(changed, models_dir, progress=False, force=True)
    assert fake_convert == ["tiny"] * 3 and is_pulled(models_dir, changed)


def test_failed_repull_keeps_the_previous_model(tmp_path, gguf_src, fake_convert):
    models_dir = tmp_path / "models"
    good = _gguf(gguf_src, [{"name": "model.gguf", "sha256": _sha(b"GGUF fake weights")}])
    pull(good, models_dir, progress=False)
    bad = _gguf(gguf_src, [{"name": "model.gguf", "sha256": "1" * 64}])
    with pytest.raises(PullError, match="checksum mismatch"):
        pull(bad, models_dir, progress=False, force=True)
    assert is_pulled(models_dir, good)  # the old directory is untouched


def test_gguf_without_gguf_file_is_a_pull_error(tmp_path, gguf_src):
    m = _local(gguf_src, fmt="gguf", files=[{"name": "model.gguf", "sha256": _sha(b"GGUF fake weights")}])
    with pytest.raises(PullError, match="gguf_file"):
        pull(m, tmp_path / "models", progress=False)
    _nothing_left(tmp_path / "models")
