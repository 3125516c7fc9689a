"""Request bodies of /v1/rag/*. Unknown fields are errors here (a typo in "top_k" should not pass).
Ids, names, metadata and filters use the checks of service/rag/validate.py (the store repeats them for
the other ways in): a 400 naming the field, never a value that cannot be stored and read back."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from service.api.schemas.openai import ChatCompletionRequest, ChatMessage
from service.rag.errors import RagError
from service.rag import validate


def _checked(check, *args):
    """An AfterValidator running a service.rag.validate check; its message (naming the nested place,
    e.g. metadata.tags.2) becomes the validation error at this field."""
    def run(value):
        if value is not None:
            try:
                check(value, *args)
            except RagError as exc:
                raise PydanticCustomError("invalid_value", "{reason}", {"reason": exc.message}) from None
        return value
    return AfterValidator(run)


DocId = Annotated[str, Field(min_length=1, max_length=256), _checked(validate.check_document_id)]
CollectionName = Annotated[str, Field(min_length=1, max_length=64), _checked(validate.check_collection_name)]
Metadata = Annotated[dict[str, Any], _checked(validate.check_json, "metadata")]
Filter = Annotated[dict[str, Any] | None, _checked(validate.check_json, "filter")]
Mode = Literal["dense", "keyword", "hybrid"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class CreateCollectionRequest(_Strict):
    name: CollectionName
    embedding_model: str | None = None
    chunk_size: Annotated[int, Field(ge=8, le=8192)] | None = None
    chunk_overlap: Annotated[int, Field(ge=0)] | None = None
    ann_threshold: Annotated[int, Field(ge=1)] | None = None  # exact search up to this many vectors
    metadata: Metadata | None = None


class DocumentIn(_Strict):
    id: DocId | None = None
    text: Annotated[str, Field(min_length=1)]
    metadata: Metadata = Field(default_factory=dict)


class AddDocumentsRequest(_Strict):
    documents: Annotated[list[DocumentIn], Field(min_length=1)]
    upsert: bool = False  # replace documents whose id exists instead of answering 409


class ReplaceDocumentRequest(_Strict):
    text: Annotated[str, Field(min_length=1)]
    metadata: Metadata = Field(default_factory=dict)


class SearchRequest(_Strict):
    query: Annotated[str, Field(min_length=1, max_length=10_000)]
    top_k: Annotated[int, Field(ge=1, le=100)] = 5
    mode: Mode = "hybrid"
    filter: Filter = None


class RagChatRequest(ChatCompletionRequest):
    """A chat completion grounded in the collection of the path; `query` is a shortcut for one user message."""

    messages: list[ChatMessage] | None = None  # type: ignore[assignment]
    query: str | None = None
    top_k: Annotated[int, Field(ge=1, le=50)] = 4
    mode: Mode = "hybrid"
    filter: Filter = None

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
