"""What the API, serving and RAG code use from a tokenizer and from an embedding model.

Structural types (typing.Protocol): a transformers tokenizer and service/pool/embedder.py's
`Embedder` satisfy them as they are, and so do the fakes the tests build. Nothing here imports
torch at run time. The engine's own protocol is `service.engine.types.Engine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Tokenizer(Protocol):
    """The subset of a transformers tokenizer that Frontier calls."""

    chat_template: str | None  # the pool may replace it with the manifest's template
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str: ...

    def batch_decode(self, sequences: list[list[int]], **kwargs: Any) -> list[str]: ...

    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> Any:
        """With tokenize=False, add_generation_prompt=True: the prompt text."""

    def convert_tokens_to_ids(self, tokens: str) -> int | None: ...

    def __len__(self) -> int:
        """Vocabulary size, added tokens included: every valid id is below it."""


@runtime_checkable
class Embedder(Protocol):
    """A sentence-embedding model (service/pool/embedder.py): /v1/embeddings and RAG use this."""

    tokenizer: Any  # a Tokenizer that is also callable (batch encoding with truncation)
    dim: int  # embedding dimension
    max_seq_length: int  # tokens per input; `encode` truncates longer inputs

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text holds (special tokens included, not truncated): the embeddings route
        refuses inputs over max_seq_length unless the request opts into truncation."""

    async def encode(self, texts: list[str]) -> "torch.Tensor":
        """[len(texts), dim] float32 on the CPU, L2-normalized (cosine similarity = dot product)."""
