"""Vision-language models through the transformers backend (service/engine/hf_backend.py +
hf_vision.py, service/multimodal/hf_prep.py, service/engine/loading.py `load_hf_vision_engine`).

For each family (LLaVA, Idefics3/SmolVLM, Qwen2-VL early fusion with M-RoPE, Mllama cross-attention) a
tiny random model is built from its config with a processor made offline (the tiny byte-level BPE
tokenizer of conftest plus the family's image tokens, a small image processor, a chat template),
saved, loaded back through the real loader and driven through the engine's async `generate()`:
greedy tokens and every step's log-probabilities equal transformers' own `generate` on the same
processor outputs (one and two images, n = 2, a text-only request after image requests: this catches
a missing Mllama mask row or a stale Qwen2-VL rope offset), and another image changes the logits.

Qwen2-VL: transformers 5.x's Qwen2VLProcessor has a video processor, and every video processor needs
torchvision, which this environment lacks: neither the processor's constructor nor AutoProcessor
works without it (ProcessorMixin looks the class up in a torchvision-only registry). Where torchvision
is missing, the test builds the processor with the video processor left out (that registry check
patched for the test only) and hands it to the loader; the model still loads through
AutoModelForImageTextToText and everything after the processor is the production path.
"""

from __future__ import annotations

import asyncio
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from service.engine.hf_backend import HFEngine
from service.engine.loading import load_hf_vision_engine
from service.engine.types import (
    FinishReason, GenerationRequest, MultimodalInput, RequestOutput, RequestTooLarge, SamplingParams,
)
from service.multimodal.hf_prep import HFVisionPrep
from service.multimodal.intake import LoadedImage
from tests.unit.conftest import build_tokenizer

transformers = pytest.importorskip("transformers")

TIMEOUT = 30
NEW_TOKENS = 6
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
TEMPLATE = ("{{ bos_token or '' }}{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}"
            "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}@IMAGE@"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} | {% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def _tokenizer(specials: list[str], bos: str | None = None):
    tok = build_tokenizer()
    tok.add_tokens(specials, special_tokens=True)
    if bos:
        tok.add_special_tokens({"bos_token": bos})
    return tok


def _text(vocab: int, **extra) -> dict:
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512, **{"bos_token_id": None, "eos_token_id": None,
                                                                     "pad_token_id": None, **extra})


def _llava():
    T = transformers
    tok = _tokenizer(["<image>"])
    cfg = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=16, patch_size=4),
        text_config=T.LlamaConfig(**_text(len(tok))), image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16, vision_feature_layer=-1)
    ip = T.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = T.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                            num_additional_image_tokens=1, chat_template=TEMPLATE.replace("@IMAGE@", "<image>"))
    return T.LlavaForConditionalGeneration(cfg), proc


def _idefics3():
    T = transformers
    tok = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"])
    cfg = T.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        text_config=_text(len(tok)), image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    ip = T.Idefics3ImageProcessorPil(size={"longest_edge": 16}, max_image_size={"longest_edge": 16},
                                     do_image_splitting=False)
    proc = T.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                               chat_template=TEMPLATE.replace("@IMAGE@", "<image>"))
    return T.Idefics3ForConditionalGeneration(cfg), proc


def _qwen2_vl():
    T = transformers
    names = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(names)
    ids = {t: tok.convert_tokens_to_ids(t) for t in names}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim 16
    cfg = T.Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=_text(len(tok), rope_parameters=rope), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    ip = T.Qwen2VLImageProcessorPil(min_pixels=8 * 8, max_pixels=32 * 32, patch_size=4, merge_size=2, temporal_patch_size=2)
    template = TEMPLATE.replace("@IMAGE@", "<|vision_start|><|image_pad|><|vision_end|>")
    if HAS_TORCHVISION:
        proc = T.Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=T.Qwen2VLVideoProcessor(),
                                  chat_template=template)
    else:
        proc = T.Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=template)
    return T.Qwen2VLForConditionalGeneration(cfg), proc


