"""service/engine/detokenizer.py with a real byte-level BPE tokenizer (built offline in conftest)."""

from __future__ import annotations

import pytest

from service.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "héllo wörld 你好 🙂",
    "Hello world, this is a test.",
    "naïve café déjà vu — ünïcödé",
    "日本語のテキスト 🙂🚀 emoji",
    "mixed: a你b🙂c ñ  double  spaces\nnew line\ttab",
    "🚀🚀🚀 ₿ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # 4-byte characters outside the training text too
]


def stream(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    return deltas, detok.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    deltas, tail = stream(tiny_tokenizer, ids)
    assert "".join(deltas) == tiny_tokenizer.decode(ids) == text
    assert tail == ""
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_are_held_back_until_complete(tiny_tokenizer):
    ids = tiny_tokenizer.encode("你好")
    assert len(ids) > 2  # split into byte tokens by this tiny vocabulary
    deltas, _ = stream(tiny_tokenizer, ids)
    assert "" in deltas  # some tokens complete no character on their own
    assert [d for d in deltas if d] == ["你", "好"]


def test_every_prefix_of_a_token_stream_is_safe(tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEXTS[0] + TEXTS[3])
    detok = IncrementalDetokenizer(tiny_tokenizer)
    emitted = ""
    for k, i in enumerate(ids, 1):
        emitted += detok.push(i)
        full = tiny_tokenizer.decode(ids[:k])
        assert full.startswith(emitted)  # never ahead of the text, never a broken character
        assert len(full) - len(emitted) <= 2  # at most the held-back partial character (+1 window)


def test_flush_returns_a_dangling_partial_character(tiny_tokenizer):
    ids = tiny_tokenizer.encode("a🙂")
    cut = ids[:-1]  # the last byte of the emoji is missing
    deltas, tail = stream(tiny_tokenizer, cut)
    assert "".join(deltas) == "a"
    assert "".join(deltas) + tail == tiny_tokenizer.decode(cut)
    assert tail.endswith("\ufffd")


def test_special_tokens_are_skipped(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    ids = tiny_tokenizer.encode("ok ") + [eos] + tiny_tokenizer.encode("go")
    deltas, tail = stream(tiny_tokenizer, ids)
    assert "".join(deltas) + tail == "ok go"
    assert deltas[len(tiny_tokenizer.encode("ok "))] == ""  # the eos itself yields no text
