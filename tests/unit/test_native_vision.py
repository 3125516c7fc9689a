"""Early fusion in the native engine (issue #12), on a tiny random Llama with a random vision adapter
built from configs: the engine's tokens equal a plain PyTorch reference forward (HF Llama with the
adapter's rows spliced into inputs_embeds), prefill chunks cut through image spans, the prefix cache
keys image spans by the image (same image: blocks reused; another image: never), the encoder runs
once per distinct image, and the chat API takes image_url parts end to end."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
import torch
from PIL import Image

from service.engine.config import EngineConfig
from service.engine.loading import load_native_engine
from service.engine.types import GenerationRequest, SamplingParams
from service.multimodal.intake import LoadedImage
from service.multimodal.native_prep import NativeVisionPrep
from service.multimodal.vision.model import VisionAdapter
from service.multimodal.vision.prompt import IMAGE_TOKEN, splice_image_embeds
from tests.unit.conftest import build_model, build_tokenizer
from tests.unit.fake_engine import CHAT, build_app, metric, run

N = 4  # image tokens per image (the default adapter has more)


def picture(name, size=64) -> LoadedImage:
    """A random pattern seeded by `name` (a flat colour would normalize away in a random encoder)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    return LoadedImage(Image.fromarray(pixels), f"digest-{name}", "data")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm")
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    model = build_model(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok, PixelAdapter()


class PixelAdapter(torch.nn.Module):
    """A stand-in encoder whose rows are a fixed projection of the pixels: unlike a randomly
    initialized VisionAdapter (whose norms make every image look alike), different images give
    clearly different rows, so a test can tell whether the engine used them."""
    num_image_tokens = N

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.proj = torch.nn.Linear(16 * 16 * 3 // N, 64)

    def embed_images(self, images) -> torch.Tensor:
        px = torch.stack([torch.tensor(list(im.resize((16, 16)).tobytes()), dtype=torch.float32) / 255
                          for im in images])  # [k, 768]
        return self.proj(px.view(len(images), N, -1)).detach() * 3  # [k, N, 64]


def engine_and_prep(tiny, adapter=None, **kw):
    path, _, _, test_adapter = tiny
    adapter = adapter or test_adapter
    config = EngineConfig(max_model_len=256, kv_cache_bytes=4 << 20, block_size=4, max_num_batched_tokens=6, **kw)
    engine = load_native_engine(path, "cpu", torch.float32, config)
    return engine, NativeVisionPrep(adapter, engine.tokenizer)


def prompt(tok, question: str, num_images: int, before: str = "") -> str:
    content = before + "".join(IMAGE_TOKEN + "\n" for _ in range(num_images)) + question
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def generate(engine, reqs):
    async def one(r):
        toks, cached = [], 0
        async for out in engine.generate(r):
            toks += out.token_ids
            cached = max(cached, out.num_cached_tokens)
        return toks, cached

    async def main():
        try:
            return await asyncio.gather(*(one(r) for r in reqs))
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def reference_greedy(model, adapter, ids: list[int], images, placeholder: int, steps: int) -> list[int]:
    """Plain PyTorch: token embeddings with the adapter's rows at the placeholder positions, full
    causal forward each step."""
    with torch.no_grad():
        x = model.model.embed_tokens(torch.tensor([ids]))
        if images:
            rows = adapter.embed_images([im.image for im in images])  # [k, N, H]
            x = splice_image_embeds(x, torch.tensor([ids]), rows, placeholder)
        out = []
        for _ in range(steps):
            t = int(model(inputs_embeds=x).logits[0, -1].argmax())
            out.append(t)
            x = torch.cat([x, model.model.embed_tokens(torch.tensor([[t]]))], dim=1)
    return out


def test_early_fusion_matches_the_reference_forward_with_chunks_through_images(tiny):
    _, model, tok, adapter = tiny
    engine, prep = engine_and_prep(tiny)
    images = [picture("red"), picture("blue")]
    ids, mm = prep.prepare(prompt(tok, "what is in these?", 2, before="Look at these two"), images)
    assert [k for _, k in mm.spans] == [N, N]
    assert all(start // 6 != (start + N - 1) // 6 for start, _ in mm.spans)  # 6-token prefill chunks cut both
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    [(tokens, _)] = generate(engine, [GenerationRequest(ids, params, multimodal=mm)])
    assert tokens == reference_greedy(model, adapter, ids, images, prep.placeholder, 12)
    with torch.no_grad():  # the image is really seen: another image gives other logits
        def first_logits(imgs):
            rows = adapter.embed_images([im.image for im in imgs])
            x = splice_image_embeds(model.model.embed_tokens(torch.tensor([ids])), torch.tensor([ids]), rows,
                                    prep.placeholder)
            return model(inputs_embeds=x).logits[0, -1]

        assert (first_logits(images) - first_logits([picture("green"), images[1]])).abs().max() > 1e-2


def test_prefix_cache_reuses_blocks_of_the_same_image_never_of_another(tiny):
    _, _, tok, _ = tiny
    engine, prep = engine_and_prep(tiny)
    text = prompt(tok, "describe the picture in detail please", 1)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    red_ids, red = prep.prepare(text, [picture("red")])
    start = red.spans[0][0]

    def ask(image):
        ids, mm = prep.prepare(text, [image])
        return generate(engine, [GenerationRequest(ids, params, multimodal=mm)])[0][1]

    assert ask(picture("red")) == 0
    same = ask(picture("red"))
    other = ask(picture("yellow"))
    assert same >= start + N  # past the image: its blocks were reused
    assert other <= start  # the yellow image shares only the text before it
    assert prep.encode([picture("red"), picture("yellow")])[1]["cache_hits"] == 2  # encoded once each


def png_url(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_api_takes_images_streamed_and_not_and_counts_them(tmp_path, tiny):
    adapter = VisionAdapter(image_size=32, stem_channels=[8, 8, 8], encoder_dim=16, encoder_layers=1,
                            encoder_heads=2, num_image_tokens=N, hidden_size=64).eval()  # the real module
    engine, prep = engine_and_prep(tiny, adapter)
    app = build_app(tmp_path, engine)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url("red")}},
                                             {"type": "text", "text": "What colour?"}]}]
    body = {"model": CHAT, "messages": messages, "max_tokens": 4, "temperature": 0}

    async def scenario(client):
        blind = await client.post("/v1/chat/completions", json=body)  # no VisionPrep yet: a text-only model
        text_card = (await client.get(f"/v1/models/{CHAT}")).json()
        app.state.frontier.pool.loaded[CHAT].vision = prep
        card = (await client.get(f"/v1/models/{CHAT}")).json()
        whole = await client.post("/v1/chat/completions", json=body)
        hits_before = metric((await client.get("/metrics")).text, "frontier_prefix_cache_hits_total", model=CHAT)
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})  # the same image again
        hits = metric((await client.get("/metrics")).text, "frontier_prefix_cache_hits_total", model=CHAT) - hits_before
        bad = await client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]})
        return blind, whole, streamed, bad, (await client.get("/metrics")).text, (text_card, card), hits

    blind, whole, streamed, bad, metrics, cards, hits = run(app, scenario)
    assert hits >= N, hits  # the second request reused the blocks of the image's span (on /metrics)
    assert [c["input_modalities"] for c in cards] == [["text"], ["text", "image"]]
    assert blind.status_code == 400 and blind.json()["error"]["code"] == "images_not_supported"
    assert whole.status_code == 200 and whole.json()["usage"]["prompt_tokens"] > N
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"
    assert metric(metrics, "frontier_images_processed_total", model=CHAT) == 2
    assert metric(metrics, "frontier_image_encoder_cache_hits_total", model=CHAT) == 1


