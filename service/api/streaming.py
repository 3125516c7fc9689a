"""Server-sent events: `data: <json>` lines, `data: [DONE]` at the end, errors as an event."""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from fastapi.responses import StreamingResponse

from service.api.errors import envelope, to_api_error

log = logging.getLogger(__name__)


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def sse_response(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield sse(event)
        except Exception as exc:  # mid-stream failure: one error event, then the stream ends
            err = to_api_error(exc)
            yield sse(envelope(err.message, err.type, err.param, err.code))
        yield sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
