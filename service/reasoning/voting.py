"""Self-consistency: extract a final answer from each reasoning path and take the majority."""

from __future__ import annotations

import re
import string
from collections import Counter

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    """Numbers: the last number in the answer, commas dropped, trailing zeros trimmed.
    Otherwise: lowercased words without punctuation or articles."""
    numbers = _NUMBER.findall(text)
    if numbers:
        value = numbers[-1].replace(",", "")
        if "." in value:
            value = value.rstrip("0").rstrip(".")
        return "-0" if value == "-0" else value
    words = text.lower().translate(str.maketrans("", "", string.punctuation)).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def majority_vote(answers: list[str]) -> tuple[int, list[dict]]:
    """-> (index of the winning path, [{"answer", "count"}] most votes first). Ties go to the
    answer seen first; empty answers do not vote unless nothing else does."""
    normalized = [normalize_answer(a) for a in answers]
    counts = Counter(n for n in normalized if n) or Counter(normalized)
    first_seen = {n: normalized.index(n) for n in counts}
    ranked = sorted(counts, key=lambda n: (-counts[n], first_seen[n]))
    winner = ranked[0]
    return first_seen[winner], [{"answer": n, "count": counts[n]} for n in ranked]
