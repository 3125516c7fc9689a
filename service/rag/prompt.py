"""Grounded prompts: numbered sources in one system message that fits the chat model's context.

Sources are chosen best-first while their tokens (the chat model's tokenizer) fit the budget;
a source that does not fit is left out whole, never cut mid-chunk. The chosen sources are then
numbered in chunk-id order, not rank order, so the same sources always give the same text: the
system message is the first message of the prompt, and a repeat of it reuses the KV prefix cache.
"""

from __future__ import annotations

INSTRUCTIONS = (
    "Answer the user's question using only the numbered sources below. Cite the sources you use by "
    "their numbers in square brackets, like [1] or [2][3]. If the sources do not contain the answer, "
    "say that you do not know."
)
NO_SOURCES = "No sources matched the question. Say that you do not know."
PER_SOURCE_MARGIN = 2  # tokens: merges at the seams between sources


def format_source(index: int, result: dict) -> str:
    return f"[{index}] (document: {result['document_id']})\n{result['text'].strip()}"


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def select_sources(results: list[dict], tokenizer, budget_tokens: int) -> list[dict]:
    """The results (best first) whose formatted text fits in budget_tokens together, whole."""
    used = _count(tokenizer, INSTRUCTIONS + "\n\nSources:\n")
    chosen = []
    for r in results:
        # a two-digit number is the widest label: count with it so renumbering never overflows
        n = _count(tokenizer, format_source(99, r) + "\n\n") + PER_SOURCE_MARGIN
        if used + n <= budget_tokens:
            chosen.append(r)
            used += n
    return chosen


def sources_message(chosen: list[dict]) -> tuple[str, list[dict]]:
    """(system message text, citations) for the chosen sources, numbered in chunk-id order."""
    if not chosen:
        return NO_SOURCES, []
    ordered = sorted(chosen, key=lambda r: r["chunk_id"])
    body = "\n\n".join(format_source(i, r) for i, r in enumerate(ordered, start=1))
    citations = [{"index": i, "document_id": r["document_id"], "chunk_id": r["chunk_id"], "score": r["score"],
                  "text": r["text"]} for i, r in enumerate(ordered, start=1)]
    return f"{INSTRUCTIONS}\n\nSources:\n{body}", citations


def drop_weakest(chosen: list[dict]) -> list[dict]:
    """The chosen sources less the lowest-scored one (when the rendered prompt still overflows)."""
    if not chosen:
        return chosen
    weakest = min(range(len(chosen)), key=lambda i: chosen[i]["score"])
    return chosen[:weakest] + chosen[weakest + 1:]