def _mllama():
    T = transformers
    tok = _tokenizer(["<|image|>"], bos="<|begin_of_text|>")
    cfg = T.MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, image_size=16, patch_size=4, max_num_tiles=2,
                           intermediate_layers_indices=[0], vision_output_dim=64,
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=_text(len(tok), cross_attention_layers=[1], bos_token_id=tok.bos_token_id, eos_token_id=0,
                          pad_token_id=0),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    ip = T.MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=2)
    proc = T.MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=TEMPLATE.replace("@IMAGE@", "<|image|>"))
    model = T.MllamaForConditionalGeneration(cfg)
    with torch.no_grad():  # the cross-attention gates start at zero: open them so the images count
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(1.0)
    return model, proc


FAMILIES = {"llava": _llava, "idefics3": _idefics3, "qwen2_vl": _qwen2_vl, "mllama": _mllama}


def _without_video_processor_check(monkeypatch):
    """transformers 5.x without torchvision cannot build a processor that has a video processor (see
    the module docstring): skip that one class check while the test's processor is built."""
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, arg):
        return None if (name == "video_processor" and arg is None) else original(self, name, arg)

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", check)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, engine, prep) for one family: built, saved, loaded back through the loader."""
    name = request.param
    mp = pytest.MonkeyPatch()
    try:
        if name == "qwen2_vl" and not HAS_TORCHVISION:
            _without_video_processor_check(mp)
        torch.manual_seed(0)
        model, proc = FAMILIES[name]()
        with torch.no_grad():  # random init gives near-uniform logits: sharpen them (no greedy near-ties)
            model.lm_head.weight.mul_(8.0)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        passed = None
        if name == "qwen2_vl" and not HAS_TORCHVISION:
            proc.image_processor.save_pretrained(path)
            proc.tokenizer.save_pretrained(path)
            passed = proc
        else:
            proc.save_pretrained(path)
        engine, prep = load_hf_vision_engine(path, "cpu", torch.float32, processor=passed)
    finally:
        mp.undo()
    assert type(engine.model).__name__ == type(model).__name__
    return name, engine, prep


def _image(seed: int, size=(16, 16)) -> LoadedImage:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    return LoadedImage(img, f"digest-{seed}-{size}", "data")


def _prompt(prep: HFVisionPrep, engine: HFEngine, num_images: int, text: str = "what is this?") -> str:
    parts = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": prep.message_content(parts)}]
    return engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _fresh(engine: HFEngine) -> HFEngine:
    """A new engine around the loaded model (each run shuts its engine down)."""
    return HFEngine(engine.model, engine.tokenizer, engine.eos_token_ids, engine.config, engine.kernels)


def _run(engine: HFEngine, *reqs: GenerationRequest) -> list[list[RequestOutput]]:
    """Every output of each request (run concurrently), the engine shut down after."""

    async def one(req):
        return [o async for o in engine.generate(req)]

    async def main():
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(r) for r in reqs)), TIMEOUT)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def _steps(outs: list[RequestOutput], vocab: int) -> dict[int, tuple[list[int], torch.Tensor]]:
    """Per sequence: its token ids and the log-probabilities of every step over the whole vocabulary
    [steps, vocab] (from top_logprobs = vocab)."""
    seqs: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for o in outs:
        assert o.error is None, o.error
        ids, rows = seqs.setdefault(o.index, ([], []))
        ids.extend(o.token_ids)
        for lp in o.logprobs or []:
            row = torch.full((vocab,), float("-inf"))
            for tid, value in lp.top:
                row[tid] = value
            rows.append(row)
        if o.finished:
            assert o.finish_reason == FinishReason.LENGTH
    return {i: (ids, torch.stack(rows)) for i, (ids, rows) in seqs.items()}


def _vocab(engine: HFEngine) -> int:
    return engine.model.get_output_embeddings().weight.shape[0]


def _request(engine: HFEngine, ids, mm, n=1, **params) -> GenerationRequest:
    sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": NEW_TOKENS, "ignore_eos": True, "n": n,
                                 "logprobs": True, "top_logprobs": _vocab(engine), **params})
    return GenerationRequest(prompt_token_ids=list(ids), sampling=sampling, multimodal=mm)


@torch.no_grad()
def _hf_greedy(model, ids: list[int], mm: MultimodalInput | None) -> tuple[list[int], torch.Tensor]:
    """transformers' own greedy generate: the tokens and each step's log-probabilities [steps, vocab]."""
    extra = dict(mm.processor_inputs) if mm is not None and mm.processor_inputs else {}
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         **extra, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)  # [steps, vocab]
    return out.sequences[0, len(ids):].tolist(), logprobs


