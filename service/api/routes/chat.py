"""POST /v1/chat/completions: validate, prepare (serving stages), submit, shape."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from service.api.collect import Choice, collect
from service.api.deps import resolve_model, state
from service.api.schemas.openai import ChatCompletionRequest
from service.api.shapes.chat import chat_response, chat_stream, replay
from service.api.streaming import sse_response
from service.pool.manifest import Task
from service.serving.chat import prepare_chat
from service.serving.submit import submit

router = APIRouter()


async def serve_chat(body: ChatCompletionRequest, request: Request):
    """A chat completion from a validated body; /v1/rag/collections/{name}/chat serves through it too."""
    st = state(request)
    lm = await resolve_model(request, body.model, (Task.CHAT, Task.VISION_CHAT, Task.COMPLETION),
                             st.settings.default_chat_model)
    prep = await prepare_chat(body, lm, st.settings, st.rag)
    stream = submit(lm.engine, [prep.request], st.metrics, lm.id, st.settings.request_timeout_s)  # 400/429 here
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    voting = prep.job.reasoning is not None and prep.job.reasoning.self_consistency
    if body.stream and not voting:
        return sse_response(chat_stream(prep, stream, completion_id, created, include_usage, st.metrics))
    choices = {i: Choice(i) for i in range(prep.request.sampling.n)}
    await collect(request, stream, choices)
    response = chat_response(prep, choices, completion_id, created, st.metrics)
    if body.stream:  # self-consistency: the winner is known only after the vote
        return sse_response(replay(response, include_usage))
    return response


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await serve_chat(body, request)
