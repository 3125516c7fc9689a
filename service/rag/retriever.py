"""Dense (FAISS), keyword (SQLite FTS5 / BM25) and hybrid (reciprocal rank fusion) retrieval.

Hybrid takes `candidates` from each retriever and fuses their ranks: score(d) = sum 1 / (k + rank),
k = 60 (Cormack et al. 2009), so a chunk ranked well by either side surfaces, and one ranked well
by both wins (keyword hits that match only near-universal words are left out of the fusion).
Metadata filters are evaluated by SQLite: keyword search joins them in SQL; dense
search passes the matching chunk ids to the index (searched exactly when few remain).
Blocking: call from a thread.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from service.rag.docstore import DocStore
from service.rag.vector_index import VectorIndex

RRF_K = 60
# Hybrid drops keyword hits scoring under this fraction of the best one: chunks that match only words
# found in most chunks (BM25 idf ~ 0) would otherwise get a rank, and rank fusion trusts ranks.
KEYWORD_FLOOR = 0.02


class Mode(str, Enum):
    DENSE = "dense"
    KEYWORD = "keyword"
    HYBRID = "hybrid"


def rrf(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse ranked id lists (best first) into one, best first; ties keep first-seen order."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def num_candidates(top_k: int) -> int:
    return max(4 * top_k, 40)


def dense_search(index: VectorIndex, docstore: DocStore, query_vec: np.ndarray, k: int,
                 flt: dict | None) -> list[tuple[int, float]]:
    allowed = docstore.filtered_ids(flt) if flt else None
    if allowed is not None and not len(allowed):
        return []
    return index.search(query_vec.reshape(1, -1), k, allowed)[0]


def retrieve(docstore: DocStore, index: VectorIndex, query: str, query_vec: np.ndarray | None, mode: Mode,
             top_k: int, flt: dict | None = None) -> list[dict]:
    """Results best first: {"document_id", "chunk_id", "score", "text", "metadata", "position",
    "start", "end", "heading", "scores": {"dense"?, "keyword"?}}."""
    dense: list[tuple[int, float]] = []
    keyword: list[tuple[int, float]] = []
    n = top_k if mode != Mode.HYBRID else num_candidates(top_k)
    if mode in (Mode.DENSE, Mode.HYBRID):
        dense = dense_search(index, docstore, query_vec, n, flt)
    if mode in (Mode.KEYWORD, Mode.HYBRID):
        keyword = docstore.keyword_search(query, n, flt)
        if mode == Mode.HYBRID and keyword:  # matches on near-universal words only are noise to fusion
            keyword = [(i, s) for i, s in keyword if s >= KEYWORD_FLOOR * keyword[0][1]]
    if mode == Mode.DENSE:
        ranked = dense
    elif mode == Mode.KEYWORD:
        ranked = keyword
    else:
        ranked = rrf([[i for i, _ in dense], [i for i, _ in keyword]])
    ranked = ranked[:top_k]
    rows = docstore.chunks_by_ids([i for i, _ in ranked])  # deleted meanwhile: dropped
    dense_s, keyword_s = dict(dense), dict(keyword)
    out = []
    for chunk_id, score in ranked:
        row = rows.get(chunk_id)
        if row is None:
            continue
        parts = {}
        if chunk_id in dense_s:
            parts["dense"] = round(dense_s[chunk_id], 6)
        if chunk_id in keyword_s:
            parts["keyword"] = round(keyword_s[chunk_id], 6)
        out.append({"document_id": row["document_id"], "chunk_id": chunk_id, "score": round(float(score), 6),
                    "text": row["text"], "metadata": row["metadata"], "position": row["position"],
                    "start": row["start"], "end": row["end"], "heading": row["heading"], "scores": parts})
    return out
