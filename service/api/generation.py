"""From a validated OpenAI request to engine outputs: sampling params, limits, metrics, merging.

Chat and completions share everything here; they differ only in how the prompt is built and how
chunks are shaped.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from service.api.errors import APIError
from service.engine.types import GenerationRequest, RequestOutput, SamplingParams, TokenLogprob


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str) -> None:
    if prompt_len >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the "
                       f"prompt has {prompt_len} tokens. Shorten the {param}.", param=param,
                       code="context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                       f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {param}, "
                       f"{max_tokens} in the completion). Reduce the length of the {param} or max_tokens.",
                       param="max_tokens", code="context_length_exceeded")


def _pick(value, default, fallback):
    return value if value is not None else (default if default is not None else fallback)


def sampling_params(body, max_tokens: int | None, prompt_len: int, max_model_len: int, default_cap: int,
                    logprobs: bool, top_logprobs: int, defaults=None,
                    stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
    """Fields left out take the manifest's defaults, then OpenAI's (temperature 1, top_p 1).
    Without max_tokens: the rest of the context, capped by settings.max_tokens_default."""
    if max_tokens is None:
        max_tokens = min(default_cap, max_model_len - prompt_len)
    top_k = _pick(body.top_k, defaults and defaults.top_k, 0)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_pick(body.temperature, defaults and defaults.temperature, 1.0),
        top_p=_pick(body.top_p, defaults and defaults.top_p, 1.0),
        top_k=0 if top_k < 0 else top_k,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=_pick(body.repetition_penalty, defaults and defaults.repetition_penalty, 1.0),
        seed=body.seed,
        stop=tuple(body.stop or ()),
        stop_token_ids=tuple(body.stop_token_ids or ()) + stop_token_ids,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        n=body.n,
    )


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_generated: int = 0


async def run_request(engine, greq: GenerationRequest, metrics, model_id: str) -> AsyncIterator[RequestOutput]:
    """Engine outputs of one request, recording latency and token metrics as they pass."""
    start = time.monotonic()
    last: dict[int, float] = {}
    first = True
    try:
        async for out in engine.generate(greq):
            now = time.monotonic()
            if first:
                metrics.ttft.labels(model_id).observe(now - start)
                metrics.prompt_tokens.labels(model_id).inc(out.num_prompt_tokens)
                first = False
            elif out.index in last:
                metrics.itl.labels(model_id).observe(now - last[out.index])
            last[out.index] = now
            metrics.generation_tokens.labels(model_id).inc(len(out.token_ids))
            if out.finished:
                metrics.finished.labels(model_id, out.finish_reason.value if out.finish_reason else "none").inc()
            if out.error:
                raise APIError(500, f"generation failed: {out.error}", type="server_error")
            yield out
    finally:
        metrics.e2e.labels(model_id).observe(time.monotonic() - start)


async def merge(streams: list[AsyncIterator]) -> AsyncIterator:
    """Interleave several async iterators as items arrive (several prompts of one request)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(it):
        try:
            async for item in it:
                await queue.put(item)
        except BaseException as exc:  # re-raised in the consumer
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


async def collect(request: Request, stream: AsyncIterator[tuple[int, RequestOutput]], choices: dict[int, Choice]):
    """Drain a non-streamed request; stop (and abort) if the client disconnects meanwhile."""

    async def drain():
        async for idx, out in stream:
            c = choices[idx]
            c.text += out.text
            c.token_ids += out.token_ids
            if out.logprobs:
                c.logprobs += out.logprobs
            c.num_generated = out.num_generated_tokens
            if out.finished:
                c.finish_reason = "length" if out.finish_reason and out.finish_reason.value == "length" else "stop"

    task = asyncio.create_task(drain())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done and await request.is_disconnected():
            task.cancel()
            break
    try:
        await task
    except asyncio.CancelledError:
        raise APIError(499, "client disconnected", code="client_closed") from None


async def indexed(stream: AsyncIterator[RequestOutput], offset: int) -> AsyncIterator[tuple[int, RequestOutput]]:
    async for out in stream:
        yield offset + out.index, out


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if reasoning_tokens is not None:
        u["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return u
