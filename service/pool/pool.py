"""The model pool: which loaded model serves a request; loads on demand under a memory budget.

Models named in settings.models load at start (and are pinned). Any other pulled model loads on
first use; when the weights of all loaded models would exceed the budget, the least recently used
unpinned model with no request in flight is unloaded first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from service.config import Settings
from service.engine.config import EngineConfig, Quantization
from service.engine.fresh_thread import run_in_fresh_thread
from service.engine.protocols import Embedder, Tokenizer
from service.engine.types import Engine
from service.pool.device import resolve_device, resolve_dtype
from service.pool.drafts import DraftUnavailable, default_draft, load_draft
from service.pool.manifest import Manifest, ManifestError, Registry, Task
from service.pool.sources import is_pulled, model_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class ModelNotFound(Exception):
    """Unknown id, or known but not pulled: the API answers 404 with what to do."""


class PoolFull(Exception):
    """Loading this model would exceed the memory budget even after unloading idle models."""


@dataclass
class LoadedModel:
    manifest: Manifest
    path: Path
    size_bytes: int
    engine: Engine | None = None  # chat/completion models
    embedder: Embedder | None = None  # embedding models
    tokenizer: Tokenizer | None = None  # the engine's or the embedder's
    engine_kind: str = ""
    pinned: bool = False
    in_flight: int = 0
    drafts: set[str] = field(default_factory=set)  # draft models attached to the engine (speculative decoding)
    draft_errors: dict[str, str] = field(default_factory=dict)  # drafts that cannot serve it, and why
    attach_draft: Callable[[str], Awaitable[None]] | None = None  # the pool's loader of drafts for this model
    grammar_tokenizer: Any = None  # llguidance's tokenizer, built on the first structured request
    vision: Any = None  # a VisionPrep (service/multimodal/prep.py) when the model takes images
    last_used: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def max_model_len(self) -> int:
        if self.engine is not None:
            return self.engine.max_model_len
        return self.embedder.max_seq_length


def weights_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors")) or sum(
        p.stat().st_size for p in path.rglob("*.bin"))


class ModelPool:
    def __init__(self, settings: Settings, registry: Registry):
        self.settings = settings
        self.registry = registry
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.loaded: dict[str, LoadedModel] = {}
        self._lock = asyncio.Lock()

    # ---- lookup ----
    def state(self, model_id: str) -> str:
        if model_id in self.loaded:
            return "loaded"
        m = self.registry.manifests[model_id]
        return "available" if is_pulled(self.settings.models_dir, m) else "not_pulled"

    async def get(self, model_id: str) -> LoadedModel:
        lm = self.loaded.get(model_id)
        if lm is None:
            lm = await self.load(model_id)
        lm.last_used = time.monotonic()
        return lm

    # ---- loading ----
    async def load(self, model_id: str, pinned: bool = False) -> LoadedModel:
        try:
            m = self.registry.get(model_id)
        except ManifestError as exc:
            raise ModelNotFound(str(exc)) from None
        async with self._lock:
            if model_id in self.loaded:
                return self.loaded[model_id]
            if not is_pulled(self.settings.models_dir, m):
                raise ModelNotFound(
                    f"model {model_id!r} is known but not pulled; run `frontier pull {model_id}` first")
            path = model_dir(self.settings.models_dir, m)
            size, draft = weights_size(path), self._default_draft(m)
            await self._make_room(size + (draft[2] if draft else 0), model_id)  # the default draft loads with it
            t0 = time.monotonic()
            lm = await run_in_fresh_thread(self._load_sync, m, path, size, draft, name=f"load-{model_id}")
            lm.pinned = pinned
            lm.attach_draft = functools.partial(self.attach_draft, lm)
            if lm.engine is not None:
                await lm.engine.start()
            self.loaded[model_id] = lm
            log.info("loaded %s (%s engine, %.1f MB) in %.1fs", model_id, lm.engine_kind or "embedding",
                     size / 1e6, time.monotonic() - t0)
            return lm

    async def _make_room(self, size: int, model_id: str, keep: str | None = None) -> None:
        budget = self.settings.memory_budget_bytes
        while sum(x.size_bytes for x in self.loaded.values()) + size > budget:
            idle = [x for x in self.loaded.values() if not x.pinned and x.in_flight == 0 and x.id != keep]
            if not idle:
                used = sum(x.size_bytes for x in self.loaded.values())
                raise PoolFull(
                    f"loading {model_id!r} ({size / 1e6:.0f} MB) would exceed the memory budget "
                    f"({budget / 1e6:.0f} MB, {used / 1e6:.0f} MB in use); raise FRONTIER_MEMORY_BUDGET_BYTES")
            victim = min(idle, key=lambda x: x.last_used)
            await self.unload(victim.id)

    async def unload(self, model_id: str) -> None:
        lm = self.loaded.pop(model_id, None)
        if lm and lm.engine is not None:
            await lm.engine.shutdown()
        log.info("unloaded %s", model_id)

    # ---- draft models (speculative decoding) ----
    def _default_draft(self, m: Manifest) -> tuple[Manifest, Path, int] | None:
        """The pulled draft the settings or m's manifest name by default: (manifest, dir, size)."""
        draft_id = default_draft(self.settings, m)
        dm = self.registry.manifests.get(draft_id) if draft_id else None
        if dm is None or not is_pulled(self.settings.models_dir, dm):
            if draft_id:
                log.warning("%s: default draft model %r is unknown or not pulled; requests that do not name "
                            "a method run without speculation", m.id, draft_id)
            return None
        path = model_dir(self.settings.models_dir, dm)
        return dm, path, weights_size(path)

    async def attach_draft(self, lm: LoadedModel, draft_id: str) -> None:
        """Load `draft_id` into lm's engine, once. DraftUnavailable when it cannot draft for lm
        (remembered: the answer does not change until a restart)."""
        if draft_id in lm.drafts:
            return
        if draft_id in lm.draft_errors:
            raise DraftUnavailable(lm.draft_errors[draft_id])
        dm = self.registry.manifests.get(draft_id)
        if dm is None:
            raise DraftUnavailable(f"unknown draft model {draft_id!r}; known models: {', '.join(self.registry.ids())}")
        if not is_pulled(self.settings.models_dir, dm):
            raise DraftUnavailable(f"draft model {draft_id!r} is known but not pulled; run `frontier pull {draft_id}`")
        async with self._lock:
            if draft_id in lm.drafts:
                return
            path = model_dir(self.settings.models_dir, dm)
            size = weights_size(path)
            await self._make_room(size, draft_id, keep=lm.id)
            await run_in_fresh_thread(self._attach_sync, lm, dm, path, size, name=f"draft-{draft_id}")
        if draft_id in lm.draft_errors:
            raise DraftUnavailable(lm.draft_errors[draft_id])

    def _attach_sync(self, lm: LoadedModel, dm: Manifest, path: Path, size: int) -> None:
        try:
            load_draft(lm.engine, lm.id, dm, path, self.device, self.dtype, engine_config(self.settings, dm, self.device))
        except DraftUnavailable as exc:
            lm.draft_errors[dm.id] = str(exc)
            log.warning("%s", exc)
            return
        lm.drafts.add(dm.id)
        lm.size_bytes += size
        log.info("%s: draft model %s attached for speculative decoding", lm.id, dm.id)

    def _load_sync(self, m: Manifest, path: Path, size: int, draft=None) -> LoadedModel:
        lm = LoadedModel(manifest=m, path=path, size_bytes=size)  # an attached draft adds its own size
        if m.task == Task.EMBEDDING:
            from service.pool.embedder import Embedder as SentenceEmbedder

            lm.embedder = SentenceEmbedder(path, self.device)
            lm.tokenizer = lm.embedder.tokenizer
            return lm
        if m.task == Task.VISION_CHAT and not (m.vision and m.vision.adapter):  # a transformers VLM
            from service.engine.loading import load_hf_vision_engine

            lm.engine, lm.vision = load_hf_vision_engine(path, self.device, self.dtype,
                                                         engine_config(self.settings, m, self.device))
            lm.engine_kind = "hf"
        else:
            lm.engine, lm.engine_kind = self._load_engine(m, path)
        lm.tokenizer = lm.engine.tokenizer
        if m.chat_template:
            lm.tokenizer.chat_template = m.chat_template
        if m.vision is not None and m.vision.adapter:
            try:
                self._attach_adapter(lm, m)
            except Exception:  # the model still serves text; image requests get a 400 saying it takes none
                log.exception("%s: its vision adapter %s could not be attached; serving text only", m.id,
                              m.vision.adapter)
        if draft is not None:
            self._attach_sync(lm, *draft)
        return lm

    def _attach_adapter(self, lm: LoadedModel, m: Manifest) -> None:
        """The manifest's early-fusion vision adapter, read from the repository's models directory."""
        import torch

        from service.multimodal.native_prep import NativeVisionPrep
        from service.multimodal.vision.model import load_adapter

        if lm.engine_kind != "native":
            raise ValueError(f"{m.id}: a vision adapter runs on the native engine, not {lm.engine_kind!r}")
        path = self.registry.dir / m.vision.adapter
        adapter = load_adapter(path, self.dtype if self.device.type == "cuda" else torch.float32)
        lm.vision = NativeVisionPrep(adapter, lm.tokenizer, self.device, m.vision.encoder_cache)
        lm.size_bytes += weights_size(path)
        log.info("%s: vision adapter %s attached (%d image tokens)", m.id, m.vision.adapter, adapter.num_image_tokens)

    def _load_engine(self, m: Manifest, path: Path) -> tuple[Engine, str]:
        s = self.settings
        config = engine_config(s, m, self.device)
        if s.engine in ("auto", "native"):
            try:
                from service.engine.loading import load_native_engine
                from service.modeling.loader import UnsupportedArchitecture

                try:
                    return load_native_engine(path, self.device, self.dtype, config), "native"
                except UnsupportedArchitecture as exc:
                    if s.engine == "native":
                        raise
                    log.info("%s: %s; using the transformers backend", m.id, exc)
            except ImportError as exc:
                if s.engine == "native":
                    raise
                log.info("native engine unavailable (%s); using the transformers backend", exc)
        from service.engine.loading import load_hf_engine

        return load_hf_engine(path, self.device, self.dtype, config), "hf"

    async def shutdown(self) -> None:
        for model_id in list(self.loaded):
            await self.unload(model_id)


def engine_config(settings: Settings, manifest: Manifest, device: torch.device) -> EngineConfig:
    """Settings + a model's manifest -> the one config its engine is built with.

    Context: the smaller of the manifest's context_length and the max_model_len setting (the
    model's own limit caps both at load). Quantization: the setting overrides the manifest, except
    on CUDA, where weights are never quantized (the dtype setting, bf16 by default, applies)."""
    s = settings
    caps = [x for x in (manifest.context_length, s.max_model_len) if x]
    quant = Quantization.NONE if device.type == "cuda" else (s.quantization or manifest.quantization)
    return EngineConfig(
        max_model_len=min(caps) if caps else None, max_waiting=s.max_waiting_requests,
        kv_cache_bytes=s.kv_cache_memory_bytes, block_size=s.kv_block_size, max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens, enable_prefix_caching=s.enable_prefix_caching,
        quantization=quant, int8_scheme=s.int8_scheme, cpu_kernels=s.cpu_kernels,
        kernel_cache=s.models_dir / "kernels.json", extra_eos_tokens=tuple(manifest.eos_tokens),
        spec_max_batch=s.speculative_max_batch,
    )
