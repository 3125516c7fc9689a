"""The Responses API request (POST /v1/responses). Only its own shape is checked here; what it means
for generation is checked by the chat request it becomes (service/api/responses/translate.py).

Unknown fields are ignored, as on chat, except a few Frontier sampling extensions that are passed
on to chat unchanged (`seed`, `top_k`, ...: EXTENSIONS)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.api.schemas.openai import INT32_MAX

# Chat fields a Responses request may carry as extensions (validated by ChatCompletionRequest).
EXTENSIONS = ("seed", "top_k", "min_p", "stop", "presence_penalty", "frequency_penalty", "repetition_penalty",
              "speculative", "ignore_eos")
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str | None = None
    input: str | list[Any]  # items are checked as they become messages (service/api/responses/items.py)
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    reasoning: dict[str, Any] | None = None  # {"effort", "summary"}
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None  # {"format": {...}, "verbosity"}
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # OpenAI fields that would change the result and are not implemented: refused when they ask for it.
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    truncation: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v):  # before the union, so that an error names `input` itself
        if not isinstance(v, (str, list)) or v == []:
            raise ValueError("input is a string or a non-empty list of items")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is None:
            return v
        if len(v) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
        if any(len(k) > MAX_METADATA_KEY or len(s) > MAX_METADATA_VALUE for k, s in v.items()):
            raise ValueError(f"keys are at most {MAX_METADATA_KEY} characters, values at most {MAX_METADATA_VALUE}")
        return v

    def extensions(self) -> dict[str, Any]:
        extra = self.model_extra or {}
        return {k: extra[k] for k in EXTENSIONS if extra.get(k) is not None}
