"""The app factory: builds settings, registry, pool and metrics, and owns their lifetime."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from starlette.routing import Match

from service.api.errors import APIError, error_response, install_error_handlers
from service.api.routes import chat, completions, embeddings, rag, system
from service.config import Settings
from service.metrics import Metrics
from service.pool.manifest import Registry
from service.pool.pool import ModelPool

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    pool: ModelPool
    metrics: Metrics
    load_error: str | None = None
    rag: object | None = None  # service.rag.store.RagStore: collections under settings.data_dir/rag


async def _load_defaults(st: AppState) -> None:
    for model_id in st.settings.models:
        try:
            await st.pool.load(model_id, pinned=True)
        except Exception as exc:  # /ready reports it; /health stays up so operators can look
            st.load_error = f"{model_id}: {exc}"
            log.error("could not load %s: %s", model_id, exc)
            return


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    pool = ModelPool(settings, Registry(settings.manifests_dir))
    metrics = Metrics()
    metrics.watch_pool(pool)
    st = AppState(settings, pool, metrics)
    st.rag = rag.build_store(settings, pool, metrics)
    metrics.watch_rag(st.rag)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(_load_defaults(st))
        await st.rag.start()  # verifies each collection's index against SQLite, rebuilds what is broken
        try:
            yield
        finally:
            loader.cancel()
            await st.rag.close()  # saves changed indexes
            await pool.shutdown()

    app = FastAPI(title="Frontier", version="0.1.0", lifespan=lifespan)
    app.state.frontier = st
    install_error_handlers(app)
    for r in (system.router, chat.router, completions.router, embeddings.router, rag.router):
        app.include_router(r)

    @app.middleware("http")
    async def edge(request: Request, call_next):
        path = request.url.path
        if settings.api_key and path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
                return error_response(APIError(401, "missing or invalid API key (Authorization: Bearer ...)",
                                               type="authentication_error", code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_request_bytes:
            return error_response(APIError(413, f"request body over {settings.max_request_bytes} bytes",
                                           code="request_too_large"))
        _default_to_json(request)
        response = await call_next(request)
        route = _route_template(app, request)
        if route != "/metrics":
            model = getattr(request.state, "model", "")
            metrics.requests.labels(route, model, str(response.status_code)).inc()
        return response

    return app


def _route_template(app: FastAPI, request: Request) -> str:
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return getattr(route, "path", request.url.path)
    return "unmatched"


def _default_to_json(request: Request) -> None:
    """`curl -d '{...}'` sends form encoding; like Ollama and llama.cpp, read such bodies as JSON.
    Multipart uploads (RAG files) keep their content type."""
    ctype = request.headers.get("content-type", "")
    if request.method in ("POST", "PUT") and (not ctype or ctype.startswith("application/x-www-form-urlencoded")):
        headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
        request.scope["headers"] = headers + [(b"content-type", b"application/json")]
