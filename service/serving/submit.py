"""Submitting prepared generations to an engine: admission before the first response byte, then
the engine's outputs with latency/token metrics and the request deadline.

`submit` checks every generation of a request synchronously (400 / 429 raise here, before any
response starts, streamed or not) and returns one stream of (choice index, output).
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from service.api.errors import APIError
from service.engine.types import GenerationRequest, RequestOutput


def submit(engine, greqs: list[GenerationRequest], metrics, model_id: str,
           timeout_s: float | None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Admit all of a request's generations (all or none), then stream their outputs, interleaved.
    Generation k's sequence i is choice (n of the generations before k) + i."""
    engine.check_admission(greqs)  # raises RequestTooLarge / EngineOverloaded: the API's 400 / 429
    for g in greqs:
        if g.multimodal is not None and g.multimodal.report:
            _record_images(metrics, model_id, g.multimodal.report)
    streams, offset = [], 0
    for g in greqs:
        streams.append(indexed(run_request(engine, g, metrics, model_id, timeout_s), offset))
        offset += g.sampling.n
    return merge(streams)


def _record_images(metrics, model_id: str, report: dict[str, float]) -> None:
    metrics.images.labels(model_id).inc(report.get("images", 0))
    metrics.image_cache_hits.labels(model_id).inc(report.get("cache_hits", 0))
    if report.get("encoded"):
        metrics.vision_encode.labels(model_id).observe(report.get("encode_seconds", 0.0))


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
                               code="request_timeout") from None
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
                raise APIError(500, f"generation failed: {out.error}")
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


async def indexed(stream: AsyncIterator[RequestOutput], offset: int) -> AsyncIterator[tuple[int, RequestOutput]]:
    async for out in stream:
        yield offset + out.index, out
