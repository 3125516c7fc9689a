"""API keys with scopes: where they come from, how a presented key is checked, which scope a route needs.

Keys come from FRONTIER_API_KEY (one key, every scope), FRONTIER_API_KEYS (JSON) and
FRONTIER_API_KEYS_FILE (YAML or JSON), each shaped `key -> [scopes]` or
`key -> {scopes: [...], requests_per_minute: N, tokens_per_minute: M}`. A key itself is never
logged or kept in plain text here: only its SHA-256, and a short prefix of that as its public id.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

INFERENCE, RAG_WRITE, ADMIN = "inference", "rag_write", "admin"
SCOPES = frozenset({INFERENCE, RAG_WRITE, ADMIN})
# Reachable without a key even when keys are configured: probes and the API description.
OPEN_ROUTES = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


@dataclass(frozen=True)
class KeyPolicy:
    id: str  # "key-" + 8 hex digits of the key's SHA-256: safe to log, names the key's rate limits
    scopes: frozenset[str]
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class KeyStore:
    def __init__(self, keys: dict[str, KeyPolicy]):
        self._digests = [(hashlib.sha256(k.encode()).digest(), p) for k, p in keys.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    @property
    def policies(self) -> list[KeyPolicy]:
        return [p for _, p in self._digests]

    def lookup(self, presented: str | None) -> KeyPolicy | None:
        """Constant time in the presented key: digests of equal length, compared with
        hmac.compare_digest, every stored key visited (no early exit that would time the match)."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for stored, policy in self._digests:
            if hmac.compare_digest(digest, stored):
                found = policy
        return found


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def required_scope(method: str, route: str, path: str, metrics_require_auth: bool) -> str | None:
    """The scope a request needs, from its route template (raw path only for unmatched requests).
    None: open. Anything not listed below (e.g. future /admin/* routes) needs admin."""
    if route in OPEN_ROUTES:
        return None
    if route == "/metrics":
        return ADMIN if metrics_require_auth else None
    if route == "unmatched":  # a 404 either way; /v1/* keeps answering 401 first so routes can't be probed
        return INFERENCE if path.startswith("/v1/") else None
    if route.startswith("/v1/rag/"):
        reads = method in ("GET", "HEAD") or route.endswith(("/search", "/chat"))
        return INFERENCE if reads else RAG_WRITE
    if route.startswith("/v1/"):
        return INFERENCE
    return ADMIN


def load_keys(settings) -> KeyStore:
    """Every configured key; later sources win for the same key (single key < file < environment).
    Raises ValueError at startup for a malformed entry (naming the key's id, never the key)."""
    defaults = (settings.rate_limit_requests_per_minute, settings.rate_limit_tokens_per_minute)
    keys: dict[str, KeyPolicy] = {}
    if settings.api_key:
        keys[settings.api_key] = KeyPolicy(key_id(settings.api_key), SCOPES, *defaults)
    if settings.api_keys_file:
        keys.update(_parse(_read_file(Path(settings.api_keys_file)), str(settings.api_keys_file), defaults))
    if settings.api_keys:
        keys.update(_parse(settings.api_keys, "FRONTIER_API_KEYS", defaults))
    if keys:
        log.info("API keys: %s", ", ".join(f"{p.id}[{'+'.join(sorted(p.scopes))}]" for p in keys.values()))
    return KeyStore(keys)


def _read_file(path: Path) -> Any:
    data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON: one reader for both
    if isinstance(data, dict) and isinstance(data.get("keys"), dict):
        return data["keys"]
    return data


def _parse(entries: Any, source: str, defaults: tuple[int | None, int | None]) -> dict[str, KeyPolicy]:
    if not isinstance(entries, dict):
        raise ValueError(f"{source}: expected a mapping of API key -> scopes")
    out = {}
    for key, spec in entries.items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"{source}: API keys must be non-empty strings")
        kid = key_id(key)
        rpm, tpm = defaults
        if isinstance(spec, dict):
            unknown = set(spec) - {"scopes", "requests_per_minute", "tokens_per_minute"}
            if unknown:
                raise ValueError(f"{source}: {kid}: unknown fields {sorted(unknown)}")
            rpm = spec.get("requests_per_minute", rpm)
            tpm = spec.get("tokens_per_minute", tpm)
            spec = spec.get("scopes")
        scopes = [spec] if isinstance(spec, str) else spec
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= SCOPES:
            raise ValueError(f"{source}: {kid}: scopes must be a non-empty list of {sorted(SCOPES)}, got {spec!r}")
        for name, value in (("requests_per_minute", rpm), ("tokens_per_minute", tpm)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{source}: {kid}: {name} must be a positive integer")
        out[key] = KeyPolicy(kid, frozenset(scopes), rpm, tpm)
    return out
