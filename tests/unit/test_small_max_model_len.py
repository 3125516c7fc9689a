"""Regression (issue #16): FRONTIER_MAX_MODEL_LEN=160 kept the int8 chat model from loading, because
the int8 smoothing calibration ran 512-token batches through a model whose positions stop at
max_model_len. The same load path as the server's (load_native_engine, quantization int8, int8
kernels forced) on a tiny random Llama with a byte-level BPE tokenizer that tokenizes the packaged
calibration text into many more than 160 tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch

from service.engine.config import EngineConfig
from service.engine.loading import load_native_engine
from service.engine.types import GenerationRequest, SamplingParams
from service.modeling.calibration import CALIBRATION_TEXT
from tests.unit.conftest import build_model, build_tokenizer

MAX_MODEL_LEN = 160


@pytest.fixture(scope="module")
def tiny_bpe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-bpe")
    tok = build_tokenizer()
    build_model(len(tok)).save_pretrained(path)  # max_position_embeddings 256 > 160
    tok.save_pretrained(path)
    return path


def _generate(engine, prompt: list[int], max_tokens: int) -> tuple[list[int], str]:
    async def main():
        toks, reason = [], None
        try:
            async for out in engine.generate(GenerationRequest(
                    prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                     ignore_eos=True))):
                toks += out.token_ids
                reason = out.finish_reason
        finally:
            await engine.shutdown()
        return toks, reason.value

    return asyncio.run(main())


def test_int8_engine_with_max_model_len_160_loads_and_generates(tiny_bpe_dir, tmp_path):
    tok = build_tokenizer()
    assert len(tok(CALIBRATION_TEXT.read_text(encoding="utf-8"))["input_ids"]) > 2 * 512  # longer than the cap
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, max_waiting=8, kv_cache_bytes=4 << 20, quantization="int8",
                          cpu_kernels="int8", kernel_cache=tmp_path / "kernels.json")
    engine = load_native_engine(tiny_bpe_dir, "cpu", torch.float32, config)
    assert engine.max_model_len == MAX_MODEL_LEN
    assert engine.kernels["quantization"] == "int8"
    assert set(engine.kernels["linears"].values()) == {"int8"}
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 12)[: MAX_MODEL_LEN - 10]
    toks, reason = _generate(engine, prompt, 10)  # fills the context to exactly max_model_len
    assert len(toks) == 10 and reason == "length"
    assert all(0 <= t < len(tok) for t in toks)
