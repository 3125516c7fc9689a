"""The app factory: builds settings, registry, pool and metrics, and owns their lifetime."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from service.api.auth import load_keys
from service.api.drain import Drain, DrainMiddleware
from service.api.edge import EdgeMiddleware, RouteTable
from service.api.errors import install_error_handlers
from service.api.limits import RateLimiter
from service.api.responses.store import ResponseStore
from service.api.routes import chat, completions, embeddings, rag, responses, system
from service.config import Settings
from service.metrics import Metrics
from service.pool.manifest import Registry
from service.pool.pool import ModelPool
from service.rag.store import RagStore

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    pool: ModelPool
    metrics: Metrics
    load_error: str | None = None
    rag: RagStore | None = None  # collections under settings.data_dir/rag
    drain: Drain | None = None  # graceful stop: begun by the server on SIGTERM (service/cli.py)
    responses: ResponseStore | None = None  # stored /v1/responses (data_dir/responses.sqlite3)


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
    keys = load_keys(settings)  # a malformed key file stops the start, before any model loads
    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    pool = ModelPool(settings, Registry(settings.manifests_dir))
    metrics = Metrics()
    metrics.watch_pool(pool)
    st = AppState(settings, pool, metrics, drain=Drain(settings.shutdown_drain_s))
    st.rag = rag.build_store(settings, pool, metrics)
    metrics.watch_rag(st.rag)
    st.responses = ResponseStore.from_settings(settings)  # opens its database on first use

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(_load_defaults(st))
        await st.rag.start()  # verifies each collection's index against SQLite, rebuilds what is broken
        try:
            yield
        finally:  # after the server stopped serving (and drained, when a signal stopped it)
            st.drain.begin()  # anything still arriving (an in-process client) is refused, not half-served
            loader.cancel()
            try:
                await st.rag.close()  # saves changed indexes
            except Exception:  # SQLite has every acknowledged write; the index rebuilds from it at start
                log.exception("saving the RAG indexes at shutdown failed")
            st.responses.close()
            await pool.shutdown()
            log.info("stopped")

    app = FastAPI(title="Frontier", version="0.1.0", lifespan=lifespan)
    app.state.frontier = st
    install_error_handlers(app)
    routers = (system.router, chat.router, completions.router, embeddings.router, rag.router, responses.router)
    for r in routers:
        app.include_router(r)
    # Templates known before routing: auth needs them to pick a scope, metrics to label a rejected request.
    routes = RouteTable([r for r in app.router.routes if hasattr(r, "path_regex")] +
                        [r for router in routers for r in router.routes])
    app.add_middleware(DrainMiddleware, drain=st.drain)  # inside the edge: refusals are counted, auth comes first
    app.add_middleware(EdgeMiddleware, settings=settings, metrics=metrics, routes=routes, keys=keys,
                       limiter=RateLimiter())
    return app
