"""OpenAI-shaped request models. Unknown fields are ignored (as vLLM does); known ones validated."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.engine.config import MAX_SPECULATIVE_TOKENS  # torch-free

# Bounds of the engine's integer types: anything past them is a 400 naming the field, never an
# overflow inside a batched engine step (which would fail every request in the batch).
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_TOKEN_IDS = 256
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class ContentPart(_Lenient):
    type: Literal["text", "image_url", "input_text"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls (service/structured/tools.py)
    tool_call_id: str | None = None  # a tool result: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type in ("text", "input_text"))

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(p.type == "image_url" for p in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class SpeculativeRequest(BaseModel):
    """`speculative` (extension, vLLM-style): speculative decoding for this request. Fields left out
    take the server's defaults (FRONTIER_SPECULATIVE_*, then the manifest's `speculative`); unknown
    keys are errors. Whether a method is available is decided by the serving layer
    (service/serving/params.py `speculative_params`), not here."""
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    method: Literal["ngram", "draft", "off"] | None = None
    num_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_SPECULATIVE_TOKENS)] | None = None
    model: str | None = None  # draft model id (method "draft" only)

    @field_validator("model")
    @classmethod
    def _model(cls, v, info):
        if v is not None and info.data.get("method") not in (None, "draft"):
            raise ValueError('a draft model is named only with method "draft" (or the default method)')
        return v


class _SamplingFields(_Lenient):
    model: str | None = None
    response_format: dict[str, Any] | None = None  # text | json_object | json_schema (service/structured)
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, le=INT32_MAX)]],
                              Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (vLLM): generate exactly max_tokens, for benchmarks
    speculative: SpeculativeRequest | None = None  # extension: speculative decoding (see SpeculativeRequest)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):  # the hold-back check costs ~length^2 per token
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        return stops


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # Extensions owned by other stages (reasoning, RAG) are accepted here and validated there.
    reasoning_effort: str | None = None
    reasoning: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    rag: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None  # legacy tools
    function_call: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 only with echo (the route checks): the prompt and its logprobs, nothing generated (lm-eval).
    max_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v


class EmbeddingRequest(_Lenient):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    user: str | None = None
    # vLLM's opt-in: -1 embeds the first max_seq_length tokens of a longer input (else such an input
    # is a 400); a number at least the model's limit means the same.
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("input must not be empty")
        return v  # count and token ids are checked by the route (settings, the model's vocabulary)
