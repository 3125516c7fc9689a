"""Speculative decoding: proposers, the adaptive draft length, and lossless verification.

A proposer guesses the next few tokens of a sequence; the target model scores the last accepted
token plus the k guesses in one forward (one decode row each), which gives k + 1
next-token distributions. Verification walks them in order: row j's token is drawn from the
target exactly as plain decoding would draw it (same sampler, penalties, controllers, and the
sequence's own generator), then accepted; while it equals guess j + 1 the next row is still valid.

For a point-mass proposal q (n-gram lookup, a greedy draft), drawing t ~ p and accepting the
guess d iff t == d *is* the rejection-sampling rule: accept with min(1, p(d)/q(d)) = p(d), and on
rejection t is distributed as max(0, p - q) normalised (p without d). So the output distribution
is the target's, and with a seed the tokens are the very ones plain decoding gives: one draw per
emitted token, in the same order. `rejection_sample` is the general rule for a proposal with a
full distribution q (a sampled draft model).
"""

from __future__ import annotations

import torch

from service.engine.config import MAX_SPECULATIVE_TOKENS

MIN_NGRAM, MAX_NGRAM = 1, 4  # suffix lengths looked up, longest first


class NgramProposer:
    """Prompt lookup: the continuation of the most recent earlier occurrence of the longest suffix
    (up to MAX_NGRAM tokens) of prompt + output. An index of n-gram -> position after it, updated
    as tokens arrive, makes each proposal O(MAX_NGRAM) instead of a scan of the context."""

    def __init__(self) -> None:
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(MAX_NGRAM + 1)]
        self._num_indexed = 0

    def _extend(self, tokens: list[int]) -> None:
        # Position i gets a continuation for every n-gram ending just before it.
        for i in range(max(self._num_indexed, 1), len(tokens)):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, i) + 1):
                self._index[n][tuple(tokens[i - n : i])] = i
        self._num_indexed = len(tokens)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the context's suffix."""
        self._extend(tokens)
        end = len(tokens)
        for n in range(min(MAX_NGRAM, end - 1), MIN_NGRAM - 1, -1):
            pos = self._index[n].get(tuple(tokens[end - n :]))
            if pos is not None and pos < end:
                return tokens[pos : min(pos + k, end)]
        return []


class AdaptiveLength:
    """The draft length of one sequence: grows by one after a fully accepted draft, halves after
    a fully rejected one; after a run of poor drafts the sequence pauses speculating for a while
    (each rejected token costs a forward slot and buys nothing)."""

    PAUSE_AFTER = 4  # consecutive drafts with nothing accepted
    PAUSE_STEPS = 16

    def __init__(self, max_k: int):
        self.max_k = max_k
        self.k = max_k
        self._misses = 0
        self._paused = 0

    def current(self) -> int:
        if self._paused:
            self._paused -= 1
            return 0
        return self.k

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        if accepted == proposed:
            self.k = min(self.max_k, self.k + 1)
        elif accepted == 0:
            self.k = max(1, self.k // 2)
        self._misses = self._misses + 1 if accepted == 0 else 0
        if self._misses >= self.PAUSE_AFTER:
            self._misses, self._paused = 0, self.PAUSE_STEPS


class SpecStats:
    """Engine-wide counters with vLLM's meaning (spec_decode_num_*)."""

    def __init__(self, max_positions: int = MAX_SPECULATIVE_TOKENS):
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * max_positions

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        for i in range(min(accepted, len(self.accepted_per_pos))):
            self.accepted_per_pos[i] += 1

    def as_stats(self) -> dict[str, float]:
        out = {"spec_decode_num_drafts_total": float(self.num_drafts),
               "spec_decode_num_draft_tokens_total": float(self.num_draft_tokens),
               "spec_decode_num_accepted_tokens_total": float(self.num_accepted_tokens)}
        for i, v in enumerate(self.accepted_per_pos):
            if v:
                out[f"spec_decode_num_accepted_tokens_per_pos_total:{i}"] = float(v)
        return out


def rejection_sample(p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator | None = None) -> tuple[int, bool]:
    """The standard rule for a proposal drawn from q: accept `draft` with probability
    min(1, p/q), else draw from max(0, p - q) normalised. p, q: [V] probabilities.
    Returns (token, accepted); the token is distributed exactly as p."""
    u = torch.rand((), generator=generator, device=p.device)
    if q[draft] <= 0 or u * q[draft] <= p[draft]:
        return draft, True
    residual = (p - q).clamp_min(0)
    total = residual.sum()
    if total <= 0:  # p == q: rejection is impossible in exact arithmetic
        return draft, True
    return int(torch.multinomial(residual / total, 1, generator=generator)), False


class SequenceSpeculation:
    """One sequence's speculation: its method (an n-gram proposer of its own, or the id of a draft
    model the engine holds), adaptive length and counts (for its report)."""

    def __init__(self, method: str, num_tokens: int, draft: str | None = None):
        if method not in ("ngram", "draft") or (method == "draft" and not draft):
            raise ValueError(f"speculative method {method!r} (draft {draft!r}) is not available in this engine")
        self.proposer = NgramProposer() if method == "ngram" else None
        self.draft = draft if method == "draft" else None
        self.length = AdaptiveLength(num_tokens)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def num_to_propose(self, room: int) -> int:
        """This step's draft length: the adaptive one, within `room` (what max_tokens and the context
        leave after the next token). Call once per step (a paused sequence counts down)."""
        return max(0, min(self.length.current(), room))

    def record(self, proposed: int, accepted: int) -> None:
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        self.length.update(proposed, accepted)

    def report(self) -> dict[str, float]:
        return {"spec_draft_tokens": self.num_draft_tokens, "spec_accepted_tokens": self.num_accepted_tokens}
