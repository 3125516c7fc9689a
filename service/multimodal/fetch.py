"""The bytes behind an image URL: `data:` URLs, and http(s) fetched under an SSRF guard.

Each hop (the URL, then every redirect, followed by hand) is checked before any byte is sent:
scheme, host spelling, then every address the host resolves to (`address.refusal_reason`).

DNS rebinding: the socket goes to the address that was checked, never to a fresh lookup. The
request URL carries that IP as its host; the original host travels in the Host header and, for
https, as the TLS SNI name (httpcore's documented "sni_hostname" request extension), against
which the certificate is verified too. Keep-alive is off so a connection opened for one name is
never reused for another name on the same IP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from urllib.parse import unquote_to_bytes

import httpx

from service.multimodal import address
from service.multimodal.errors import ImageRejected
from service.multimodal.limits import ImageLimits

_ALLOW_HINT = "images are only fetched from public addresses unless FRONTIER_IMAGE_ALLOWED_HOSTS lists the host"
_REDIRECTS = {301, 302, 303, 307, 308}
_BINARY_TYPES = {"application/octet-stream", "binary/octet-stream"}  # what object stores send for untyped files
_HEADERS = {"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "frontier-image-fetch/1"}


async def fetch_image_bytes(url: str, limits: ImageLimits) -> tuple[bytes, str | None]:
    """(encoded image bytes, media type or None); ImageRejected says why when refused."""
    url = url.strip()
    if url[:5].lower() == "data:":
        return parse_data_url(url, limits)
    try:
        async with asyncio.timeout(limits.fetch_timeout_s):
            return await _fetch_http(url, limits)
    except TimeoutError:  # the overall deadline; httpx's own timeouts are mapped where they are raised
        raise _timed_out(limits) from None


def parse_data_url(url: str, limits: ImageLimits) -> tuple[bytes, str]:
    """RFC 2397 `data:[<media type>][;base64],<data>`; the media type must be image/*."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise ImageRejected("data: URL has no ',' before its data")
    params = [p.strip().lower() for p in header.split(";")]
    media = params[0] or "text/plain"  # RFC 2397's default
    if not media.startswith("image/"):
        raise ImageRejected(f"data: URL media type is {media!r}; an image/* type is required")
    # No encoding here takes more than 3 characters a byte (%XX; base64 is 4 per 3, plus folding):
    # refuse a payload that cannot fit before decoding any of it; the exact check follows.
    if len(payload) > 3 * limits.max_image_bytes + 16:
        raise _too_big(limits)
    raw = unquote_to_bytes(payload)  # RFC 2397: percent-encoded, also inside base64
    if "base64" in params[1:]:
        compact = b"".join(raw.split())
        try:
            raw = base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ImageRejected("data: URL is marked base64 but its data is not valid base64") from None
    if len(raw) > limits.max_image_bytes:
        raise _too_big(limits)
    return raw, media


async def _resolve(host: str, port: int) -> list[str]:
    """Every A/AAAA address of host (tests replace this: no real DNS in unit tests)."""
    infos = await asyncio.to_thread(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def _fetch_http(url: str, limits: ImageLimits) -> tuple[bytes, str | None]:
    current = _parse_url(url)
    async with _new_client(limits) as client:
        for _ in range(limits.max_redirects + 1):
            ip, tls_name = await _checked_ip(current, limits)
            request = client.build_request(
                "GET", current.copy_with(host=ip), headers={**_HEADERS, "Host": current.netloc.decode("ascii")},
                extensions={"sni_hostname": tls_name} if current.scheme == "https" and tls_name else {},
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.TimeoutException:
                raise _timed_out(limits) from None
            except httpx.HTTPError as e:
                raise ImageRejected(f"could not fetch image URL from {current.host}: {e or type(e).__name__}") from None
            except httpx.InvalidURL as e:  # httpx pre-builds next_request from Location even when not following
                raise ImageRejected(f"image URL redirect target is not a valid URL: {e}") from None
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise ImageRejected(f"image URL answered HTTP {response.status_code} without a Location")
                    current = _parse_url(location, base=current)
                    continue
                if not response.is_success:
                    raise ImageRejected(f"image URL answered HTTP {response.status_code}")
                media = _check_headers(response, limits)
                return await _read_capped(response, limits), media
            finally:
                await response.aclose()
    raise ImageRejected(f"image URL redirected more than {limits.max_redirects} times "
                        "(FRONTIER_IMAGE_MAX_REDIRECTS)")


def _new_client(limits: ImageLimits, **kwargs) -> httpx.AsyncClient:  # kwargs: tests (a TLS CA)
    return httpx.AsyncClient(
        follow_redirects=False,  # each hop is checked here before it is requested
        trust_env=False,  # no proxies from the environment: they would resolve the name again
        timeout=limits.fetch_timeout_s,
        limits=httpx.Limits(max_keepalive_connections=0),
        **kwargs,
    )


def _parse_url(url: str, *, base: httpx.URL | None = None) -> httpx.URL:
    """The URL (or a redirect's Location, resolved against base) if its form may be fetched."""
    redirect = base is not None
    what = "image URL redirect target" if redirect else "image URL"
    try:
        parsed = base.join(url) if redirect else httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as e:
        raise ImageRejected(f"{what} is not a valid URL: {e}") from None
    if parsed.scheme not in ("http", "https"):
        scheme = parsed.scheme or "(none)"
        allowed = "http or https" if redirect else "http, https or data"
        raise ImageRejected(f"{what} scheme {scheme!r} is not supported; use {allowed}")
    if parsed.userinfo:
        raise ImageRejected(f"{what} must not carry credentials (user:password@)")
    if not parsed.host:
        raise ImageRejected(f"{what} has no host")
    return parsed


async def _checked_ip(url: httpx.URL, limits: ImageLimits) -> tuple[str, str | None]:
    """(address to connect to, TLS name or None for an IP host), once every address of the host
    passed the policy."""
    host = address.normalize_host(url.host)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        literal = address.parse_ip_host(host)
    except address.BadHost as e:
        raise ImageRejected(f"image URL host is invalid: {e}") from None
    name_allowed = literal is None and host in limits.allowed_names
    if literal is not None:
        ips = [literal]
    elif host in address.METADATA_HOSTS and not name_allowed:
        raise ImageRejected(f"image URL host {host} is a cloud metadata service; {_ALLOW_HINT}")
    else:
        try:
            resolved = await _resolve(host, port)
        except (OSError, UnicodeError) as e:
            raise ImageRejected(f"image URL host {host} could not be resolved: {e}") from None
        try:
            ips = [ipaddress.ip_address(a) for a in resolved]
        except ValueError:
            raise ImageRejected(f"image URL host {host} resolved to an unusable address") from None
        if not ips:
            raise ImageRejected(f"image URL host {host} has no addresses")
    for ip in ips:  # ANY bad address refuses: a resolver may hand out either one later
        why = address.refusal_reason(ip)
        if not why or address.is_allowed(ip, limits):
            continue
        # An allowed name opens its private addresses, but not a metadata address it may be
        # pointed at (rebinding of an allowed name) unless it is a metadata name itself.
        if name_allowed and (host in address.METADATA_HOSTS or not address.is_metadata(ip)):
            continue
        spelled = f"is {why}" if literal is not None else f"resolves to {why} ({ip})"
        raise ImageRejected(f"image URL host {url.host} {spelled}; {_ALLOW_HINT}")
    return address.connect_address(ips[0]), (host if literal is None else None)


def _check_headers(response: httpx.Response, limits: ImageLimits) -> str | None:
    media = response.headers.get("content-type", "").split(";")[0].strip().lower() or None
    if media is not None and not media.startswith("image/") and media not in _BINARY_TYPES:
        raise ImageRejected(f"image URL returned content type {media!r}, not an image")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", ""):  # we asked for identity: a compressed body could be a zip bomb
        raise ImageRejected(f"image URL returned a {encoding!r}-encoded body; images must be sent unencoded")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_image_bytes:
        raise _too_big(limits)
    return media


async def _read_capped(response: httpx.Response, limits: ImageLimits) -> bytes:
    body = bytearray()
    try:
        async for chunk in response.aiter_raw():  # the cap holds whatever Content-Length claimed
            body += chunk
            if len(body) > limits.max_image_bytes:
                raise _too_big(limits)
    except httpx.TimeoutException:
        raise _timed_out(limits) from None
    except httpx.HTTPError as e:
        raise ImageRejected(f"image download failed: {e or type(e).__name__}") from None
    return bytes(body)


def _too_big(limits: ImageLimits) -> ImageRejected:
    return ImageRejected(f"image is larger than {limits.max_image_bytes} bytes (FRONTIER_IMAGE_MAX_BYTES)")


def _timed_out(limits: ImageLimits) -> ImageRejected:
    return ImageRejected(f"fetching the image URL took longer than {limits.fetch_timeout_s:g}s "
                         "(FRONTIER_IMAGE_FETCH_TIMEOUT_S)")
