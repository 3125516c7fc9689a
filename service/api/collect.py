"""Non-streamed responses: engine outputs gathered into choices, aborted if the client leaves;
and the OpenAI usage object."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from service.api.errors import APIError
from service.engine.types import RequestOutput, TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_generated: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo + logprobs (first entry None)
    report: dict | None = None  # the sequence's controller report (reasoning tokens...)


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
                c.report = out.report
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


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None,
          reports=()) -> dict:
    """OpenAI's usage object. `reports`: the sequences' final reports; where speculative decoding ran,
    its counts appear as OpenAI's predicted-output fields (accepted / rejected prediction tokens)."""
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    details = {} if reasoning_tokens is None else {"reasoning_tokens": reasoning_tokens}
    spec = [r for r in reports if r and "spec_draft_tokens" in r]
    if spec:
        accepted = sum(int(r.get("spec_accepted_tokens", 0)) for r in spec)
        details["accepted_prediction_tokens"] = accepted
        details["rejected_prediction_tokens"] = sum(int(r["spec_draft_tokens"]) for r in spec) - accepted
    if details:
        u["completion_tokens_details"] = details
    return u
