"""POST /v1/responses (OpenAI's Responses API) over the chat pipeline; GET and DELETE of stored
responses.

A request becomes a chat request (service/api/responses/translate.py), runs through
`prepare_chat` and `submit` exactly as /v1/chat/completions does, and its deltas are shaped into a
Response (service/api/responses/builder.py). Streams are SSE with named events
(`event: response.output_text.delta`), as OpenAI sends them and the SDK expects, and no [DONE].
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.api.collect import Choice, collect
from service.api.deps import resolve_model, state
from service.api.errors import APIError, to_api_error
from service.api.responses.builder import ResponseBuilder, new_id, response_head
from service.api.responses.items import input_items
from service.api.responses.translate import Translation, to_chat
from service.api.schemas.responses import ResponsesRequest
from service.engine.types import RequestTooLarge
from service.pool.manifest import Task
from service.rag.errors import RagError
from service.rag.grounding import last_user_text
from service.serving.chat import prepare_chat
from service.serving.submit import submit

router = APIRouter()


def _not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"no stored response {response_id!r} (never stored, deleted, or expired)", param=param,
                    code="response_not_found")


def _renamed(exc: Exception, tr: Translation) -> APIError:
    """A pipeline error naming a chat field, naming the Responses field instead."""
    err = to_api_error(exc)
    err.param = tr.param(err.param)
    return err


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    st = state(request)
    earlier: list[dict] = []
    if body.previous_response_id is not None:
        stored = await st.responses.get(body.previous_response_id)
        if stored is None:
            raise _not_found(body.previous_response_id, "previous_response_id")
        earlier = stored.conversation + stored.response["output"]  # output items are valid input items
    conversation = earlier + input_items(body.input)
    conversation_json = None
    if body.store:
        conversation_json = st.responses.encode_conversation(conversation, "previous_response_id" if earlier
                                                             else "input")
    tr = to_chat(body, conversation, len(earlier))
    lm = await resolve_model(request, tr.chat.model, (Task.CHAT, Task.VISION_CHAT, Task.COMPLETION),
                             st.settings.default_chat_model)
    try:
        prep = await prepare_chat(tr.chat, lm, st.settings, st.rag)
        stream = submit(lm.engine, [prep.request], st.metrics, lm.id, st.settings.request_timeout_s)  # 400/429 here
    except (APIError, RagError, RequestTooLarge) as exc:
        raise _renamed(exc, tr) from None
    head = response_head(body, lm.id, new_id("resp"), int(time.time()), prep.request.sampling)
    query = last_user_text(prep.job.messages) if tr.search_at is not None else None  # what grounding searched with
    builder = ResponseBuilder(head, prep, st.metrics, query)

    async def save(response: dict) -> None:
        if conversation_json is not None:
            await st.responses.put(response, conversation_json)

    if body.stream:
        return _event_stream(builder, stream, save)
    builder.start()
    await collect(request, _feeding(builder, stream), {0: Choice(0)})  # aborts if the client leaves
    builder.finish()
    await save(builder.response)
    return builder.response


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    stored = await state(request).responses.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored.response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    if not await state(request).responses.delete(response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


async def _feeding(builder: ResponseBuilder, stream):
    """The engine's outputs, each fed to the builder on its way to `collect`."""
    async for idx, out in stream:
        builder.feed(out)
        yield idx, out


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def _event_stream(builder: ResponseBuilder, stream, save) -> StreamingResponse:
    async def body():
        try:
            for event in builder.start():
                yield _sse(event)
            async for _, out in stream:  # a client that leaves cancels this: the stream closes, the engine aborts
                for event in builder.feed(out):
                    yield _sse(event)
            final = builder.finish()
            await save(builder.response)  # stored before the client hears of it: it can continue at once
            for event in final:
                yield _sse(event)
        except Exception as exc:  # mid-stream failure: an error event and response.failed, then the end
            for event in builder.failed(to_api_error(exc)):
                yield _sse(event)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
