"""User text -> a safe SQLite FTS5 query for BM25 keyword search."""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+", re.UNICODE)
_STOPWORDS = frozenset(
    "a an and are as at be but by can could did do does for from had has have how i if in into is it its me my "
    "no not of on or our so than that the their them then there these they this to was we were what when where "
    "which who whom why will with would you your about after all also any been before being between both each "
    "few more most other over same should some such only own too very just".split())


def fts_query(text: str) -> str:
    """A safe FTS5 query: every word quoted (no operators from users), stopwords dropped (they would rank
    chunks by noise, which rank fusion then trusts), ORed; BM25 ranks."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(text)))
    content = [w for w in words if w not in _STOPWORDS] or words
    return " OR ".join(f'"{w}"' for w in content[:64])
