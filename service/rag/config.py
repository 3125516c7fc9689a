"""RAG settings (from service.config.Settings' rag_* fields) and the ingest input type."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RagConfig:
    chunk_size: int = 200
    chunk_overlap: int = 40
    ann_threshold: int = 50_000
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 128
    max_file_bytes: int = 5 * 1024 * 1024
    max_chunks_per_request: int = 2000
    max_documents_per_request: int = 256
    save_interval_s: float = 2.0

    @classmethod
    def from_settings(cls, s) -> "RagConfig":
        return cls(**{k: getattr(s, f"rag_{k}") for k in cls.__dataclass_fields__ if hasattr(s, f"rag_{k}")})


@dataclass
class DocInput:
    text: str
    id: str | None = None
    metadata: dict | None = None
    source: str | None = None  # file name for uploads
