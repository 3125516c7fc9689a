"""Liveness, readiness, the model list and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import state
from service.pool.manifest import Task
from service.api.errors import APIError

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    st = state(request)
    if st.load_error:
        return JSONResponse({"status": "error", "error": st.load_error}, status_code=503)
    missing = [m for m in st.settings.models if m not in st.pool.loaded]
    if missing:
        return JSONResponse({"status": "loading", "waiting_for": missing}, status_code=503)
    return {"status": "ready", "models": sorted(st.pool.loaded)}


def _model_card(st, model_id: str) -> dict:
    m = st.pool.registry.manifests[model_id]
    lm = st.pool.loaded.get(model_id)
    card = {"id": model_id, "object": "model", "created": lm.created if lm else 0, "owned_by": "frontier",
            "task": m.task.value, "state": st.pool.state(model_id)}
    if m.task != Task.EMBEDDING:  # what a chat request may send it (loaded: what it has; else its manifest)
        images = lm.vision is not None if lm is not None else (m.vision is not None or m.task == Task.VISION_CHAT)
        card["input_modalities"] = ["text", "image"] if images else ["text"]
        if m.vision is not None and m.vision.sees:
            card["vision"] = {"sees": m.vision.sees}
    if lm is not None:
        card["max_model_len"] = lm.max_model_len
        if lm.engine_kind:
            card["engine"] = lm.engine_kind
        kernels = getattr(lm.engine, "kernels", None)
        if kernels:  # what the loader chose for this CPU, and the CPU it measured
            from service.modeling.cpu_info import cpu_summary

            card["kernels"] = {**kernels, "device": cpu_summary() if lm.engine.device.type == "cpu" else
                               str(lm.engine.device)}
    return card


@router.get("/v1/models")
async def list_models(request: Request):
    st = state(request)
    return {"object": "list", "data": [_model_card(st, mid) for mid in st.pool.registry.ids()]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request):
    st = state(request)
    if model_id not in st.pool.registry.manifests:
        raise APIError(404, f"model {model_id!r} does not exist", param="model",
                       code="model_not_found")
    return _model_card(st, model_id)


@router.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
