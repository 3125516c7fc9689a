"""Structure-aware chunking measured in tokens of the embedding model, with overlap.

A document is cut into sections at markdown headings (never inside a fenced code block); a section
into paragraphs (blank lines); a paragraph that does not fit into sentences; a sentence that does not
fit into token windows. These pieces are packed greedily into chunks of at most `chunk_size` tokens
that never cross a section; a new chunk starts with the trailing pieces of the previous one, up to
`overlap` tokens. Every chunk is an exact character span of the source text, so `text[start:end]`
gives it back; its position is its index in the document.

Tokens come from a `token_offsets(text) -> [(start, end), ...]` function (the embedding model's
tokenizer, see `offsets_from_tokenizer`), so the whole document is tokenized once.
"""

from __future__ import annotations

import bisect
import copy
import re
from dataclasses import dataclass
from typing import Callable

TokenOffsets = Callable[[str], list[tuple[int, int]]]

_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# A sentence ends at . ! ? (optionally followed by a closing quote or bracket) and whitespace, or a newline.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n")


@dataclass(frozen=True)
class ChunkingConfig:
    chunk_size: int = 200  # tokens of the embedding model, special tokens excluded
    overlap: int = 40  # tokens carried from the end of the previous chunk

    def __post_init__(self):
        if self.chunk_size < 8:
            raise ValueError("chunk_size must be at least 8 tokens")
        if not 0 <= self.overlap < self.chunk_size // 2 + 1:
            raise ValueError("overlap must be between 0 and half of chunk_size")


@dataclass(frozen=True)
class Chunk:
    position: int  # index within the document
    start: int  # character span in the document text
    end: int
    text: str
    num_tokens: int
    heading: str = ""  # the markdown heading path of its section ("Intro > Setup"), if any


def offsets_from_tokenizer(tokenizer) -> TokenOffsets:
    """Token character offsets from a Hugging Face fast tokenizer, without special tokens or truncation."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        if hasattr(backend, "no_truncation"):  # a copy: the embedder's own one truncates (and may pad)
            backend = copy.deepcopy(backend)
            backend.no_truncation()
            backend.no_padding()
        return lambda text: [tuple(o) for o in backend.encode(text, add_special_tokens=False).offsets]
    return lambda text: [tuple(o) for o in tokenizer(text, add_special_tokens=False,
                                                      return_offsets_mapping=True)["offset_mapping"]]


class _Tokens:
    """Counts tokens in any character span in O(log n) from one tokenization of the text."""

    def __init__(self, offsets: list[tuple[int, int]]):
        self.offsets = [o for o in offsets if o[1] > o[0]]
        self.starts = [o[0] for o in self.offsets]

    def count(self, start: int, end: int) -> int:
        return bisect.bisect_left(self.starts, end) - bisect.bisect_left(self.starts, start)

    def windows(self, start: int, end: int, size: int) -> list[tuple[int, int]]:
        """Split a span into consecutive pieces of at most `size` tokens, each ending where its last token ends."""
        lo, hi = bisect.bisect_left(self.starts, start), bisect.bisect_left(self.starts, end)
        out = []
        for i in range(lo, hi, size):
            j = min(i + size, hi) - 1
            out.append((start if i == lo else self.starts[i], end if j == hi - 1 else self.offsets[j][1]))
        return out


def _sections(text: str) -> list[tuple[int, int, str]]:
    """(start, end, heading path) of each markdown section; a heading line opens a new one."""
    sections, path, start, pos, in_fence = [], [], 0, 0, False
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            in_fence = not in_fence
        m = None if in_fence else _HEADING.match(line.rstrip("\r\n"))
        if m:
            if pos > start:
                sections.append((start, pos, " > ".join(t for _, t in path)))
            level = len(m.group(1))
            path = [(lv, t) for lv, t in path if lv < level] + [(level, m.group(2).strip())]
            start = pos
        pos += len(line)
    if pos > start:
        sections.append((start, pos, " > ".join(t for _, t in path)))
    return sections


def _split(text: str, start: int, end: int, pattern: re.Pattern) -> list[tuple[int, int]]:
    """Spans between matches of `pattern`, stripped of surrounding whitespace, empty ones dropped."""
    spans, cur = [], start
    for m in pattern.finditer(text, start, end):
        spans.append((cur, m.start() if m.group().isspace() else m.end()))
        cur = m.end()
    spans.append((cur, end))
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((a, b))
    return out


def _pieces(text: str, tokens: _Tokens, start: int, end: int, size: int) -> list[tuple[int, int, int]]:
    """(start, end, num_tokens) pieces of a section, each at most `size` tokens: whole paragraphs when
    they fit, else sentences, else token windows."""
    out = []
    for pa, pb in _split(text, start, end, _PARAGRAPH_BREAK):
        n = tokens.count(pa, pb)
        if n <= size:
            out.append((pa, pb, n))
            continue
        for sa, sb in _split(text, pa, pb, _SENTENCE_END):
            n = tokens.count(sa, sb)
            if n <= size:
                out.append((sa, sb, n))
            else:
                out.extend((a, b, tokens.count(a, b)) for a, b in tokens.windows(sa, sb, size))
    return out


def chunk_text(text: str, token_offsets: TokenOffsets, config: ChunkingConfig = ChunkingConfig()) -> list[Chunk]:
    tokens = _Tokens(token_offsets(text))
    chunks: list[Chunk] = []

    def emit(group, heading):
        a, b = group[0][0], group[-1][1]
        chunks.append(Chunk(len(chunks), a, b, text[a:b], tokens.count(a, b), heading))

    for s_start, s_end, heading in _sections(text):
        group: list[tuple[int, int, int]] = []
        fresh = False  # the group holds a piece not yet emitted
        for piece in _pieces(text, tokens, s_start, s_end, config.chunk_size):
            if group and tokens.count(group[0][0], piece[1]) > config.chunk_size:
                if fresh:
                    emit(group, heading)
                group = _overlap_tail(group, tokens, config.overlap)
                while group and tokens.count(group[0][0], piece[1]) > config.chunk_size:
                    group.pop(0)
            group.append(piece)
            fresh = True
        if group and fresh:
            emit(group, heading)
    return chunks


def _overlap_tail(group, tokens: _Tokens, overlap: int) -> list[tuple[int, int, int]]:
    """The trailing pieces of a chunk that together hold at most `overlap` tokens."""
    tail: list[tuple[int, int, int]] = []
    for piece in reversed(group):
        if tokens.count(piece[0], group[-1][1]) > overlap:
            break
        tail.insert(0, piece)
    return tail
