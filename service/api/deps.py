"""Access to what the app factory built (no module-level singletons)."""

from __future__ import annotations

from fastapi import Request

from service.api.errors import APIError
from service.pool.manifest import Task
from service.pool.pool import LoadedModel


def state(request: Request):
    return request.app.state.frontier


async def resolve_model(request: Request, model_id: str | None, tasks: tuple[Task, ...], default: str) -> LoadedModel:
    st = state(request)
    model_id = model_id or default
    lm = await st.pool.get(model_id)
    if lm.manifest.task not in tasks:
        wanted = " or ".join(t.value for t in tasks)
        raise APIError(400, f"model {model_id!r} is a {lm.manifest.task.value} model; this endpoint needs a "
                       f"{wanted} model", param="model", code="wrong_model_task")
    request.state.model = model_id
    return lm
