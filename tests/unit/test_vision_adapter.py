"""service/multimodal/vision: the synthetic data (deterministic, disjoint splits), the adapter
(shapes, preprocessing, fp16 save/load), the prompt convention (placeholder expansion and splicing)
and training on a tiny random Llama built from a config (nothing pulled)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

from service.multimodal.vision import synth
from service.multimodal.vision import train as T
from service.multimodal.vision.generate import greedy
from service.multimodal.vision.model import VisionAdapter, load_adapter, save_adapter
from service.multimodal.vision.prompt import (
    IMAGE_TOKEN, IMAGE_TOKEN_ID, build_prompt, count_image_placeholders, expand_image_placeholders,
    image_token_id, prompt_ids, splice_image_embeds, strip_image_token,
)
from tests.unit.conftest import build_model, build_tokenizer

TINY = {"image_size": 32, "stem_channels": [8, 16, 16], "encoder_dim": 32, "encoder_layers": 1,
        "encoder_heads": 2, "num_image_tokens": 9, "hidden_size": 64}


def _digest(img: Image.Image) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


def test_synth_is_deterministic_and_labelled():
    for i in range(10):
        a, b = synth.example("train", i), synth.example("train", i)
        assert _digest(a.image) == _digest(b.image) and (a.question, a.answer, a.labels) == (b.question, b.answer, b.labels)
        assert synth.MIN_SIDE <= a.image.width == a.image.height <= synth.MAX_SIDE
        assert a.answer == synth.LABELS[a.task][a.labels[a.task]]
        assert a.question in synth.QUESTIONS[a.task]
    for task in synth.TASKS:
        ex = synth.example("heldout", 3, task, side=512)
        assert ex.task == task and ex.image.size == (512, 512)
    with pytest.raises(ValueError):
        synth.example("train", 0, "smell")


def test_train_and_heldout_never_overlap():
    train = {synth.seed_of("train", i) for i in range(5000)}
    held = {synth.seed_of("heldout", i) for i in range(5000)}
    assert len(train) == len(held) == 5000 and not train & held
    a = {_digest(synth.example("train", i).image) for i in range(30)}
    b = {_digest(synth.example("heldout", i).image) for i in range(30)}
    assert len(a) == len(b) == 30 and not a & b
    with pytest.raises(ValueError):
        synth.seed_of("test", 0)


def test_answer_matching():
    assert synth.matches("There are three shapes.", "3")
    assert synth.matches("3", "3") and synth.matches("Red.", "red") and synth.matches("the color is violet", "purple")
    assert not synth.matches("13", "3") and not synth.matches("catalog", "cat") and not synth.matches("", "cat")


def test_adapter_shapes_and_preprocess():
    torch.manual_seed(0)
    adapter = VisionAdapter(TINY).eval()
    assert adapter(torch.randn(2, 3, 32, 32)).shape == (2, 9, 64)
    rgba = Image.new("RGBA", (50, 30), (255, 0, 0, 0))  # fully transparent: composited on white
    px = adapter.preprocess(rgba)
    assert px.shape == (3, 32, 32) and px.dtype == torch.float32
    assert torch.allclose(px, torch.ones_like(px))
    assert adapter.embed_images([Image.new("L", (20, 70), 0), rgba]).shape == (2, 9, 64)
    with pytest.raises(ValueError):
        VisionAdapter(TINY, image_size=40)
    with pytest.raises(ValueError):
        VisionAdapter(TINY, num_image_tokens=10)  # not a square


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    adapter = VisionAdapter(TINY).eval()
    save_adapter(adapter, tmp_path / "a", {"lm": "tiny"})
    loaded = load_adapter(tmp_path / "a")
    assert loaded.config["lm"] == "tiny" and loaded.num_image_tokens == 9
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(adapter(x), loaded(x), atol=2e-2)
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values() if t.is_floating_point())
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "format": "other"}))
    with pytest.raises(ValueError):
        load_adapter(tmp_path / "a")


def test_placeholder_expansion_and_splice():
    assert expand_image_placeholders([1, IMAGE_TOKEN_ID, 5], 3) == [1, 16, 16, 16, 5]
    assert expand_image_placeholders([IMAGE_TOKEN_ID, 7, IMAGE_TOKEN_ID], 2) == [16, 16, 7, 16, 16]
    with pytest.raises(ValueError):
        expand_image_placeholders([16, 16, 16], 3)  # already expanded
    ids = torch.tensor([[1, 16, 16, 5], [16, 16, 3, 4]])
    embeds = torch.zeros(2, 4, 8)
    img = torch.arange(2 * 2 * 8, dtype=torch.float32).view(2, 2, 8)
    out = splice_image_embeds(embeds, ids, img)
    assert torch.equal(out[0, 1:3], img[0]) and torch.equal(out[1, :2], img[1])
    assert out[0, 0].abs().sum() == 0 and out[1, 2:].abs().sum() == 0
    with pytest.raises(ValueError):
        splice_image_embeds(embeds, ids, img[:1])


def _tokenizer():
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return tok


def test_prompt_convention_on_a_tokenizer():
    tok = _tokenizer()
    pid = image_token_id(tok)
    text = build_prompt(tok, f"what {IMAGE_TOKEN} colour?")
    assert text.count(IMAGE_TOKEN) == 1 and text.index(IMAGE_TOKEN) < text.index("what")
    assert strip_image_token(f"a{IMAGE_TOKEN}b") == "ab"
    ids = prompt_ids(tok, "what colour?", 5)
    assert count_image_placeholders(ids, pid) == 5
    first = ids.index(pid)
    assert ids[first: first + 5] == [pid] * 5
    assert count_image_placeholders(prompt_ids(tok, "what colour?", 5, num_images=0), pid) == 0


@pytest.fixture(scope="module")
def tiny_lm():
    lm = build_model(320, seed=0)
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm


def _rows(n: int, pool: T.Pool, gen: torch.Generator) -> list[tuple[list[int], int]]:
    rows = []
    for i in range(n):
        question = torch.randint(20, 300, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen).tolist()
        answer = [40 + pool.labels[i].clamp(min=0).sum().item() % 200, 7]
        rows.append(([IMAGE_TOKEN_ID] * TINY["num_image_tokens"] + question + answer, len(answer)))
    return rows


def test_prefix_cache_matches_a_full_forward(tiny_lm):
    torch.manual_seed(0)
    adapter = VisionAdapter(TINY).eval()
    pool = T.make_pool("train", 4, 32)
    rows = _rows(4, pool, torch.Generator().manual_seed(0))
    prefix = [3, 9, 11, 12]
    with torch.no_grad():
        img = adapter(T._pixels(adapter, pool, torch.arange(4)))
        cached = T.lm_loss(tiny_lm, T.PrefixCache.build(tiny_lm, prefix), img, rows)
        full = T.lm_loss(tiny_lm, T.PrefixCache.build(tiny_lm, []), img, [(prefix + r, n) for r, n in rows])
    assert torch.allclose(cached, full, atol=1e-5)


def test_training_smoke_on_a_tiny_llama(tiny_lm):
    torch.manual_seed(0)
    adapter = VisionAdapter(TINY)
    pool = T.make_pool("train", 8, 32)
    assert pool.pixels.shape == (8, 3, 32, 32) and pool.pixels.dtype == torch.uint8
    rows = _rows(8, pool, torch.Generator().manual_seed(1))
    prefix = T.PrefixCache.build(tiny_lm, [3, 9, 11])
    px = T._pixels(adapter, pool, torch.arange(8))
    opt = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss = T.lm_loss(tiny_lm, prefix, adapter(px), rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.grad is None for p in tiny_lm.parameters())
    # the stage functions end to end (2 steps each)
    targets = T.label_targets(_tokenizer(), tiny_lm.get_input_embeddings().weight)
    heads = T.AuxHeads(adapter.config)
    cfg = T.TrainConfig(warmup_steps=2, warmup_batch=4, steps=2, batch=4, bf16=False)
    assert T.warmup(adapter, heads, pool, targets, cfg, log=lambda _: None)["steps"] == 2
    assert T.train_lm(tiny_lm, adapter, heads, pool, prefix, rows, targets, cfg, log=lambda _: None)["steps"] == 2
    assert set(T.aux_accuracy(adapter, heads, pool)) <= set(synth.TASKS)


def test_batched_greedy_equals_one_at_a_time(tiny_lm):
    torch.manual_seed(0)
    adapter = VisionAdapter(TINY).eval()
    prompts = [[3, 4] + [IMAGE_TOKEN_ID] * 9 + [9, 10, 11], [IMAGE_TOKEN_ID] * 9 + [12]]
    with torch.no_grad():
        img = adapter(torch.randn(2, 3, 32, 32))
    batched = greedy(tiny_lm, prompts, img, max_new_tokens=5)
    single = [greedy(tiny_lm, [p], img[i: i + 1], max_new_tokens=5)[0] for i, p in enumerate(prompts)]
    assert batched == single and all(len(o) == 5 for o in batched)
    assert greedy(tiny_lm, [[3, 4, 5]], None, max_new_tokens=4, eos_ids=tuple(range(320))) == [[]]
