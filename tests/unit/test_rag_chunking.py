"""service/rag/chunking.py: token-bounded, structure-aware chunks that are exact spans, with overlap."""

from __future__ import annotations

import pytest

from service.rag.chunking import ChunkingConfig, chunk_text, offsets_from_tokenizer
from tests.unit.rag_fakes import WordTokenizer

OFFSETS = offsets_from_tokenizer(WordTokenizer())


def ntok(text: str) -> int:
    return len(OFFSETS(text))


def sentences(prefix: str, n: int, words: int = 9) -> str:
    return " ".join(f"{prefix} sentence {i} " + " ".join(f"w{i}x{j}" for j in range(words - 3)) + "."
                    for i in range(n))


def test_chunks_are_exact_spans_within_the_token_budget():
    text = "\n\n".join(sentences(f"p{k}", 6) for k in range(8))
    cfg = ChunkingConfig(chunk_size=40, overlap=10)
    chunks = chunk_text(text, OFFSETS, cfg)
    assert len(chunks) > 5
    for i, c in enumerate(chunks):
        assert c.position == i
        assert text[c.start:c.end] == c.text
        assert c.num_tokens == ntok(c.text) <= cfg.chunk_size
    # everything is covered: every sentence appears in some chunk
    for k in range(8):
        for i in range(6):
            assert any(f"p{k} sentence {i} " in c.text for c in chunks)


def test_overlap_repeats_the_tail_of_the_previous_chunk():
    text = sentences("s", 30, words=6)
    chunks = chunk_text(text, OFFSETS, ChunkingConfig(chunk_size=30, overlap=12))
    assert len(chunks) > 3
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end, "consecutive chunks overlap"
        assert b.start > a.start, "chunks make progress"
        assert ntok(text[b.start:a.end]) <= 12


def test_no_overlap_when_zero():
    text = sentences("s", 30, words=6)
    chunks = chunk_text(text, OFFSETS, ChunkingConfig(chunk_size=30, overlap=0))
    for a, b in zip(chunks, chunks[1:]):
        assert b.start >= a.end


def test_markdown_headings_start_new_chunks_and_record_the_path():
    text = ("# Guide\n\nIntro words here.\n\n## Install\n\nRun the installer now.\n\n"
            "```\n# not a heading inside code\n```\n\n## Usage\n\nCall the function.\n")
    chunks = chunk_text(text, OFFSETS, ChunkingConfig(chunk_size=100, overlap=0))
    assert [c.heading for c in chunks] == ["Guide", "Guide > Install", "Guide > Usage"]
    assert chunks[1].text.startswith("## Install") and "# not a heading" in chunks[1].text
    assert not any("Call the function" in c.text and "installer" in c.text for c in chunks)


def test_paragraphs_are_kept_whole_when_they_fit():
    paras = [sentences(f"p{k}", 2, words=5) for k in range(6)]  # ~12 tokens each
    text = "\n\n".join(paras)
    chunks = chunk_text(text, OFFSETS, ChunkingConfig(chunk_size=30, overlap=0))
    for c in chunks:  # chunk boundaries fall on paragraph boundaries
        assert text[c.start:c.end].split("\n\n")[0] in paras and c.text.split("\n\n")[-1] in paras


def test_a_huge_sentence_is_cut_into_token_windows():
    text = " ".join(f"tok{i}" for i in range(100))  # one "sentence" without punctuation
    chunks = chunk_text(text, OFFSETS, ChunkingConfig(chunk_size=16, overlap=0))
    assert all(c.num_tokens <= 16 for c in chunks)
    assert " ".join(c.text for c in chunks) == text


def test_real_fast_tokenizer_offsets(tiny_tokenizer):
    offsets = offsets_from_tokenizer(tiny_tokenizer)
    text = "Hello world, this is a test.\n\nThe quick brown fox jumps over the lazy dog. " * 5
    chunks = chunk_text(text, offsets, ChunkingConfig(chunk_size=24, overlap=6))
    assert len(chunks) > 2
    for c in chunks:
        assert text[c.start:c.end] == c.text
        assert len(tiny_tokenizer.encode(c.text, add_special_tokens=False)) <= 24 + 2  # merges at the edges


def test_config_validation():
    with pytest.raises(ValueError):
        ChunkingConfig(chunk_size=4)
    with pytest.raises(ValueError):
        ChunkingConfig(chunk_size=100, overlap=90)


def test_empty_and_whitespace_give_no_chunks():
    assert chunk_text("", OFFSETS) == []
    assert chunk_text("  \n\n  ", OFFSETS) == []


def test_tokenizer_truncation_is_ignored(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.enable_truncation(16)  # as embedders ship them: chunking must see every token
    text = "Hello world, this is a test. " * 40
    offsets = offsets_from_tokenizer(tok)
    assert len(offsets(text)) > 100
    assert tok.backend_tokenizer.truncation is not None  # the caller's tokenizer is left as it was
    chunks = chunk_text(text, offsets, ChunkingConfig(chunk_size=20, overlap=0))
    assert chunks[-1].end == len(text.rstrip())
