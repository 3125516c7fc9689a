"""Grammars in requests: the 400 for a schema that cannot be used, the loaded model's llguidance
tokenizer, and the per-sequence controller factory (chat's structured stage and completions)."""

from __future__ import annotations

import asyncio

from service.api.errors import APIError
from service.structured.controller import GrammarController
from service.structured.grammar import GrammarError, build_tokenizer


def as_api_error(exc: GrammarError) -> APIError:
    code = "unsupported_schema" if "unsupported" in str(exc) else None
    return APIError(400, str(exc), param=exc.param, code=code)


async def grammar_tokenizer(lm):
    """The loaded model's llguidance tokenizer, built on first use (off the event loop)."""
    if lm.grammar_tokenizer is None:
        lm.grammar_tokenizer = await asyncio.to_thread(build_tokenizer, lm.tokenizer, lm.engine.eos_token_ids)
    return lm.grammar_tokenizer


async def grammar_factory(lm, grammar: str | None, inner=None):
    """One GrammarController per output sequence, around `inner`'s controller (reasoning) when there
    is one; without a grammar, `inner` as it is."""
    if grammar is None:
        return inner
    tokenizer = await grammar_tokenizer(lm)

    def make() -> GrammarController:
        return GrammarController(tokenizer, grammar, inner() if inner is not None else None)

    return make
