"""Draft models for speculative decoding: which manifest model may draft for which target, and
loading one into the target's native engine (it runs on the engine's worker, on its own KV cache).

A draft proposes token ids that the target then scores, so both must read ids the same way: the
same vocabulary (token -> id) and the same special tokens. Anything else is refused with a message
that names both models, before a single weight is read.
"""

from __future__ import annotations

from pathlib import Path

from service.pool.manifest import Manifest, Task


class DraftUnavailable(Exception):
    """This draft cannot serve this target (the API answers 400 with the message)."""


DRAFT_TASKS = (Task.CHAT, Task.COMPLETION)


def default_draft(settings, m: Manifest) -> str | None:
    """The draft a request that names no speculative method gets: FRONTIER_SPECULATIVE_METHOD (unless
    auto) else the manifest's method; if that is "draft", FRONTIER_SPECULATIVE_MODEL else the
    manifest's model."""
    method = m.speculative.method if settings.speculative_method == "auto" else settings.speculative_method
    return (settings.speculative_model or m.speculative.model) if method == "draft" else None


def _special_tokens(tokenizer) -> dict[str, object]:
    names = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    return {**{n: getattr(tokenizer, n, None) for n in names},
            "special": sorted(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))}


def check_tokenizers_match(target_tok, draft_tok, target_id: str, draft_id: str) -> None:
    if draft_tok.get_vocab() != target_tok.get_vocab():
        raise DraftUnavailable(
            f"draft model {draft_id!r} cannot draft for {target_id!r}: their vocabularies differ "
            f"({len(draft_tok)} vs {len(target_tok)} tokens); a draft must share the target's tokenizer")
    a, b = _special_tokens(target_tok), _special_tokens(draft_tok)
    if a != b:
        diff = sorted(k for k in a if a[k] != b[k])
        raise DraftUnavailable(f"draft model {draft_id!r} cannot draft for {target_id!r}: their special tokens "
                               f"differ ({', '.join(diff)})")


def check_draft_manifest(m: Manifest, target_id: str) -> None:
    if m.id == target_id:
        raise DraftUnavailable(f"model {target_id!r} cannot draft for itself; name a smaller model of its tokenizer")
    if m.task not in DRAFT_TASKS:
        raise DraftUnavailable(f"{m.id!r} cannot draft for {target_id!r}: its task is {m.task.value}; a draft "
                               "must be a chat or completion model")


def load_draft(engine, target_id: str, m: Manifest, path: Path, device, dtype, config) -> None:
    """Check the draft's tokenizer against the engine's, load its weights as `config` says and attach
    it to the engine. Raises DraftUnavailable for a draft this engine cannot use."""
    from service.engine.loading import load_native_model, load_tokenizer
    from service.modeling.loader import UnsupportedArchitecture

    if not hasattr(engine, "attach_draft"):
        raise DraftUnavailable(f"model {target_id!r} runs on the {getattr(engine, 'name', '?')} engine, which has "
                               "no draft-model speculation; use method ngram or off")
    check_draft_manifest(m, target_id)
    try:
        tokenizer = load_tokenizer(path)
        check_tokenizers_match(engine.tokenizer, tokenizer, target_id, m.id)
        model, _, _ = load_native_model(path, device, dtype, config, tokenizer)
    except UnsupportedArchitecture as exc:
        raise DraftUnavailable(f"draft model {m.id!r} cannot run in the native engine: {exc}") from None
    engine.attach_draft(m.id, model)
