"""/v1/rag/*: collections, documents (JSON or multipart files), search and grounded chat."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.api.deps import state
from service.api.routes.chat import serve_chat
from service.api.schemas.openai import ChatCompletionRequest, ChatMessage
from service.api.schemas.rag import (AddDocumentsRequest, CreateCollectionRequest, RagChatRequest,
                                     ReplaceDocumentRequest, SearchRequest)
from service.rag.errors import RagError
from service.rag.extract import extract_text
from service.rag.store import DocInput, RagConfig, RagStore
from service.rag.validate import check_document_id, check_json

router = APIRouter(prefix="/v1/rag")


def build_store(settings, pool, metrics) -> RagStore:
    """The app's RAG store: collections under data_dir/rag, embedders from the model pool."""

    async def embedder_for(model_id: str):
        lm = await pool.get(model_id)
        if lm.embedder is None:
            raise RagError(400, f"model {model_id!r} is not an embedding model", param="embedding_model",
                           code="wrong_model_task")
        return lm.embedder

    return RagStore(settings.data_dir / "rag", RagConfig.from_settings(settings), embedder_for, metrics)


def _store(request: Request) -> RagStore:
    return state(request).rag


async def _json_body(request: Request, model):
    try:
        raw = await request.json()
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers over 4300 digits
        raise RagError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:  # json.loads recurses per nesting level
        raise RagError(400, "malformed JSON body: nested too deeply") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def _files(request: Request, single_id: str | None = None) -> tuple[list[DocInput], bool]:
    """Documents from a multipart form: files in `file`/`files`, optional `metadata` (JSON object, for
    every file), `id` (one file only) and `upsert`."""
    cfg = _store(request).config
    form = await request.form(max_files=cfg.max_documents_per_request, max_fields=32)
    try:
        return await _form_documents(form, cfg, single_id)
    finally:
        await form.close()


async def _form_documents(form, cfg, single_id: str | None) -> tuple[list[DocInput], bool]:
    uploads = [v for k, v in form.multi_items() if k in ("file", "files") and hasattr(v, "read")]
    if not uploads:
        raise RagError(400, "multipart upload needs at least one file in the 'file' or 'files' field", param="file")
    raw = form.get("metadata") or "{}"
    try:  # a file sent as `metadata` is not a JSON text; deep nesting makes json.loads recurse
        metadata = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        metadata = None
    if not isinstance(metadata, dict):
        raise RagError(400, "metadata must be a JSON object", param="metadata")
    check_json(metadata, "metadata")
    doc_id = single_id or form.get("id") or None
    if doc_id is not None:
        check_document_id(doc_id, "id")
    if doc_id and len(uploads) > 1:
        raise RagError(400, "an id can only be given with a single file", param="id")
    docs = []
    for up in uploads:
        name = up.filename or "upload"
        data = await up.read(cfg.max_file_bytes + 1)
        if len(data) > cfg.max_file_bytes:
            raise RagError(413, f"{name}: file larger than {cfg.max_file_bytes} bytes", param="file",
                           code="file_too_large")
        text = await asyncio.to_thread(extract_text, name, data, up.content_type)
        docs.append(DocInput(text, doc_id, {**metadata, "filename": name}, name))
    upsert = str(form.get("upsert", "false")).lower() in ("1", "true", "yes")
    return docs, upsert


# ---- collections ----
@router.post("/collections")
async def create_collection(body: CreateCollectionRequest, request: Request):
    st = state(request)
    return await st.rag.create(body.name, body.embedding_model or st.settings.default_embedding_model,
                               body.chunk_size, body.chunk_overlap, body.ann_threshold, body.metadata)


@router.get("/collections")
async def list_collections(request: Request):
    return {"object": "list", "data": await _store(request).list()}


@router.get("/collections/{name}")
async def get_collection(name: str, request: Request):
    return await _store(request).describe(name)


@router.delete("/collections/{name}")
async def delete_collection(name: str, request: Request):
    await _store(request).drop(name)
    return {"object": "rag.collection.deleted", "name": name, "deleted": True}


# ---- documents ----
@router.post("/collections/{name}/documents")
async def add_documents(name: str, request: Request):
    store = _store(request)
    await store.get(name)  # 404 before reading a large body
    if _is_multipart(request):
        docs, upsert = await _files(request)
    else:
        body = await _json_body(request, AddDocumentsRequest)
        docs = [DocInput(d.text, d.id, d.metadata) for d in body.documents]
        upsert = body.upsert
    return await store.add(name, docs, upsert)


@router.get("/collections/{name}/documents")
async def list_documents(name: str, request: Request, limit: int = Query(100, ge=1, le=1000),
                         after: str | None = None):
    return await _store(request).list_documents(name, limit, after)


@router.get("/collections/{name}/documents/{doc_id}")
async def get_document(name: str, doc_id: str, request: Request, include_chunks: bool = False):
    return await _store(request).get_document(name, doc_id, include_chunks)


@router.put("/collections/{name}/documents/{doc_id}")
async def replace_document(name: str, doc_id: str, request: Request):
    """Replace (or create) the document with this id: its old chunks and vectors go in the same transaction."""
    check_document_id(doc_id)  # before reading the body
    store = _store(request)
    await store.get(name)
    if _is_multipart(request):
        docs, _ = await _files(request, single_id=doc_id)
    else:
        body = await _json_body(request, ReplaceDocumentRequest)
        docs = [DocInput(body.text, doc_id, body.metadata)]
    return await store.add(name, docs, upsert=True)


@router.delete("/collections/{name}/documents/{doc_id}")
async def delete_document(name: str, doc_id: str, request: Request):
    return await _store(request).delete_document(name, doc_id)


# ---- retrieval ----
@router.post("/collections/{name}/search")
async def search(name: str, body: SearchRequest, request: Request):
    results = await _store(request).search(name, body.query, body.top_k, body.mode, body.filter)
    return {"object": "list", "collection": name, "mode": body.mode, "results": results}


@router.post("/collections/{name}/chat")
async def chat(name: str, body: RagChatRequest, request: Request):
    fields = body.model_dump(exclude={"query", "top_k", "mode", "filter", "messages", "rag"}, exclude_none=True)
    messages = body.messages or [ChatMessage(role="user", content=body.query)]
    rag = {"collection": name, "top_k": body.top_k, "mode": body.mode}
    if body.filter:
        rag["filter"] = body.filter
    return await serve_chat(ChatCompletionRequest(**fields, messages=messages, rag=rag), request)
