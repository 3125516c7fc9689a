"""The token controller that keeps one sequence inside a grammar (the engine's controller seam,
service/engine/types.py TokenController): before each draw it gives the sampler the set of tokens
the grammar allows (a packed bitmask), after each accepted token it advances the matcher.

With reasoning, the thought stays free: the grammar starts at the answer, i.e. once the wrapped
reasoning controller reports `answer_start`. Everything else is delegated to that controller.
"""

from __future__ import annotations

import logging

import llguidance
import llguidance.torch as llt
import torch

log = logging.getLogger(__name__)


class GrammarController:
    """One per output sequence (built on the engine thread by the request's controller factory)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, inner=None):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        self.inner = inner  # e.g. the reasoning BudgetController; None: constrained from the first token
        self._mask = llt.allocate_token_bitmask(1, tokenizer.vocab_size)
        self.error: str | None = None

    def _start(self) -> int | None:
        """Index of the first generated token the grammar governs (None: not yet known)."""
        return 0 if self.inner is None else getattr(self.inner, "answer_start", None)

    def _governs(self, index: int) -> bool:
        start = self._start()
        return start is not None and index >= start and self.error is None

    def allowed_mask(self, num_generated: int) -> torch.Tensor | None:
        """The tokens allowed at generated index `num_generated`: int32 words, or None (free)."""
        if not self._governs(num_generated):
            return None
        llt.fill_next_token_bitmask(self.matcher, self._mask, 0)
        return self._mask[0]

    def on_token(self, token_id: int, num_generated: int) -> list[int]:
        forced = self.inner.on_token(token_id, num_generated) if self.inner is not None else []
        if self._governs(num_generated - 1) and not self.matcher.consume_token(token_id):
            # Only a forced token can get here (sampled ones were masked): stop constraining, say so.
            self.error = self.matcher.get_error() or f"token {token_id} is outside the grammar"
            log.warning("grammar left at generated token %d: %s", num_generated, self.error)
        return forced

    def rewrite(self, token_id: int, num_generated: int) -> list[int]:
        if self.inner is not None and hasattr(self.inner, "rewrite"):
            return self.inner.rewrite(token_id, num_generated)
        return [token_id]

    def banned_tokens(self, num_generated: int) -> list[int]:
        return self.inner.banned_tokens(num_generated) if self.inner is not None else []

    def generation_limit(self, max_tokens: int) -> int | None:
        inner = self.inner
        return inner.generation_limit(max_tokens) if inner is not None and hasattr(inner, "generation_limit") else None

    def report(self) -> dict[str, float]:
        report = dict(self.inner.report()) if self.inner is not None and hasattr(self.inner, "report") else {}
        report["grammar_complete"] = int(self.error is None and self.matcher.is_accepting())
        return report
