"""Per-key rate limits: requests per minute and tokens per minute, as token buckets.

Tokens are charged at the edge before the request runs (the body is not tokenized there): a prompt
estimate of one token per 4 body bytes plus the completion reservation (max_tokens, or the server's
default cap, times n). When the response reports `usage.total_tokens` (JSON, or the final SSE chunk
with stream_options.include_usage), the charge is corrected to that number.
"""

from __future__ import annotations

import math
import re
import time
from typing import Callable

from service.api.auth import KeyPolicy

# Routes whose requests generate tokens (the rest charge their input only).
GENERATING_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/rag/collections/{name}/chat",
                               "/v1/responses"})
_MAX_TOKENS = re.compile(rb'"(?:max_tokens|max_completion_tokens|max_output_tokens)"\s*:\s*(\d{1,9})')
_N = re.compile(rb'"n"\s*:\s*(\d{1,4})')
_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d{1,12})')


def estimate_tokens(body: bytes, route: str, default_max_tokens: int) -> int:
    prompt = len(body) // 4  # ~4 bytes per token of English text: an upper-ish bound without a tokenizer
    if route not in GENERATING_ROUTES:
        return prompt
    completion = max((int(m) for m in _MAX_TOKENS.findall(body)), default=default_max_tokens)
    n = max((int(m) for m in _N.findall(body)), default=1)
    return prompt + completion * max(n, 1)


class Bucket:
    """Holds up to `per_minute`, refilled continuously. The level may go below zero when a charge is
    corrected upwards after the fact; later requests then wait until it is paid back."""

    def __init__(self, per_minute: int, now: float):
        self.capacity, self.rate = float(per_minute), per_minute / 60.0
        self.level, self.t = float(per_minute), now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` fits (0: now). A request larger than the whole bucket waits for
        a full bucket instead of being refused forever."""
        self._refill(now)
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level - amount)


class RateLimiter:
    """One pair of buckets per key id; keys without limits are never tracked."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: dict[str, tuple[Bucket | None, Bucket | None]] = {}

    def _pair(self, policy: KeyPolicy) -> tuple[Bucket | None, Bucket | None]:
        pair = self._buckets.get(policy.id)
        if pair is None:
            now = self.clock()
            pair = self._buckets[policy.id] = (
                Bucket(policy.requests_per_minute, now) if policy.requests_per_minute else None,
                Bucket(policy.tokens_per_minute, now) if policy.tokens_per_minute else None)
        return pair

    def retry_after(self, policy: KeyPolicy, tokens: int) -> tuple[float, str]:
        """(seconds to wait, which limit) for one request of `tokens`; (0, "") when it may run."""
        req, tok = self._pair(policy)
        now = self.clock()
        wait = max((req.wait_s(1, now) if req else 0.0, "requests"),
                   (tok.wait_s(tokens, now) if tok else 0.0, "tokens"))
        return wait if wait[0] > 0 else (0.0, "")

    def charge(self, policy: KeyPolicy, tokens: int) -> "Charge":
        req, tok = self._pair(policy)
        now = self.clock()
        if req:
            req.take(1, now)
        if tok:
            tok.take(min(tokens, tok.capacity), now)
        return Charge(self, tok, min(tokens, tok.capacity) if tok else 0)


class Charge:
    """A request's token charge, corrected from the usage its response reports."""

    def __init__(self, limiter: RateLimiter, bucket: Bucket | None, estimate: float):
        self.limiter, self.bucket, self.estimate = limiter, bucket, estimate
        self.actual: int | None = None
        self._tail = b""

    def observe(self, chunk: bytes) -> None:
        if self.bucket is None or not chunk:
            return
        found = _TOTAL_TOKENS.findall(self._tail + chunk)  # the tail catches a number split across chunks
        if found:
            self.actual = int(found[-1])
        self._tail = chunk[-48:]

    def settle(self, status: int) -> None:
        if self.bucket is None:
            return
        if self.actual is not None:
            self.bucket.take(self.actual - self.estimate, self.limiter.clock())
        elif status >= 500:  # the server failed: the client is not charged for it
            self.bucket.take(-self.estimate, self.limiter.clock())


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
