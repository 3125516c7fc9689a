"""Sentence embeddings (sentence-transformers), run off the event loop one batch at a time."""

from __future__ import annotations

import threading

import torch

from service.engine.fresh_thread import run_in_fresh_thread


class Embedder:
    def __init__(self, model_dir, device: torch.device, max_batch: int = 64):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(model_dir), device=str(device), local_files_only=True)
        self.tokenizer = self.model.tokenizer
        self.dim = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") \
            else self.model.get_sentence_embedding_dimension()
        self.max_seq_length = self.model.max_seq_length
        self.max_batch = max_batch
        self._lock = threading.Lock()  # one encode at a time: the cores are the bottleneck

    def count_tokens(self, texts: list[str]) -> list[int]:
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_seq_length)
        return [len(ids) for ids in enc["input_ids"]]

    def encode_sync(self, texts: list[str]) -> torch.Tensor:
        # -> [len(texts), dim], L2-normalized (cosine similarity = dot product)
        with self._lock, torch.inference_mode():
            return self.model.encode(texts, batch_size=self.max_batch, convert_to_tensor=True,
                                     normalize_embeddings=True, show_progress_bar=False).float().cpu()

    async def encode(self, texts: list[str]) -> torch.Tensor:
        return await run_in_fresh_thread(self.encode_sync, texts, name="embed")
