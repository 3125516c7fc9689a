"""service/engine/config.py: EngineConfig, the one Quantization enum, and how the pool builds the
config from Settings + manifest (service/pool/pool.py `engine_config`); the loaders resolve the
manifest's extra EOS tokens at load (service/engine/loading.py), and both engines satisfy the
Engine protocol."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import torch

from service.config import Settings
from service.engine.config import DEFAULT_KV_CACHE_BYTES, EngineConfig, Quantization
from service.pool.manifest import Manifest


def _manifest(**kw) -> Manifest:
    base = dict(id="m", task="chat", architecture="LlamaForCausalLM", license="x",
                source={"kind": "local", "path": "/nowhere"})
    return Manifest.model_validate({**base, **kw})


def test_defaults_and_frozen():
    c = EngineConfig()
    assert (c.max_model_len, c.max_waiting, c.kv_cache_bytes, c.block_size) == (None, 256, DEFAULT_KV_CACHE_BYTES, 16)
    assert (c.max_num_seqs, c.max_num_batched_tokens, c.enable_prefix_caching) == (64, 256, True)
    assert c.quantization is Quantization.NONE and c.extra_eos_tokens == () and c.kernel_cache is None
    with pytest.raises(FrozenInstanceError):
        c.block_size = 8


def test_plain_values_are_normalized_and_bad_ones_rejected():
    c = EngineConfig(quantization="int8", extra_eos_tokens=["<|im_end|>"], kernel_cache="k.json")
    assert c.quantization is Quantization.INT8 and c.extra_eos_tokens == ("<|im_end|>",)
    assert c.kernel_cache == Path("k.json")
    for bad in (dict(quantization="int3"), dict(block_size=0), dict(max_num_seqs=0), dict(kv_cache_bytes=0),
                dict(int8_scheme="a9"), dict(cpu_kernels="gpu"), dict(max_model_len=0)):
        with pytest.raises(ValueError):
            EngineConfig(**bad)


def test_one_quantization_enum_everywhere():
    from service.modeling import quant
    from service.pool import manifest

    assert manifest.Quantization is quant.Quantization is Quantization
    assert Settings.model_fields["quantization"].annotation == Quantization | None
    assert _manifest(quantization="int8").quantization is Quantization.INT8


def test_settings_and_manifests_do_not_import_torch():
    code = ("import sys, service.config, service.pool.manifest, service.engine.config; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_engine_config_from_settings_and_manifest(tmp_path):
    from service.pool.pool import engine_config

    s = Settings(max_model_len=1024, max_waiting_requests=9, kv_cache_memory_bytes=1 << 20, kv_block_size=8,
                 max_num_seqs=3, max_num_batched_tokens=40, enable_prefix_caching=False, int8_scheme="a7w8r",
                 cpu_kernels="fp16", models_dir=tmp_path)
    m = _manifest(quantization="int8", context_length=512, eos_tokens=["<|im_end|>"])
    c = engine_config(s, m, torch.device("cpu"))
    assert c == EngineConfig(max_model_len=512, max_waiting=9, kv_cache_bytes=1 << 20, block_size=8, max_num_seqs=3,
                             max_num_batched_tokens=40, enable_prefix_caching=False, quantization=Quantization.INT8,
                             int8_scheme="a7w8r", cpu_kernels="fp16", kernel_cache=tmp_path / "kernels.json",
                             extra_eos_tokens=("<|im_end|>",))
    assert engine_config(s, _manifest(), torch.device("cpu")).max_model_len == 1024  # the setting caps
    assert engine_config(Settings(), _manifest(), torch.device("cpu")).max_model_len is None  # the model's own
    # the setting overrides the manifest; CUDA never quantizes (the dtype setting applies)
    assert engine_config(Settings(quantization="bf16"), m, torch.device("cpu")).quantization is Quantization.BF16
    assert engine_config(Settings(quantization="none"), m, torch.device("cpu")).quantization is Quantization.NONE
    assert engine_config(s, m, torch.device("cuda")).quantization is Quantization.NONE


def test_extra_eos_tokens_resolve_at_load(tmp_path):
    """The loaders turn config.extra_eos_tokens into ids once; eos_token_ids is a frozenset fixed at
    construction. An unknown token string (the tokenizer would map it to unk) is skipped."""
    from service.engine.loading import load_hf_engine, load_native_engine
    from service.engine.types import Engine
    from tests.golden.test_native_golden import _save_tiny

    _save_tiny("llama", tmp_path)  # WordLevel "w0".."w255", eos w1, unk w0
    config = EngineConfig(max_model_len=64, kv_cache_bytes=1 << 20, extra_eos_tokens=("w7", "w9", "nope"))
    native = load_native_engine(tmp_path, "cpu", torch.float32, config)
    hf = load_hf_engine(tmp_path, "cpu", torch.float32, config)
    for engine in (native, hf):
        assert engine.eos_token_ids == frozenset({1, 7, 9})
        assert isinstance(engine, Engine) and engine.max_model_len == 64
    assert native.kernels == {"quantization": "none", "dtype": "float32"}
    assert hf.kernels == {"backend": "transformers", "dtype": "float32"}
    assert (native.name, hf.name) == ("native", "hf")


def test_native_engine_takes_its_scheduler_options_from_the_config(tmp_path):
    from service.engine.loading import load_native_engine
    from tests.golden.test_native_golden import _save_tiny

    _save_tiny("llama", tmp_path)
    config = EngineConfig(kv_cache_bytes=1 << 20, block_size=8, max_num_seqs=3, max_num_batched_tokens=40,
                          enable_prefix_caching=False)
    engine = load_native_engine(tmp_path, "cpu", torch.float32, config)
    assert engine.config is config and engine.max_model_len == 512  # the model's own limit
    assert engine.block_manager.block_size == 8 and not engine.block_manager.enable_prefix_caching
    assert (engine.scheduler.config.max_num_seqs, engine.scheduler.config.max_num_batched_tokens) == (3, 40)
    stats = engine.stats()
    assert {"prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total"} <= set(stats)
    assert not {"prefix_cache_queries", "prefix_cache_hits", "num_preemptions"} & set(stats)


def test_monotonic_engine_stats_are_prometheus_counters(tmp_path):
    """/metrics: the native engine's *_total stats are counters named as vLLM's; the rest gauges."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from service.engine.loading import load_native_engine
    from service.metrics import Metrics
    from tests.golden.test_native_golden import _save_tiny

    _save_tiny("llama", tmp_path)
    engine = load_native_engine(tmp_path, "cpu", torch.float32, EngineConfig(kv_cache_bytes=1 << 20))
    metrics = Metrics()
    metrics.watch_pool(SimpleNamespace(loaded={"tiny": SimpleNamespace(engine=engine)}))
    text = generate_latest(metrics.registry).decode()
    for name in ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions"):
        assert f"# TYPE frontier_{name}_total counter" in text
        assert f'frontier_{name}_total{{model="tiny"}} 0.0' in text
    assert "# TYPE frontier_num_requests_running gauge" in text
    assert "frontier_prefix_cache_hits{" not in text


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_pool_builds_the_engine_from_settings_and_manifest(tmp_path, kind):
    """The pool's one path: Settings + manifest -> EngineConfig -> loader; extra EOS tokens are ids
    from the start (nothing patches the engine after construction)."""
    import asyncio

    import yaml

    from service.pool.manifest import Registry
    from service.pool.pool import ModelPool
    from tests.golden.test_native_golden import _save_tiny

    model_dir, manifests = tmp_path / "model", tmp_path / "manifests"
    _save_tiny("llama", model_dir)
    manifests.mkdir()
    (manifests / "tiny.yaml").write_text(yaml.safe_dump(dict(
        id="tiny", task="completion", architecture="LlamaForCausalLM", license="x", context_length=128,
        source={"kind": "local", "path": str(model_dir)}, eos_tokens=["w5"], chat_template="{{ 'x' }}")))
    s = Settings(manifests_dir=manifests, models_dir=tmp_path / "cache", models=[], device="cpu", engine=kind,
                 kv_cache_memory_bytes=1 << 20, kv_block_size=8, max_num_seqs=3, max_waiting_requests=5)
    pool = ModelPool(s, Registry(manifests))

    async def main():
        try:
            lm = await pool.get("tiny")
            return lm, lm.engine.config if kind == "native" else None
        finally:
            await pool.shutdown()

    lm, config = asyncio.run(main())
    assert lm.engine_kind == kind and lm.max_model_len == 128 and lm.engine.max_waiting == 5
    assert lm.engine.eos_token_ids == frozenset({1, 5}) and lm.tokenizer.chat_template == "{{ 'x' }}"
    if kind == "native":
        assert (config.block_size, config.max_num_seqs, config.kv_cache_bytes) == (8, 3, 1 << 20)
        assert config.extra_eos_tokens == ("w5",) and config.kernel_cache == tmp_path / "cache" / "kernels.json"