def test_a_manifest_adapter_is_attached_at_load_and_serves_images(tmp_path, tiny):
    """The pool reads `vision.adapter` (relative to the manifests directory) when it loads the model."""
    import yaml

    from service.api.app import create_app
    from service.config import Settings
    from service.multimodal.vision.model import save_adapter

    path = tiny[0]
    manifests = tmp_path / "manifests"
    save_adapter(VisionAdapter(image_size=32, stem_channels=[8, 8, 8], encoder_dim=16, encoder_layers=1,
                               encoder_heads=2, num_image_tokens=N, hidden_size=64), manifests / "vision" / "tiny")
    (manifests / "tiny-vlm.yaml").write_text(yaml.safe_dump({
        "id": "tiny-vlm", "task": "chat", "architecture": "llama", "license": "apache-2.0",
        "source": {"kind": "local", "path": str(path)}, "vision": {"adapter": "vision/tiny", "sees": "noise"}}))
    app = create_app(Settings(models=["tiny-vlm"], default_chat_model="tiny-vlm", data_dir=tmp_path / "data",
                              manifests_dir=manifests, models_dir=tmp_path / "models", max_model_len=256))
    body = {"model": "tiny-vlm", "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_url("red")}}, {"type": "text", "text": "colour?"}]}]}

    async def scenario(client):
        answer = await client.post("/v1/chat/completions", json=body)  # waits for the model's load
        return answer, (await client.get("/v1/models/tiny-vlm")).json()

    answer, card = run(app, scenario, timeout=120)
    assert answer.status_code == 200, answer.text
    assert card["engine"] == "native" and card["input_modalities"] == ["text", "image"]
