"""RAG domain errors. They carry their HTTP status; service/api/errors.py maps them to the envelope."""

from __future__ import annotations


class RagError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def collection_not_found(name: str) -> RagError:
    return RagError(404, f"collection {name!r} does not exist; create it with POST /v1/rag/collections",
                    param="collection", code="collection_not_found")


def document_not_found(collection: str, doc_id: str) -> RagError:
    return RagError(404, f"document {doc_id!r} does not exist in collection {collection!r}",
                    param="document_id", code="document_not_found")


def collection_damaged(name: str, reason: str) -> RagError:
    # 409, not 500: the request is fine, the collection's state is not; dropping it is the way out.
    return RagError(409, f"collection {name!r} is damaged ({reason}); restore its files or drop it with "
                    f"DELETE /v1/rag/collections/{name}", param="collection", code="collection_damaged")


def damage_reason(exc: Exception, path) -> str:
    """Why a collection cannot be used, for clients: no server paths, always valid UTF-8, short."""
    text = f"{type(exc).__name__}: {exc}".replace(str(path), "<collection>")
    return text.encode("utf-8", "replace").decode("utf-8")[:300]
