"""POST /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from fastapi import APIRouter, Request

from service.api.deps import resolve_model, state
from service.api.errors import APIError
from service.api.schemas.openai import EmbeddingRequest
from service.pool.manifest import Task

router = APIRouter()


def _tokens_embedded(counts: list[int], limit: int, truncate: int | None, model_id: str) -> int:
    """Tokens `encode` will read. An input over the model's limit is a 400 unless the request opts
    into truncation: silently embedding part of a text gives a vector that does not mean the text."""
    if truncate is not None and truncate != -1 and truncate < limit:
        raise APIError(400, f"truncate_prompt_tokens below the model's limit ({limit}) is not supported; use -1 to "
                       "embed the first tokens the model reads", param="truncate_prompt_tokens", code="unsupported")
    too_long = [(i, n) for i, n in enumerate(counts) if n > limit]
    if too_long and truncate is None:
        i, n = too_long[0]
        raise APIError(400, f"input {i} has {n} tokens; {model_id!r} embeds at most {limit}. Shorten it, or set "
                       "truncate_prompt_tokens: -1 to embed its first tokens only", param="input",
                       code="input_too_long")
    return sum(min(n, limit) for n in counts)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    st = state(request)
    lm = await resolve_model(request, body.model, (Task.EMBEDDING,), st.settings.default_embedding_model)
    emb = lm.embedder
    raw = body.input
    items = [raw] if isinstance(raw, str) or all(isinstance(x, int) for x in raw) else list(raw)
    limit = st.settings.max_embedding_inputs
    if len(items) > limit:
        raise APIError(400, f"{len(items)} inputs; at most {limit} per request (max_embedding_inputs)",
                       param="input", code="too_many_inputs")
    vocab = len(emb.tokenizer)
    for x in items:  # token ids outside the vocabulary would make the tokenizer raise (a 500)
        if isinstance(x, list) and any(not 0 <= t < vocab for t in x):
            raise APIError(400, f"input token ids must be in [0, {vocab})", param="input")
    texts = [x if isinstance(x, str) else emb.tokenizer.decode(x, skip_special_tokens=True) for x in items]
    if any(not t for t in texts):
        raise APIError(400, "input strings must be non-empty", param="input")
    if body.dimensions is not None and body.dimensions > emb.dim:
        raise APIError(400, f"dimensions must be at most {emb.dim} for {lm.id}", param="dimensions")
    num_tokens = _tokens_embedded(await asyncio.to_thread(emb.count_tokens, texts), emb.max_seq_length,
                                  body.truncate_prompt_tokens, lm.id)
    if num_tokens > st.settings.max_embedding_tokens:
        raise APIError(400, f"{num_tokens} input tokens; at most {st.settings.max_embedding_tokens} per request "
                       "(max_embedding_tokens)", param="input", code="too_many_tokens")
    vectors = await emb.encode(texts)  # [n, dim], normalized
    if body.dimensions is not None and body.dimensions < emb.dim:
        vectors = vectors[:, : body.dimensions]
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    st.metrics.embedding_inputs.labels(lm.id).inc(len(texts))
    data = []
    for i, vec in enumerate(vectors.numpy().astype(np.float32)):
        value = base64.b64encode(vec.tobytes()).decode() if body.encoding_format == "base64" else vec.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": lm.id,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}
