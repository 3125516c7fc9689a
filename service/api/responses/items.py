"""Responses conversation items -> chat messages.

A conversation is a list of items: messages (`{"role", "content"}`, `type: "message"` optional),
the model's earlier `function_call`s and the client's `function_call_output`s. A response's own
output items are valid input items too, which is how a stored response is replayed for
`previous_response_id`. Consecutive calls join the assistant message before them (one assistant
turn with `tool_calls`, as chat writes it); reasoning and file search items of earlier turns are
not shown to the model again (chat drops earlier thoughts too; the sources are searched afresh).
"""

from __future__ import annotations

from typing import Any, Callable

from service.api.errors import APIError

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
NOT_SHOWN_AGAIN = ("reasoning", "file_search_call")


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's `input` as items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value)


def to_messages(items: list[Any], where: Callable[[int], str]) -> list[dict]:
    """Chat messages (ChatMessage dicts) for the items; `where(i)` names item i in an error."""
    messages: list[dict] = []
    for i, item in enumerate(items):
        param = where(i)
        if not isinstance(item, dict):
            raise APIError(400, "each input item is an object", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            call = {"id": _text_field(item, "call_id", param), "type": "function",
                    "function": {"name": _text_field(item, "name", param),
                                 "arguments": _text_field(item, "arguments", param)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last["tool_calls"] = [*(last.get("tool_calls") or []), call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _text_field(item, "call_id", param),
                             "content": _call_output(item.get("output"), f"{param}.output")})
        elif kind not in NOT_SHOWN_AGAIN:
            raise APIError(400, f"input items of type {kind!r} are not supported (supported: message, "
                           "function_call, function_call_output)", param=f"{param}.type", code="unsupported")
    return messages


def _text_field(item: dict, key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(400, f"'{key}' must be a string", param=f"{param}.{key}")
    return value


def _message(item: dict, param: str) -> dict:
    role = item.get("role")
    if role not in ROLES:
        raise APIError(400, f"'role' must be one of {', '.join(ROLES)}", param=f"{param}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise APIError(400, "'content' is a string or a list of content parts", param=f"{param}.content")
    parts = [_part(p, f"{param}.content.{j}") for j, p in enumerate(content)]
    return {"role": role, "content": parts}


def _part(part: Any, param: str) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in TEXT_PARTS:
        return {"type": "text", "text": _text_field(part, "text", param)}
    if kind == "refusal":  # an earlier assistant refusal, replayed
        return {"type": "text", "text": _text_field(part, "refusal", param)}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):  # file_id: there is no Files API here
            raise APIError(400, "input_image needs 'image_url' (a data: or https: URL); file_id is not supported",
                           param=f"{param}.image_url", code="unsupported")
        return {"type": "image_url", "image_url": {"url": url, "detail": part.get("detail")}}
    raise APIError(400, f"content parts of type {kind!r} are not supported (supported: input_text, "
                   "input_image, output_text)", param=f"{param}.type", code="unsupported")


def _call_output(output: Any, param: str) -> str:
    """A function's result: a string, or a list of text parts (joined)."""
    if isinstance(output, str):
        return output
    if not isinstance(output, list):
        raise APIError(400, "'output' must be a string or a list of input_text parts", param=param)
    texts = []
    for j, p in enumerate(output):
        if not (isinstance(p, dict) and p.get("type") in TEXT_PARTS):
            raise APIError(400, "function_call_output parts other than text are not supported",
                           param=f"{param}.{j}", code="unsupported")
        texts.append(_text_field(p, "text", f"{param}.{j}"))
    return "".join(texts)
