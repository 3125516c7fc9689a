"""The HTTP edge: one pure ASGI middleware that every request crosses before any route runs.

In order: metrics switch, API key and scope (auth.py), request-rate limit, body size (counted while
the body arrives, so a chunked body without Content-Length is cut off at the limit too), JSON nesting
depth and lone surrogates (scans of the raw bytes, so no parser ever recurses on hostile input),
token-rate limit (limits.py). Then the checked body is replayed to the app, and the request is
counted under its route template, never its raw path (ids in URLs would make unbounded series).
Every response carries an `x-request-id` (the client's, when sane, else a fresh one), and the
access log line of the request names it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

import numpy as np

from service.api.auth import KeyPolicy, KeyStore, bearer_token, required_scope
from service.api.errors import APIError, error_response
from service.api.limits import GENERATING_ROUTES, RateLimiter, estimate_tokens, retry_after_header

UNMATCHED = "unmatched"
# One line per request, with its x-request-id (uvicorn's own access log is off: it cannot know the id).
access_log = logging.getLogger("frontier.access")
_INLINE_CHECK_BYTES = 256 * 1024


class RouteTable:
    """Route templates ("/v1/rag/collections/{name}") by method and path, known before routing runs."""

    def __init__(self, routes):
        self._routes = [(r.path_regex, r.path, getattr(r, "methods", None) or set()) for r in routes
                        if hasattr(r, "path_regex") and isinstance(getattr(r, "path", None), str)]

    def template(self, scope) -> str:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        method, partial = scope["method"], None
        for regex, template, methods in self._routes:
            if regex.match(path):
                if not methods or method in methods or (method == "HEAD" and "GET" in methods):
                    return template
                partial = partial or template  # a 405 still names its route
        return partial or UNMATCHED


# ---- raw-body JSON checks (linear-ish time in C, no recursion) ----
# A surrogate escape, or UTF-8 bytes encoding a surrogate (json.loads decodes bytes with surrogatepass).
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_VALID_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unescaped(body: bytes) -> bytes:
    """The body without escaped backslashes and escaped quotes: every '"' left delimits a string and
    every '\\' left starts a real escape (a run of 2k backslashes is k escapes, removed left to right)."""
    return body.replace(b"\\\\", b"").replace(b'\\"', b"")


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    a = np.frombuffer(_unescaped(body), np.uint8)
    quotes = np.flatnonzero(a == 0x22)
    folded = a | 0x20  # '[' 0x5B -> '{' 0x7B and ']' 0x5D -> '}' 0x7D; nothing else folds onto them
    pos = np.flatnonzero((folded == 0x7B) | (folded == 0x7D))
    pos = pos[(np.searchsorted(quotes, pos) & 1) == 0]  # an even number of quotes before: outside strings
    # Openers '[' '{' have bit 0x02 set, closers ']' '}' do not: +1 / -1 per bracket.
    depth = np.cumsum((a[pos] & 2).astype(np.int8) - 1, dtype=np.int32)
    return bool(depth.size) and int(depth.max()) > limit


def _may_hold_lone_surrogate(body: bytes) -> bool:
    if not _SURROGATE_HINT.search(body):
        return False  # the common case: one C-speed scan
    return bool(_SURROGATE_HINT.search(_VALID_PAIR.sub(b"", _unescaped(body))))  # escaped emoji are fine


def _printable(s: str) -> str:
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", s)


def lone_surrogate(body: bytes) -> tuple[str, str, bool] | None:
    """(field path, the surrogate as an escape, whether it is in a key) of the first string holding a
    surrogate that is not half of a valid pair (valid pairs decode to one character), else None."""
    if not _may_hold_lone_surrogate(body):
        return None
    try:
        doc = json.loads(body)  # depth already checked: cannot recurse deeply
    except (ValueError, RecursionError):
        return None  # malformed: the route's own parser answers that
    stack = [((), doc)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                return ".".join(map(str, path)), _printable(found.group()), False
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                found = _SURROGATE.search(key)
                if found:
                    return ".".join(map(str, (*path, _printable(key)))), _printable(found.group()), True
                stack.append(((*path, key), item))
        elif isinstance(value, list):
            stack.extend(((*path, i), item) for i, item in reversed(list(enumerate(value))))
    return None


def _header(scope, name: bytes) -> str:
    for k, v in scope["headers"]:
        if k.lower() == name:
            return v.decode("latin-1")
    return ""


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def request_id(scope) -> str:
    """The client's x-request-id when it is a sane token (it then ties the client's logs to ours),
    else a fresh one."""
    given = _header(scope, b"x-request-id")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def _default_to_json(scope) -> None:
    """`curl -d '{...}'` sends form encoding; like Ollama and llama.cpp, read such bodies as JSON.
    Multipart uploads (RAG files) keep their content type."""
    ctype = _header(scope, b"content-type")
    if scope["method"] in ("POST", "PUT") and (not ctype or ctype.startswith("application/x-www-form-urlencoded")):
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"] + [
            (b"content-type", b"application/json")]


def _is_json(scope) -> bool:
    ctype = _header(scope, b"content-type").split(";", 1)[0].strip().lower()
    return ctype == "application/json" or ctype.endswith("+json")


async def _read_body(receive, limit: int) -> tuple[bytes | None, APIError | None]:
    """The whole body, or a 413 as soon as it passes `limit` (the rest is never read); (None, None)
    when the client disconnected."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None, _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body over the {limit}-byte limit (FRONTIER_MAX_REQUEST_BYTES)",
                    code="request_too_large")


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for http.disconnect (streaming responses watch it)

    return replayed


