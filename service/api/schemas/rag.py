"""Request bodies of /v1/rag/*. Unknown fields are errors here (a typo in "top_k" should not pass)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.api.schemas.openai import ChatCompletionRequest, ChatMessage

DocId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^/\x00-\x1f]+$")]
Mode = Literal["dense", "keyword", "hybrid"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class CreateCollectionRequest(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    embedding_model: str | None = None
    chunk_size: Annotated[int, Field(ge=8, le=8192)] | None = None
    chunk_overlap: Annotated[int, Field(ge=0)] | None = None
    ann_threshold: Annotated[int, Field(ge=1)] | None = None  # exact search up to this many vectors
    metadata: dict[str, Any] | None = None


class DocumentIn(_Strict):
    id: DocId | None = None
    text: Annotated[str, Field(min_length=1)]
    metadata: dict[str, Any] = Field(default_factory=dict)


class AddDocumentsRequest(_Strict):
    documents: Annotated[list[DocumentIn], Field(min_length=1)]
    upsert: bool = False  # replace documents whose id exists instead of answering 409


class ReplaceDocumentRequest(_Strict):
    text: Annotated[str, Field(min_length=1)]
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchRequest(_Strict):
    query: Annotated[str, Field(min_length=1, max_length=10_000)]
    top_k: Annotated[int, Field(ge=1, le=100)] = 5
    mode: Mode = "hybrid"
    filter: dict[str, Any] | None = None


class RagChatRequest(ChatCompletionRequest):
    """A chat completion grounded in the collection of the path; `query` is a shortcut for one user message."""

    messages: list[ChatMessage] | None = None  # type: ignore[assignment]
    query: str | None = None
    top_k: Annotated[int, Field(ge=1, le=50)] = 4
    mode: Mode = "hybrid"
    filter: dict[str, Any] | None = None

    @field_validator("query")
    @classmethod
    def _query(cls, v):
        if v is not None and not v.strip():
            raise ValueError("query must be non-empty")
        return v

    @model_validator(mode="after")
    def _one_of(self):
        if not self.messages and not self.query:
            raise ValueError("give messages or query")
        return self
