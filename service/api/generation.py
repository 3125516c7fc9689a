"""From a validated OpenAI request to engine outputs: sampling params, limits, metrics, merging.

Chat and completions share everything here; they differ only in how the prompt is built and how
chunks are shaped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from service.api.errors import APIError
from service.engine.types import GenerationRequest, RequestOutput, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


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


def check_sequences(num_prompts: int, n: int, limit: int) -> None:
    """Bounded work: one request may not queue more than `limit` sequences (prompts x n), however
    the engine's queue stands; checked before any prompt is tokenized."""
    if num_prompts * n > limit:
        raise APIError(400, f"this request asks for {num_prompts * n} sequences ({num_prompts} prompt(s) x n={n}); "
                       f"at most {limit} per request (max_sequences_per_request)", param="n",
                       code="too_many_sequences")


def check_token_ids(body, vocab: int) -> None:
    """Token ids a request names must exist in the model's vocabulary."""
    bad = [t for t in body.stop_token_ids or () if t >= vocab]
    if bad:
        raise APIError(400, f"stop_token_ids must be in [0, {vocab}); got {bad[0]}", param="stop_token_ids")


def admit(engine, reqs: list[GenerationRequest]) -> None:
    """Queue and size checks of all the request's generations at once, before the first response
    byte (a stream must not answer 200 and then fail with 429); the engine checks again."""
    check = getattr(engine, "check_admission", None)
    if check is not None:
        check(reqs)


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
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo + logprobs (first entry None)


async def _until(stream: AsyncIterator, deadline: float | None, timeout_s: float | None) -> AsyncIterator:
    """The items of `stream` until the deadline (loop time, None: none). Past it, and whenever this
    generator is closed, the stream is closed, which aborts the generation in the engine. The
    timeout wraps each wait, never a yield (the consumer's time between items is its own)."""
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if deadline is None:
                    raise
                raise APIError(504, f"the request took longer than request_timeout_s={timeout_s:g}s and was stopped",
                               type="server_error", code="request_timeout") from None
            yield item
    finally:
        await stream.aclose()


async def run_request(engine, greq: GenerationRequest, metrics, model_id: str,
                      timeout_s: float | None = None) -> AsyncIterator[RequestOutput]:
    """Engine outputs of one request, recording latency and token metrics as they pass.
    `timeout_s` (settings.request_timeout_s): the generation's deadline, None for none."""
    start = time.monotonic()
    last: dict[int, float] = {}
    first = True
    deadline = asyncio.get_running_loop().time() + timeout_s if timeout_s else None
    try:
        async for out in _until(engine.generate(greq), deadline, timeout_s):
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


async def _disconnected(request: Request) -> None:
    """Return when the client goes away: waits on the ASGI receive channel (the body is already
    read, so the next message is http.disconnect), which works behind any middleware that passes
    receive on. Polling `request.is_disconnected()` did not behind a BaseHTTPMiddleware
    (@app.middleware("http")): it reads under a cancelled scope, and that middleware's receive
    wrapper loses the message to the cancellation in its own task group."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # no channel to watch (not an ASGI server?): just let the request finish
        log.warning("cannot watch for client disconnects", exc_info=True)
        await asyncio.Event().wait()


async def collect(request: Request, stream: AsyncIterator[tuple[int, RequestOutput]], choices: dict[int, Choice]):
    """Drain a non-streamed request; stop (and abort: KV freed) if the client disconnects meanwhile."""

    async def drain():
        async for idx, out in stream:
            c = choices[idx]
            c.text += out.text
            c.token_ids += out.token_ids
            if out.logprobs:
                c.logprobs += out.logprobs
            if out.prompt_logprobs is not None:
                c.prompt_logprobs = out.prompt_logprobs
            c.num_generated = out.num_generated_tokens
            if out.finished:
                c.finish_reason = "length" if out.finish_reason and out.finish_reason.value == "length" else "stop"

    task = asyncio.create_task(drain())
    watcher = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled: closing the stream aborts the engine's sequences
        watcher.cancel()
        task.cancel()
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
