"""A Responses request -> the validated chat request that the serving pipeline runs.

/v1/responses has no generation path of its own: its request becomes a ChatCompletionRequest
(messages from the conversation items, max_completion_tokens, temperature, top_p,
reasoning_effort, chat-shaped tools and tool_choice, response_format, and `rag` for the
file_search tool), then goes through `prepare_chat` and `submit` like any chat request.
Errors from that pipeline name chat fields; `Translation.param` names them as the Responses
request does (`response_format.json_schema.schema` -> `text.format.schema`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from service.api.errors import APIError
from service.api.responses.items import to_messages
from service.api.schemas.openai import ChatCompletionRequest
from service.api.schemas.responses import ResponsesRequest

# `include` values that need nothing from us: file search results are always in the output, there
# is no encrypted reasoning to return (the thought is in the reasoning item), images are echoed as sent.
HARMLESS_INCLUDES = {"file_search_call.results", "reasoning.encrypted_content", "message.input_image.image_url"}
SUMMARIES = (None, "auto", "concise", "detailed")
# OpenAI's file_search filter comparisons -> the RAG filter operators (service/rag/filters.py)
COMPARISONS = {"eq": "$eq", "ne": "$ne", "gt": "$gt", "gte": "$gte", "lt": "$lt", "lte": "$lte", "in": "$in",
               "nin": "$nin"}
RAG_FIELDS = {"collection": "vector_store_ids", "top_k": "max_num_results", "filter": "filters"}


@dataclass
class Translation:
    chat: ChatCompletionRequest | None = None  # set once the fields below are known (they name its errors)
    function_at: dict[int, int] = field(default_factory=dict)  # chat tools index -> the request's tools index
    search_at: int | None = None  # the request's tools index of the file_search tool, when it runs

    def param(self, chat_param: str | None) -> str | None:
        """A chat field named in a pipeline error, as the Responses request names it."""
        if chat_param is None:
            return None
        head, _, rest = chat_param.partition(".")
        if head == "messages":
            return "input"
        if head in ("max_completion_tokens", "max_tokens"):
            return "max_output_tokens"
        if head == "reasoning_effort":
            return "reasoning.effort"
        if head == "response_format":
            rest = rest.removeprefix("json_schema").lstrip(".")
            return "text.format" + (f".{rest}" if rest else "")
        if head in ("rag", "collection", "filter") and self.search_at is not None:  # the store names the latter two
            key = head if head != "rag" else rest.partition(".")[0]
            return f"tools.{self.search_at}" + (f".{RAG_FIELDS[key]}" if key in RAG_FIELDS else "")
        if head == "tools" and rest:
            index, _, tail = rest.partition(".")
            if index.isdigit():
                tail = tail.removeprefix("function").lstrip(".")
                return f"tools.{self.function_at.get(int(index), index)}" + (f".{tail}" if tail else "")
        return chat_param


def to_chat(body: ResponsesRequest, conversation: list, num_earlier: int) -> Translation:
    """`conversation`: the earlier response's items (`num_earlier` of them), then this request's input."""
    _refuse_unimplemented(body)
    out = Translation()
    functions, rag = _tools(body.tools, out)
    if body.tool_choice == "none":  # no tool at all, the search included
        rag, out.search_at = None, None
    where = lambda i: f"input.{i - num_earlier}" if i >= num_earlier else "previous_response_id"  # noqa: E731
    messages = to_messages(conversation, where)
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    if not messages:
        raise APIError(400, "the input has no messages", param="input")
    fields = {"model": body.model, "messages": messages, "max_completion_tokens": body.max_output_tokens,
              "temperature": body.temperature, "top_p": body.top_p, "reasoning_effort": _effort(body.reasoning),
              "tools": functions or None, "tool_choice": _tool_choice(body.tool_choice, bool(functions), rag),
              "parallel_tool_calls": body.parallel_tool_calls, "response_format": _response_format(body.text),
              "rag": rag, "user": body.user, **body.extensions()}
    try:
        out.chat = ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = out.param(".".join(str(p) for p in first.get("loc", ())) or None)
        raise APIError(400, f"invalid value for '{param}': {first.get('msg', 'invalid value')}", param=param) from None
    return out


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported")


def _refuse_unimplemented(body: ResponsesRequest) -> None:
    if body.background:
        raise _unsupported("background", "background responses are not supported")
    if body.conversation is not None:
        raise _unsupported("conversation", "conversations are not supported; use previous_response_id")
    if body.prompt is not None:
        raise _unsupported("prompt", "prompt templates are not supported")
    if body.truncation not in (None, "disabled"):
        raise _unsupported("truncation", "truncation 'auto' is not supported: an input longer than the context "
                           "is a 400")
    if body.top_logprobs:
        raise _unsupported("top_logprobs", "logprobs are not supported on /v1/responses; use /v1/chat/completions")
    for value in body.include or []:
        if value not in HARMLESS_INCLUDES:
            raise _unsupported("include", f"include {value!r} is not supported")


def _tools(tools: list | None, out: Translation) -> tuple[list[dict], dict | None]:
    """(chat function tools, the chat `rag` spec of the file_search tool or None)."""
    functions, rag = [], None
    for i, tool in enumerate(tools or []):
        kind = tool.get("type")
        if kind == "function":
            out.function_at[len(functions)] = i
            functions.append({"type": "function", "function": {
                k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}})
        elif kind == "file_search":
            if rag is not None:
                raise _unsupported(f"tools.{i}", "at most one file_search tool")
            rag, out.search_at = _file_search(tool, f"tools.{i}"), i
        else:
            raise _unsupported(f"tools.{i}.type", f"tools of type {kind!r} are not supported (supported: function, "
                               "file_search over a RAG collection)")
    return functions, rag


def _file_search(tool: dict, param: str) -> dict:
    ids = tool.get("vector_store_ids")
    if not (isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], str)):
        raise APIError(400, "file_search takes exactly one vector_store_ids entry: the name of a RAG collection",
                       param=f"{param}.vector_store_ids")
    spec = {"collection": ids[0]}
    if tool.get("max_num_results") is not None:
        spec["top_k"] = tool["max_num_results"]
    if tool.get("filters") is not None:
        spec["filter"] = _filter(tool["filters"], f"{param}.filters")
    ranking = tool.get("ranking_options") or {}
    if ranking.get("score_threshold") or ranking.get("hybrid_search"):
        raise _unsupported(f"{param}.ranking_options", "ranking_options score_threshold and hybrid_search are not "
                           "supported (the search is hybrid: dense and keyword, rank-fused)")
    return spec


def _filter(flt, param: str) -> dict:
    """OpenAI's comparison / compound filters -> a RAG metadata filter."""
    kind = flt.get("type") if isinstance(flt, dict) else None
    if kind in ("and", "or") and isinstance(flt.get("filters"), list):
        return {f"${kind}": [_filter(f, f"{param}.filters.{j}") for j, f in enumerate(flt["filters"])]}
    if kind in COMPARISONS and isinstance(flt.get("key"), str) and "value" in flt:
        return {flt["key"]: {COMPARISONS[kind]: flt["value"]}}
    raise APIError(400, 'a filter is {"type": "eq"|"ne"|"gt"|"gte"|"lt"|"lte"|"in"|"nin", "key", "value"} or '
                   '{"type": "and"|"or", "filters": [...]}', param=param)


