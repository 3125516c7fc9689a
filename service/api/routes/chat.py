"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request

from service.api.deps import resolve_model, state
from service.api.errors import APIError
from service.api.generation import Choice, check_context, collect, indexed, run_request, sampling_params, usage
from service.api.logprobs import chat_logprobs
from service.api.schemas.openai import ChatCompletionRequest
from service.api.streaming import sse_response
from service.engine.types import GenerationRequest
from service.pool.manifest import Task

router = APIRouter()


def render_chat(tokenizer, messages: list[dict], model_id: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model {model_id!r} has no chat template; use /v1/completions",
                       param="model", code="no_chat_template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # templates raise on unsupported role orders etc.
        raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from None


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = state(request)
    lm = await resolve_model(request, body.model, (Task.CHAT, Task.VISION_CHAT, Task.COMPLETION),
                             st.settings.default_chat_model)
    if body.tools:
        raise APIError(400, "tool calling is not supported yet", param="tools", code="unsupported")
    if any(m.has_images() for m in body.messages) and lm.manifest.task != Task.VISION_CHAT:
        raise APIError(400, f"model {lm.id!r} does not accept images", param="messages",
                       code="images_not_supported")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    prompt = await asyncio.to_thread(render_chat, lm.tokenizer, messages, lm.id)
    prompt_ids = await asyncio.to_thread(lambda: lm.tokenizer.encode(prompt, add_special_tokens=False))
    max_tokens = body.max_completion_tokens or body.max_tokens
    check_context(len(prompt_ids), max_tokens, lm.max_model_len, "messages")
    params = sampling_params(body, max_tokens, len(prompt_ids), lm.max_model_len, st.settings.max_tokens_default,
                             body.logprobs, body.top_logprobs or 0, lm.manifest.defaults)
    greq = GenerationRequest(prompt_token_ids=prompt_ids, sampling=params)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    stream = indexed(run_request(lm.engine, greq, st.metrics, lm.id), 0)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(stream, lm, completion_id, created, params.n, len(prompt_ids), include_usage,
                                    body.logprobs))
    choices = {i: Choice(i) for i in range(params.n)}
    await collect(request, stream, choices)
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": lm.id,
        "choices": [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(lm.tokenizer, c.logprobs) if body.logprobs else None,
            "finish_reason": c.finish_reason,
        } for c in choices.values()],
        "usage": usage(len(prompt_ids), sum(c.num_generated for c in choices.values())),
        "system_fingerprint": f"frontier-{lm.engine_kind}",
    }


async def _stream(stream, lm, completion_id, created, n, num_prompt, include_usage, logprobs):
    def chunk(choices, usage_=None):
        c = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": lm.id,
             "system_fingerprint": f"frontier-{lm.engine_kind}", "choices": choices}
        if include_usage:
            c["usage"] = usage_
        return c

    for i in range(n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    generated = [0] * n
    async for idx, out in stream:
        generated[idx] = out.num_generated_tokens
        if out.text or out.logprobs:
            yield chunk([{"index": idx, "delta": {"content": out.text},
                          "logprobs": chat_logprobs(lm.tokenizer, out.logprobs) if logprobs and out.logprobs else None,
                          "finish_reason": None}])
        if out.finished:
            reason = "length" if out.finish_reason.value == "length" else "stop"
            yield chunk([{"index": idx, "delta": {}, "logprobs": None, "finish_reason": reason}])
    if include_usage:
        yield chunk([], usage(num_prompt, sum(generated)))