def _assert_same(got: tuple[list[int], torch.Tensor], expected: tuple[list[int], torch.Tensor]) -> None:
    assert got[0] == expected[0]
    torch.testing.assert_close(got[1], expected[1], atol=2e-4, rtol=0)


def test_loader_gives_the_processor_tokenizer_template_eos_and_limits(family):
    name, engine, prep = family
    assert engine.tokenizer is prep.processor.tokenizer and engine.tokenizer.chat_template
    assert engine.kernels["architecture"] == type(engine.model).__name__
    assert engine.max_model_len == 512  # the text model's max_position_embeddings
    text_vocab = engine.model.config.get_text_config().vocab_size
    # Mllama embeds 8 more ids than its text vocabulary (its image token among them in real checkpoints)
    bound = text_vocab + 8 if name == "mllama" else text_vocab
    engine.check_admission([GenerationRequest(prompt_token_ids=[bound - 1])])
    with pytest.raises(RequestTooLarge):
        engine.check_admission([GenerationRequest(prompt_token_ids=[bound])])
    if name == "mllama":
        assert 0 in engine.eos_token_ids  # the checkpoint's generation config (text eos 0)
    assert "pixel_values" in prep._keep and "input_ids" not in prep._keep


@pytest.mark.skipif(HAS_TORCHVISION, reason="only without torchvision")
def test_qwen2_vl_autoprocessor_needs_torchvision(tmp_path):
    """Documents the limit: transformers 5.x's AutoProcessor for Qwen2-VL loads a video processor."""
    mp = pytest.MonkeyPatch()
    try:
        _without_video_processor_check(mp)
        model, proc = _qwen2_vl()
    finally:
        mp.undo()
    model.save_pretrained(tmp_path)
    proc.image_processor.save_pretrained(tmp_path)
    proc.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ImportError, match="(?i)torchvision"):
        load_hf_vision_engine(tmp_path, "cpu", torch.float32)


def test_greedy_matches_transformers_generate(family):
    name, engine, prep = family
    # Qwen2-VL: square images whose merged grid (2x2, 3x3) is longer than its M-RoPE span, so
    # the decode positions depend on the prefill's rope offset (a non-zero rope_deltas).
    one = prep.prepare(_prompt(prep, engine, 1), [_image(1)])
    two = prep.prepare(_prompt(prep, engine, 2, "compare them"), [_image(2), _image(3, (24, 24))])
    text_ids, text_mm = prep.prepare(_prompt(prep, engine, 0, "just text"), [])
    assert text_mm.processor_inputs is None and text_mm.digests == []
    for ids, mm in (one, two):
        assert mm.digests and mm.processor_inputs and "pixel_values" in mm.processor_inputs
        assert "input_ids" not in mm.processor_inputs and "attention_mask" not in mm.processor_inputs
    if name == "qwen2_vl":
        assert {"image_grid_thw", "mm_token_type_ids"} <= set(two[1].processor_inputs)
    if name == "mllama":
        assert two[1].processor_inputs["cross_attention_mask"].shape[:3] == (1, len(two[0]), 2)
    expected = [_hf_greedy(engine.model, *one), _hf_greedy(engine.model, *two), _hf_greedy(engine.model, text_ids, None)]
    assert all(len(set(e[0])) > 1 for e in expected)  # not degenerate
    reqs = [_request(engine, *one), _request(engine, *two), _request(engine, *two, n=2), _request(engine, text_ids, text_mm)]
    got = [_steps(outs, _vocab(engine)) for outs in _run(_fresh(engine), *reqs)]
    assert [sorted(g) for g in got] == [[0], [0], [0, 1], [0]]
    _assert_same(got[0][0], expected[0])
    _assert_same(got[1][0], expected[1])
    _assert_same(got[2][0], expected[1])  # n = 2: the batch-1 prefill repeated in the cache
    _assert_same(got[2][1], expected[1])
    _assert_same(got[3][0], expected[2])  # text only, after image requests (no stale image state)