def _tool_choice(choice, has_functions: bool, rag: dict | None):
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function":
            return {"type": "function", "function": {"name": choice.get("name")}}
        if kind == "file_search" and rag is not None:
            return "none"  # the search always runs; forcing it leaves the functions out
        raise _unsupported("tool_choice", f"tool_choice of type {kind!r} is not supported")
    if rag is not None and choice in ("auto", "required"):
        # The search is a tool call already: the functions become optional.
        return "auto" if has_functions else None
    return choice


def _effort(reasoning: dict | None) -> str | None:
    if reasoning is None:
        return None
    unknown = set(reasoning) - {"effort", "summary", "generate_summary"}
    if unknown:
        raise _unsupported("reasoning", f"unknown reasoning fields: {', '.join(sorted(unknown))}")
    if reasoning.get("summary", reasoning.get("generate_summary")) not in SUMMARIES:
        raise APIError(400, "'reasoning.summary' must be auto, concise or detailed", param="reasoning.summary")
    effort = reasoning.get("effort")
    if effort is not None and not isinstance(effort, str):
        raise APIError(400, "'reasoning.effort' must be a string", param="reasoning.effort")
    return effort


def _response_format(text: dict | None) -> dict | None:
    if text is None:
        return None
    if text.get("verbosity") not in (None, "medium"):
        raise _unsupported("text.verbosity", "text.verbosity other than medium is not supported")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    raise APIError(400, "'text.format.type' must be text, json_object or json_schema", param="text.format.type")
