"""POST /v1/completions (legacy text completions): one or more prompts, n choices each.

`echo` puts the prompt in front of each choice's text; with `logprobs` too, the prompt's tokens
come first in the logprobs (the first one's logprob null), as OpenAI's legacy API and vLLM answer:
what perplexity and lm-evaluation-harness loglikelihood tasks read (echo, logprobs=N, max_tokens
0 or 1, temperature 0). `max_tokens: 0` is accepted with echo only: the prompt, nothing generated.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request

from service.api.deps import resolve_model, state
from service.api.collect import Choice, collect, usage
from service.api.schemas.openai import CompletionRequest
from service.api.shapes.completions import completion_choices, completion_stream
from service.api.streaming import sse_response
from service.pool.manifest import Task
from service.serving.completions import prepare_completions
from service.serving.submit import submit

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    st = state(request)
    lm = await resolve_model(request, body.model, (Task.COMPLETION, Task.CHAT), st.settings.default_chat_model)
    prep = await prepare_completions(body, lm, st.settings)
    merged = submit(lm.engine, prep.requests, st.metrics, lm.id, st.settings.request_timeout_s)  # 400/429 here
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo_logprobs = body.echo and body.logprobs is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(completion_stream(merged, lm, cid, created, body.n, prep.prompts_text,
                                              prep.num_prompt_tokens, include_usage, body.logprobs is not None,
                                              prep.prompt_ids if echo_logprobs else None))
    choices = {i: Choice(i) for i in range(len(prep.requests) * body.n)}
    await collect(request, merged, choices)
    out = await asyncio.to_thread(completion_choices, body, lm.tokenizer, prep, choices)
    return {"id": cid, "object": "text_completion", "created": created, "model": lm.id, "choices": out,
            "usage": usage(prep.num_prompt_tokens, sum(c.num_generated for c in choices.values()),
                           reports=[c.report for c in choices.values()]),
            "system_fingerprint": f"frontier-{lm.engine_kind}"}