def test_a_different_image_changes_the_logits(family):
    _, engine, prep = family
    prompt = _prompt(prep, engine, 1)
    reqs = [_request(engine, *prep.prepare(prompt, [_image(seed)]), max_tokens=1) for seed in (10, 10, 11)]
    a, a2, b = (_steps(outs, _vocab(engine))[0][1][0] for outs in _run(_fresh(engine), *reqs))
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.equal(a, a2)
    assert (a - b).abs().max() > 1e-2


def test_prompt_logprobs_with_an_image(family):
    """Prompt logprobs over an image prompt: computed at batch 1, one entry per prompt token."""
    _, engine, prep = family
    ids, mm = prep.prepare(_prompt(prep, engine, 1), [_image(4)])
    [outs] = _run(_fresh(engine), _request(engine, ids, mm, n=2, max_tokens=2, prompt_logprobs=0))
    firsts = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert len(firsts) == 2 and all(len(p) == len(ids) and p[0] is None for p in firsts)
    assert [e.token_id for e in firsts[0][1:]] == ids[1:]


# ---- HFVisionPrep on its own (LLaVA's processor) ----

@pytest.fixture(scope="module")
def llava_prep():
    torch.manual_seed(0)
    _, proc = _llava()
    return HFVisionPrep(proc, max_images=2)


def test_message_content_is_the_hf_content_list(llava_prep):
    parts = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    assert llava_prep.message_content(parts) == [
        {"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    with pytest.raises(ValueError):
        llava_prep.message_content([{"type": "audio"}])


def test_prepare_refuses_mismatched_markers_and_too_many_images(llava_prep):
    with pytest.raises(ValueError, match="1 image markers"):
        llava_prep.prepare("user: <image> two?", [_image(1), _image(2)])
    with pytest.raises(ValueError, match="0 image markers"):
        llava_prep.prepare("user: no marker", [_image(1)])
    with pytest.raises(ValueError, match="at most 2 images"):
        llava_prep.prepare("<image><image><image>", [_image(1), _image(2), _image(3)])


def test_prepare_expands_markers_and_keeps_digests(llava_prep):
    ids, mm = llava_prep.prepare("user: <image> and <image> ok", [_image(1), _image(2)])
    image_id = llava_prep.processor.image_token_id
    assert ids.count(image_id) == 2 * 16  # (16 / 4)^2 patches each
    assert mm.digests == [_image(1).digest, _image(2).digest]
    assert tuple(mm.processor_inputs["pixel_values"].shape) == (2, 3, 16, 16)


@pytest.mark.parametrize("name", ["llava", "idefics3", "mllama"])  # Qwen2-VL's AutoProcessor needs torchvision
def test_a_vision_manifest_loads_through_the_pool_and_answers_images_over_the_api(tmp_path, name):
    """A tiny model of the family saved to disk, named by a manifest (task vision-chat, no adapter):
    the pool loads it through transformers, /v1/models says it takes images, a chat with an image
    part answers."""
    import base64
    import io

    import yaml

    from service.api.app import create_app
    from service.config import Settings
    from tests.unit.fake_engine import run

    torch.manual_seed(0)
    model, proc = FAMILIES[name]()
    model.save_pretrained(tmp_path / "vlm")
    proc.save_pretrained(tmp_path / "vlm")
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "tiny-llava.yaml").write_text(yaml.safe_dump({
        "id": "tiny-llava", "task": "vision-chat", "architecture": name, "license": "apache-2.0",
        "source": {"kind": "local", "path": str(tmp_path / "vlm")}, "vision": {"sees": "random pixels"}}))
    app = create_app(Settings(models=["tiny-llava"], default_chat_model="tiny-llava", data_dir=tmp_path / "data",
                              manifests_dir=tmp_path / "manifests", models_dir=tmp_path / "models"))
    buf = io.BytesIO()
    _image(3).image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "tiny-llava", "max_tokens": 3, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}

    async def scenario(client):
        answer = await client.post("/v1/chat/completions", json=body)  # waits for the model's load
        return (await client.get("/v1/models/tiny-llava")).json(), answer

    card, r = run(app, scenario, timeout=120)
    assert card["input_modalities"] == ["text", "image"] and card["vision"] == {"sees": "random pixels"}
    assert card.get("engine") == "hf", (card, r.text)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
