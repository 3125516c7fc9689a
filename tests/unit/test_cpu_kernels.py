"""CPU kernel choice per linear shape (service/modeling/cpu_kernels.py): fp16-weight kernel, the
minimax pick, the per-CPU cache, and the whole load path on a tiny model."""
import json

import pytest
import torch
import torch.nn as nn

from service.modeling import cpu_kernels as ck
from service.modeling.int8_linear import Int8Linear, Int8Scheme, default_scheme


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@torch.no_grad()
def test_fp16_linear_is_close_batch_invariant_and_reloads():
    lin = nn.Linear(96, 40)
    q = ck.Fp16Linear(lin)
    x = torch.randn(6, 96)
    y = q(x)
    assert y.shape == (6, 40) and y.dtype == torch.float32
    assert ((y - lin(x)).norm() / lin(x).norm()).item() < 2e-3  # fp16 weights, fp32 activations
    assert all(torch.equal(q(x[i : i + 1]), y[i : i + 1]) for i in range(6))
    other = ck.Fp16Linear(nn.Linear(96, 40))
    other.load_state_dict(q.state_dict())
    assert torch.equal(other(x), y)


def test_pick_minimises_the_summed_time_over_buckets():
    # fp16 wins the small batches, int8 the large ones: the large batch decides (it costs the most)
    times = {"int8": {1: 0.2, 8: 0.2, 32: 0.4, 256: 2.0}, "fp16": {1: 0.1, 8: 0.2, 32: 0.5, 256: 3.0}}
    assert ck.pick(times) == "int8"
    times["fp16"][256] = 1.5
    assert ck.pick(times) == "fp16"
    assert ck.pick({"int8": {1: 1.0}, "fp16": {1: 1.0}, "disturbed": True}) == "int8"  # ties go to int8


def test_fp16_is_not_used_for_weights_beyond_its_range():
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[0, 0] = 70000.0
    assert not ck.fp16_eligible(lin)
    model = nn.Sequential(lin, nn.Linear(4, 8))
    forced = ck.choose_kernels(model, Int8Scheme.A7W8_RESIDUAL, forced="fp16")
    assert forced == {"8x4": "fp16", "4x8": "fp16"}
    assert ck.settle_fp16(model, forced) == {"8x4": "int8", "4x8": "fp16"}


def test_choices_are_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 64))
    path = tmp_path / "kernels.json"
    calls = []
    real = ck.time_kernels

    def counting(lin, scheme, reps=9):
        calls.append((lin.in_features, lin.out_features))
        ms = real(lin, scheme, reps=2)
        ms.pop("disturbed", None)  # this test is about caching, not about a busy machine
        return ms

    monkeypatch.setattr(ck, "time_kernels", counting)
    first = ck.choose_kernels(model, default_scheme(), cache_path=path)
    assert sorted(calls) == [(32, 64), (64, 32)]  # one measurement per distinct shape
    assert set(first) == {"32x64", "64x32"} and set(first.values()) <= {"int8", "fp16"}
    saved = json.loads(path.read_text())
    assert len(saved) == 1 and set(next(iter(saved.values()))) == {"32x64", "64x32"}
    calls.clear()
    assert ck.choose_kernels(model, default_scheme(), cache_path=path) == first
    assert calls == []  # a restart reads the choice
    path.write_text("{not json")  # a damaged cache is measured again, never an error
    assert set(ck.choose_kernels(model, default_scheme(), cache_path=path)) == {"32x64", "64x32"}
    assert len(calls) == 2


def test_prepare_for_cpu_swaps_every_linear_and_calibrates_within_max_positions(tiny_tokenizer):
    from service.modeling.llama import LlamaForCausalLM, ModelConfig

    cfg = ModelConfig(model_type="llama", vocab_size=len(tiny_tokenizer), hidden_size=64,
                      intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      rms_norm_eps=1e-5, max_position_embeddings=48, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.05) if p.dim() > 1 else nn.init.normal_(p, mean=1.0, std=0.2)
    model.init_rope(48)  # the calibration text is far longer than 48 tokens: batches must fit
    ids = torch.randint(0, cfg.vocab_size, (20,))
    with torch.inference_mode():
        before = model.compute_logits(model(ids, torch.arange(20)))
    embed = model.model.embed_tokens.weight.detach().clone()
    chosen = ck.prepare_for_cpu(model, tiny_tokenizer, 48, kernels="int8")
    assert set(chosen["linears"].values()) == {"int8"} and chosen["selected_by"] == "int8"
    assert all(not type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear)
    assert torch.equal(model.model.embed_tokens.weight, embed)  # smoothing untied the head first
    with torch.inference_mode():
        after = model.compute_logits(model(ids, torch.arange(20)))
    assert torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.99


def test_a_disturbed_measurement_is_used_but_not_cached(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(32, 64))
    path = tmp_path / "kernels.json"
    noisy = {"int8": {1: 12.0, 8: 12.0, 32: 60.0, 256: 60.0}, "fp16": {1: 12.0, 8: 12.0, 32: 12.0, 256: 12.0},
             "disturbed": True}
    monkeypatch.setattr(ck, "time_kernels", lambda lin, scheme, reps=9: noisy)
    assert ck.choose_kernels(model, default_scheme(), cache_path=path) == {"32x64": "fp16"}
    assert not path.exists()  # the next start measures again