class EdgeMiddleware:
    def __init__(self, app, *, settings, metrics, routes: RouteTable, keys: KeyStore, limiter: RateLimiter):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.routes, self.keys, self.limiter = routes, keys, limiter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.routes.template(scope)
        state = scope.setdefault("state", {})  # request.state: routes put the resolved model here
        state["request_id"] = rid = request_id(scope)
        status, charge, started = 500, None, time.monotonic()

        async def send_watched(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif charge is not None and message["type"] == "http.response.body" and route in GENERATING_ROUTES:
                charge.observe(message.get("body", b""))  # usage of what this request generated, not of stored data
            await send(message)

        try:
            policy, err = self._admit(scope, route)
            body = b""
            if err is None:
                body, err = await _read_body(receive, self.settings.max_request_bytes)
                if body is None and err is None:
                    status = 499  # the client went away before its body arrived
                    return
            if err is None:
                _default_to_json(scope)
                # Large bodies are checked in a worker thread (numpy, regex and json: no torch, so no
                # OpenMP pool left behind) so the event loop keeps serving other requests meanwhile.
                err = self._check_json(scope, body) if len(body) < _INLINE_CHECK_BYTES else \
                    await asyncio.to_thread(self._check_json, scope, body)
            if err is None and policy is not None and (policy.requests_per_minute or policy.tokens_per_minute):
                tokens = estimate_tokens(body, route, self.settings.max_tokens_default)
                err = self._rate_limited(policy, tokens)
                if err is None:
                    charge = self.limiter.charge(policy, tokens)
            if err is not None:
                await error_response(err)(scope, receive, send_watched)
                return
            await self.app(scope, _replay(body, receive), send_watched)
        finally:
            if charge is not None:
                charge.settle(status)
            self._count(route, state, status)
            access_log.info('%s "%s %s" %d %.0fms model=%s request_id=%s', _client(scope), scope["method"],
                            scope["path"], status, 1000 * (time.monotonic() - started), state.get("model") or "-",
                            rid)

    def _admit(self, scope, route: str) -> tuple[KeyPolicy | None, APIError | None]:
        s = self.settings
        if route == "/metrics" and not s.metrics_enabled:
            return None, APIError(404, "metrics are disabled (FRONTIER_METRICS_ENABLED)")
        policy = None
        need = required_scope(scope["method"], route, scope["path"], s.metrics_require_auth) \
            if self.keys.enabled else None
        if need:
            policy = self.keys.lookup(bearer_token(scope["headers"]))
            if policy is None:
                return None, APIError(401, "missing or invalid API key (Authorization: Bearer ...)",
                                      code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            if need not in policy.scopes:
                return None, APIError(403, f"API key {policy.id} lacks the '{need}' scope that "
                                      f"{scope['method']} {route} needs",
                                      code="insufficient_scope")
            scope["state"]["api_key_id"] = policy.id  # for logs: never the key itself
            err = self._rate_limited(policy, 0)  # before reading the body of a client that must wait
            if err is not None:
                return None, err
        length = _header(scope, b"content-length")
        if length.isdigit() and int(length) > s.max_request_bytes:
            return None, _too_large(s.max_request_bytes)
        return policy, None

    def _check_json(self, scope, body: bytes) -> APIError | None:
        if not body or not _is_json(scope):
            return None
        limit = self.settings.max_json_depth
        if json_depth_exceeds(body, limit):
            return APIError(400, f"JSON body nested deeper than {limit} levels (FRONTIER_MAX_JSON_DEPTH)",
                            code="json_too_deep")
        found = lone_surrogate(body)
        if found is None:
            return None
        path, char, in_key = found
        where = f"the key '{path}'" if in_key else f"'{path}'" if path else "the body"
        return APIError(400, f"invalid Unicode in {where}: lone surrogate {char}; text must be "
                        "valid UTF-8 (a \\ud800-\\udbff escape must be followed by a \\udc00-\\udfff one)",
                        param=path or None, code="invalid_unicode")

    def _rate_limited(self, policy: KeyPolicy, tokens: int) -> APIError | None:
        wait, which = self.limiter.retry_after(policy, tokens)
        if not wait:
            return None
        limit = policy.requests_per_minute if which == "requests" else policy.tokens_per_minute
        return APIError(429, f"rate limit of {limit} {which} per minute reached for API key {policy.id}; "
                        f"retry in {wait:.1f} s", code="rate_limit_exceeded",
                        headers=retry_after_header(wait))

    def _count(self, route: str, state: dict, status: int) -> None:
        if route == "/metrics":
            return
        try:  # metrics never break a request
            self.metrics.requests.labels(route, str(state.get("model", "") or ""), str(status)).inc()
        except Exception:
            pass
