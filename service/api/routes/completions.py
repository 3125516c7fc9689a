"""POST /v1/completions (legacy text completions): one or more prompts, n choices each.

`echo` puts the prompt in front of each choice's text; with `logprobs` too, the prompt's tokens
come first in the logprobs (the first one's logprob null), as OpenAI's legacy API and vLLM answer:
what perplexity and lm-evaluation-harness loglikelihood tasks read (echo, logprobs=N, max_tokens
0 or 1, temperature 0). `max_tokens: 0` is accepted with echo only: the prompt, nothing generated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from fastapi import APIRouter, Request

from service.api.deps import resolve_model, state
from service.api.errors import APIError
from service.api.generation import (Choice, admit, check_context, check_sequences, check_token_ids, collect, indexed,
                                    merge, run_request, sampling_params, usage)
from service.api.logprobs import completion_logprobs, concat_logprobs, prompt_logprobs
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
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be at least 1; 0 is accepted only with echo (the prompt and "
                       "its logprobs, nothing generated)", param="max_tokens")
    lm = await resolve_model(request, body.model, (Task.COMPLETION, Task.CHAT), st.settings.default_chat_model)
    tok = lm.tokenizer
    prompts = _prompts(body.prompt)
    check_sequences(len(prompts), body.n, st.settings.max_sequences_per_request)  # before any tokenizing
    vocab = len(tok)
    check_token_ids(body, vocab)
    prompt_ids: list[list[int]] = []
    for p in prompts:
        prompt_ids.append(list(p) if isinstance(p, list) else await asyncio.to_thread(tok.encode, p))
    for ids in prompt_ids:
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if any(i < 0 or i >= vocab for i in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        check_context(len(ids), body.max_tokens, lm.max_model_len, "prompt")
    n = body.n
    top = body.logprobs or 0
    # echo + logprobs: the engine also scores the prompt's tokens (top-k alternatives as asked)
    prompt_top = body.logprobs if body.echo and body.logprobs is not None else None
    greqs, prompts_text = [], []
    for p, ids in zip(prompts, prompt_ids):
        # 16: OpenAI's default max_tokens for legacy completions.
        params = sampling_params(body, 16 if body.max_tokens is None else body.max_tokens, len(ids),
                                 lm.max_model_len, st.settings.max_tokens_default, body.logprobs is not None, top, lm.manifest.defaults)
        if prompt_top is not None:
            params = dataclasses.replace(params, prompt_logprobs=prompt_top)
        greqs.append(GenerationRequest(prompt_token_ids=ids, sampling=params))
        # the prompt as given (OpenAI, vLLM); token-id prompts decoded
        prompts_text.append((p if isinstance(p, str) else tok.decode(ids)) if body.echo else "")
    admit(lm.engine, greqs)  # all prompts or none, before the first response byte
    timeout = st.settings.request_timeout_s
    streams = [indexed(run_request(lm.engine, g, st.metrics, lm.id, timeout), k * n) for k, g in enumerate(greqs)]
    merged = merge(streams)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    num_prompt = sum(len(ids) for ids in prompt_ids)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(merged, lm, cid, created, n, prompts_text, num_prompt, include_usage,
                                    body.logprobs is not None, prompt_ids if prompt_top is not None else None))
    choices = {i: Choice(i) for i in range(len(prompt_ids) * n)}
    await collect(request, merged, choices)

    def shape() -> list[dict]:  # decodes every token of every choice: off the event loop
        heads: dict[int, dict] = {}  # prompt index -> its echoed logprobs (shared by its n choices)
        if prompt_top is not None:
            for c in choices.values():
                if c.index // n not in heads and c.prompt_logprobs is not None:
                    heads[c.index // n] = prompt_logprobs(tok, prompt_ids[c.index // n], c.prompt_logprobs)
        out = []
        for c in choices.values():
            k = c.index // n
            echo, lps = prompts_text[k], None
            if body.logprobs is not None:
                lps = completion_logprobs(tok, c.logprobs, len(echo))
                if prompt_top is not None:
                    head = heads.get(k) or prompt_logprobs(tok, prompt_ids[k], None)  # None: no values came
                    lps = concat_logprobs(head, lps)
            out.append({"index": c.index, "text": echo + c.text, "finish_reason": c.finish_reason, "logprobs": lps})
        return out

    out = await asyncio.to_thread(shape)
    return {"id": cid, "object": "text_completion", "created": created, "model": lm.id, "choices": out,
            "usage": usage(num_prompt, sum(c.num_generated for c in choices.values())),
            "system_fingerprint": f"frontier-{lm.engine_kind}"}


async def _stream(merged, lm, cid, created, n, prompts_text, num_prompt, include_usage, logprobs, prompt_ids=None):
    """prompt_ids: set for echo + logprobs: the first chunk of each choice carries the echoed
    prompt with its logprobs (as vLLM streams it). Text offsets count from the choice's start."""
    def chunk(choices, usage_=None):
        c = {"id": cid, "object": "text_completion", "created": created, "model": lm.id, "choices": choices}
        if include_usage:
            c["usage"] = usage_
        return c

    tok = lm.tokenizer
    generated: dict[int, int] = {}
    sent: dict[int, int] = {}  # characters of text sent so far per choice (echo included)
    prompt_lps: dict[int, list] = {}  # prompt index -> its prompt logprobs (n choices share them)
    async for idx, out in merged:
        generated[idx] = out.num_generated_tokens
        text, lps = out.text, None
        k = idx // n
        if out.prompt_logprobs is not None:
            prompt_lps[k] = out.prompt_logprobs
        if idx not in sent:
            sent[idx] = len(prompts_text[k])
            text = prompts_text[k] + text
            if prompt_ids is not None:
                lps = await asyncio.to_thread(prompt_logprobs, tok, prompt_ids[k], prompt_lps.get(k))
        if logprobs and out.logprobs:
            lps = concat_logprobs(lps, completion_logprobs(tok, out.logprobs, sent[idx]))
        sent[idx] += len(out.text)
        reason = None
        if out.finished:
            reason = "length" if out.finish_reason.value == "length" else "stop"
        if text or out.finished or out.logprobs:
            yield chunk([{"index": idx, "text": text, "finish_reason": reason, "logprobs": lps}])
    if include_usage:
        yield chunk([], usage(num_prompt, sum(generated.values())))
