"""POST /v1/embeddings."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request

from service.api.deps import resolve_model, state
from service.api.errors import APIError
from service.api.schemas.openai import EmbeddingRequest
from service.pool.manifest import Task

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    st = state(request)
    lm = await resolve_model(request, body.model, (Task.EMBEDDING,), st.settings.default_embedding_model)
    emb = lm.embedder
    raw = body.input
    if isinstance(raw, str):
        texts = [raw]
    elif all(isinstance(x, int) for x in raw):
        texts = [emb.tokenizer.decode(raw, skip_special_tokens=True)]
    else:
        texts = [x if isinstance(x, str) else emb.tokenizer.decode(x, skip_special_tokens=True) for x in raw]
    if any(not t for t in texts):
        raise APIError(400, "input strings must be non-empty", param="input")
    if body.dimensions is not None and body.dimensions > emb.dim:
        raise APIError(400, f"dimensions must be at most {emb.dim} for {lm.id}", param="dimensions")
    vectors = await emb.encode(texts)  # [n, dim], normalized
    if body.dimensions is not None and body.dimensions < emb.dim:
        vectors = vectors[:, : body.dimensions]
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    st.metrics.embedding_inputs.labels(lm.id).inc(len(texts))
    num_tokens = sum(emb.count_tokens(texts))
    data = []
    for i, vec in enumerate(vectors.numpy().astype(np.float32)):
        value = base64.b64encode(vec.tobytes()).decode() if body.encoding_format == "base64" else vec.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": lm.id,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}
