"""POST /v1/completions (legacy text completions): one or more prompts, n choices each."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request

from service.api.deps import resolve_model, state
from service.api.errors import APIError
from service.api.generation import Choice, check_context, collect, indexed, merge, run_request, sampling_params, usage
from service.api.logprobs import completion_logprobs
from service.api.schemas.openai import CompletionRequest
from service.api.streaming import sse_response
from service.engine.types import GenerationRequest
from service.pool.manifest import Task

router = APIRouter()


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [prompt]  # one prompt given as token ids
    return list(prompt)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    st = state(request)
    lm = await resolve_model(request, body.model, (Task.COMPLETION, Task.CHAT), st.settings.default_chat_model)
    tok = lm.tokenizer
    prompt_ids: list[list[int]] = []
    for p in _prompts(body.prompt):
        prompt_ids.append(list(p) if isinstance(p, list) else await asyncio.to_thread(tok.encode, p))
    vocab = len(tok)
    for ids in prompt_ids:
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if any(i < 0 or i >= vocab for i in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        check_context(len(ids), body.max_tokens, lm.max_model_len, "prompt")
    n = body.n
    top = body.logprobs or 0
    streams, prompts_text = [], []
    for k, ids in enumerate(prompt_ids):
        # 16: OpenAI's default max_tokens for legacy completions.
        params = sampling_params(body, body.max_tokens or 16, len(ids),
                                 lm.max_model_len, st.settings.max_tokens_default, body.logprobs is not None, top, lm.manifest.defaults)
        greq = GenerationRequest(prompt_token_ids=ids, sampling=params)
        streams.append(indexed(run_request(lm.engine, greq, st.metrics, lm.id), k * n))
        prompts_text.append(tok.decode(ids) if body.echo else "")
    merged = merge(streams)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    num_prompt = sum(len(ids) for ids in prompt_ids)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(merged, lm, cid, created, n, prompts_text, num_prompt, include_usage,
                                    body.logprobs is not None))
    choices = {i: Choice(i) for i in range(len(prompt_ids) * n)}
    await collect(request, merged, choices)
    out = []
    for c in choices.values():
        echo = prompts_text[c.index // n]
        out.append({
            "index": c.index, "text": echo + c.text, "finish_reason": c.finish_reason,
            "logprobs": completion_logprobs(tok, c.logprobs, len(echo)) if body.logprobs is not None else None,
        })
    return {"id": cid, "object": "text_completion", "created": created, "model": lm.id, "choices": out,
            "usage": usage(num_prompt, sum(c.num_generated for c in choices.values())),
            "system_fingerprint": f"frontier-{lm.engine_kind}"}


async def _stream(merged, lm, cid, created, n, prompts_text, num_prompt, include_usage, logprobs):
    def chunk(choices, usage_=None):
        c = {"id": cid, "object": "text_completion", "created": created, "model": lm.id, "choices": choices}
        if include_usage:
            c["usage"] = usage_
        return c

    generated: dict[int, int] = {}
    echoed: set[int] = set()
    async for idx, out in merged:
        generated[idx] = out.num_generated_tokens
        text = out.text
        if idx not in echoed:
            echoed.add(idx)
            text = prompts_text[idx // n] + text
        reason = None
        if out.finished:
            reason = "length" if out.finish_reason.value == "length" else "stop"
        if text or out.finished or out.logprobs:
            yield chunk([{"index": idx, "text": text, "finish_reason": reason,
                          "logprobs": completion_logprobs(lm.tokenizer, out.logprobs) if logprobs and out.logprobs
                          else None}])
    if include_usage:
        yield chunk([], usage(num_prompt, sum(generated.values())))
