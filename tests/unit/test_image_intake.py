"""Image intake (service/multimodal): SSRF guard, fetch limits, data: URLs, safe decoding, digests.

A stdlib HTTP server on 127.0.0.1 plays every remote; host names resolve through a fake
`fetch._resolve` (no real DNS), which also shows that the socket goes to the checked address.
"""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import socket
import ssl
import subprocess
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote_from_bytes, urlsplit

import pytest
from PIL import ExifTags, Image, features

from service.config import Settings
from service.multimodal import address, decode, fetch, intake
from service.multimodal.decode import decode_image, header_size, image_digest
from service.multimodal.errors import ImageRejected
from service.multimodal.fetch import fetch_image_bytes
from service.multimodal.intake import load_images
from service.multimodal.limits import ImageLimits

LOCAL = ImageLimits(allowed_hosts=("127.0.0.1",))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size=(64, 64), mode="RGB") -> Image.Image:
    return Image.frombytes(mode, size, bytes((i * 7919) % 251 for i in range(size[0] * size[1] * len(mode))))


PNG = encode(Image.new("RGB", (4, 3), (255, 0, 0)))


# ---------------------------------------------------------------- the local "remote" server

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status=200, body=b"", headers=None, length=True):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: C901 - one branch per route
        self.server.hosts.append(self.headers.get("Host"))
        parts = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        route = parts.path
        if route == "/img.png":
            self._send(body=PNG, headers={"Content-Type": "image/png"})
        elif route == "/octet":
            self._send(body=PNG, headers={"Content-Type": "application/octet-stream"})
        elif route == "/noctype":
            self._send(body=PNG)
        elif route == "/page.html":
            self._send(body=b"<html>hi</html>", headers={"Content-Type": "text/html; charset=utf-8"})
        elif route == "/gzip":
            self._send(body=zlib.compress(PNG), headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})
        elif route == "/big":
            self._send(body=b"\0" * (2 << 20), headers={"Content-Type": "image/png"})
        elif route == "/big-unsized":  # no Content-Length: only the streaming cap can stop it
            self._send(body=b"\0" * (2 << 20), headers={"Content-Type": "image/png"}, length=False)
        elif route == "/redirect":
            self._send(302, headers={"Location": q["to"]})
        elif route == "/redirect-bare":
            self._send(302)
        elif route == "/loop":
            n = int(q["n"])
            self._send(302, headers={"Location": f"/loop?n={n - 1}"}) if n else self._send(
                body=PNG, headers={"Content-Type": "image/png"})
        elif route == "/slow":
            self.server.release.wait(5)
            self._send(body=PNG, headers={"Content-Type": "image/png"})
        else:
            self._send(404, body=b"nope", headers={"Content-Type": "text/plain"})


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.hosts, srv.release = [], threading.Event()
    srv.port = srv.server_address[1]
    srv.url = lambda path, host="127.0.0.1": f"http://{host}:{srv.port}{path}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def dns(monkeypatch):
    """fetch._resolve from a table; `calls` records every lookup."""
    table: dict[str, list[str]] = {}
    calls: list[str] = []

    async def fake(host, port):
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    monkeypatch.setattr(fetch, "_resolve", fake)
    fake.table, fake.calls = table, calls
    return fake


def get(url: str, limits: ImageLimits = ImageLimits()) -> tuple[bytes, str | None]:
    return asyncio.run(fetch_image_bytes(url, limits))


def refused(url: str, limits: ImageLimits = ImageLimits()) -> str:
    with pytest.raises(ImageRejected) as e:
        get(url, limits)
    return str(e.value)


# ---------------------------------------------------------------- address policy

@pytest.mark.parametrize("ip,why", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.0.0.1", "private"), ("172.16.5.4", "private"),
    ("192.168.1.1", "private"), ("fc00::1", "private"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("100.64.0.1", "shared"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("240.0.0.1", "reserved"), ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"),
    ("100.100.100.200", "metadata"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("::7f00:1", "loopback"), ("64:ff9b::7f00:1", "loopback"), ("64:ff9b::a9fe:a9fe", "metadata"),
    ("2002:7f00:1::1", "loopback"), ("::ffff:169.254.169.254", "metadata"),
    ("8.8.8.8", None), ("2606:4700::1111", None), ("::ffff:8.8.8.8", None), ("64:ff9b::808:808", None),
])
def test_refusal_reason(ip, why):
    reason = address.refusal_reason(address.parse_ip_host(ip))
    assert (reason is None) if why is None else (why in reason)


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "017700000001", "0x7f000001", "127.1", "0177.0.0.1",
                                  "127.0.0.1.", "0x7F.0.0.1", "[::ffff:7f00:1]"])
def test_numeric_host_spellings(host):
    assert str(address.parse_ip_host(host)) in ("127.0.0.1", "::ffff:7f00:1")


@pytest.mark.parametrize("host", ["1.2.3.4.5", "256.0.0.1", "1.16777216", "08.0.0.1", "a..b", "bad host", "[::g]"])
def test_bad_host_spellings(host):
    with pytest.raises(address.BadHost):
        address.parse_ip_host(host)


def test_allowed_hosts_parsing_and_metadata_needs_an_exact_entry():
    limits = ImageLimits(allowed_hosts=("10.0.0.0/8", "Images.Internal.", "169.254.0.0/16", "[::1]"))
    assert limits.allowed_names == {"images.internal"}
    ip = address.parse_ip_host
    assert address.is_allowed(ip("10.9.8.7"), limits) and address.is_allowed(ip("::ffff:10.9.8.7"), limits)
    assert address.is_allowed(ip("::1"), limits) and not address.is_allowed(ip("127.0.0.1"), limits)
    assert address.is_allowed(ip("169.254.1.1"), limits)
    assert not address.is_allowed(ip("169.254.169.254"), limits)  # a CIDR does not open metadata
    assert address.is_allowed(ip("169.254.169.254"), ImageLimits(allowed_hosts=("169.254.169.254",)))
    with pytest.raises(ValueError, match="10.0.0.0/33"):
        ImageLimits(allowed_hosts=("10.0.0.0/33",))


def test_limits_from_settings(monkeypatch):
    monkeypatch.setenv("FRONTIER_IMAGE_ALLOWED_HOSTS", '["127.0.0.1", "10.0.0.0/8"]')
    monkeypatch.setenv("FRONTIER_IMAGE_MAX_REDIRECTS", "1")
    limits = ImageLimits.from_settings(Settings())
    assert limits.allowed_hosts == ("127.0.0.1", "10.0.0.0/8") and limits.max_redirects == 1
    assert limits.max_images_per_request == 8 and limits.max_image_bytes == 20 << 20
    assert limits.max_image_pixels < Image.MAX_IMAGE_PIXELS  # ours fires before Pillow's guard


# ---------------------------------------------------------------- http(s) fetch and the SSRF guard

def test_loopback_refused_by_default_without_connecting(server):
    before = len(server.hosts)
    msg = refused(server.url("/img.png"))
    assert "127.0.0.1 is a loopback address" in msg and "FRONTIER_IMAGE_ALLOWED_HOSTS" in msg
    assert len(server.hosts) == before


def test_allowed_host_fetches(server):
    assert get(server.url("/img.png"), LOCAL) == (PNG, "image/png")
    assert get(server.url("/octet"), LOCAL) == (PNG, "application/octet-stream")
    assert get(server.url("/noctype"), LOCAL) == (PNG, None)


@pytest.mark.parametrize("host", ["[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::7f00:1]", "[64:ff9b::7f00:1]",
                                  "2130706433", "0x7f.1", "017700000001", "0x7f000001", "127.1", "127.0.0.1."])
def test_loopback_spellings_refused(server, dns, host):
    assert "loopback" in refused(server.url("/img.png", host))
    assert dns.calls == []  # numeric hosts never reach DNS


@pytest.mark.parametrize("host", ["[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "2130706433", "0x7f.1", "127.0.0.1."])
def test_loopback_spellings_reach_the_checked_address_when_allowed(server, host):
    assert get(server.url("/img.png", host), LOCAL)[0] == PNG


@pytest.mark.parametrize("url,why", [
    ("http://169.254.169.254/latest/meta-data/", "metadata"), ("http://[fd00:ec2::254]/", "metadata"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
    ("http://10.0.0.1/a.png", "private"), ("http://100.64.0.1/a.png", "shared"), ("http://[fe80::1]/", "link-local"),
    ("http://0.0.0.0/", "unspecified"), ("http://0177.0.0.1/", "not a valid URL"), ("http://1.2.3.4.5/", "invalid"),
])
def test_internal_targets_refused(dns, url, why):
    assert why in refused(url, ImageLimits(allowed_hosts=("169.254.0.0/16",)))
    assert dns.calls == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://example.com:70/_x",
                                 "javascript:alert(1)", "//example.com/a.png", "ws://example.com/"])
def test_unsupported_schemes(url):
    msg = refused(url)
    assert "scheme" in msg or "not a valid URL" in msg


def test_credentials_in_url_refused(dns):
    assert "credentials" in refused("http://user:pw@example.com/a.png")


def test_hostname_pinned_to_checked_address(server, dns):
    """images.internal exists only in the fake resolver: the fetch succeeds only because the socket
    goes to the address that was checked, and the original name travels in the Host header."""
    dns.table["images.internal"] = ["127.0.0.1"]
    assert "resolves to a loopback address (127.0.0.1)" in refused(server.url("/img.png", "images.internal"))
    limits = ImageLimits(allowed_hosts=("IMAGES.internal",))
    assert get(server.url("/img.png", "images.internal."), limits)[0] == PNG
    assert server.hosts[-1] == f"images.internal.:{server.port}"
    assert dns.calls == ["images.internal", "images.internal"]  # one lookup per fetch, never again


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a test certificate")
def test_https_pinned_address_keeps_sni_and_certificate_check(dns, tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=images.internal",
                    "-addext", "subjectAltName=DNS:images.internal"], check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    names = []
    tls.sni_callback = lambda sock, name, ctx: names.append(name)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads, srv.hosts = True, []
    srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    real = fetch._new_client
    trust = ssl.create_default_context(cafile=cert)
    monkeypatch.setattr(fetch, "_new_client", lambda limits: real(limits, verify=trust))
    dns.table.update({"images.internal": ["127.0.0.1"], "other.internal": ["127.0.0.1"]})
    port = srv.server_address[1]
    try:
        limits = ImageLimits(allowed_hosts=("images.internal", "other.internal"))
        assert get(f"https://images.internal:{port}/img.png", limits)[0] == PNG
        assert names == ["images.internal"] and srv.hosts == [f"images.internal:{port}"]
        # the certificate is checked against the name, not the address dialled
        assert "certificate" in refused(f"https://other.internal:{port}/img.png", limits)
    finally:
        srv.shutdown()
        srv.server_close()


def test_allowed_name_does_not_open_a_metadata_address(dns):
    dns.table.update({"images.internal": ["169.254.169.254"], "metadata.google.internal": ["169.254.169.254"]})
    msg = refused("http://images.internal/a.png", ImageLimits(allowed_hosts=("images.internal",)))
    assert "resolves to a cloud metadata service address (169.254.169.254)" in msg
    dns.table["images.internal"] = ["::ffff:169.254.169.254"]
    assert "metadata" in refused("http://images.internal/a.png", ImageLimits(allowed_hosts=("images.internal",)))


def test_any_bad_resolved_address_refuses(dns):
    dns.table["mixed.example"] = ["93.184.216.34", "2606:2800:220:1::1", "10.1.2.3"]
    assert "resolves to a private address (10.1.2.3)" in refused("https://mixed.example/a.png")
    assert "could not be resolved" in refused("https://nowhere.example/a.png")


@pytest.mark.parametrize("target,why", [
    ("http://10.0.0.1/x.png", "private"), ("http://169.254.169.254/latest/", "metadata"),
    ("http://[::1]/x.png", "loopback"), ("http://2130706433/x.png", None), ("file:///etc/passwd", "scheme"),
    ("data:image/png;base64,AAAA", "redirect target"), ("ftp://example.com/a.png", "use http or https"),
])
def test_redirect_hops_are_rechecked(server, dns, target, why):
    dns.table["images.internal"] = ["127.0.0.1"]
    limits = ImageLimits(allowed_hosts=("images.internal",))
    target = target.replace("2130706433", f"2130706433:{server.port}")  # loopback, not named in the allowlist
    msg = refused(server.url(f"/redirect?to={quote_from_bytes(target.encode())}", "images.internal"), limits)
    assert (why or "loopback") in msg


def test_redirects_followed_up_to_the_limit(server):
    assert get(server.url("/redirect?to=/img.png"), LOCAL)[0] == PNG  # relative Location
    assert get(server.url("/loop?n=3"), LOCAL)[0] == PNG
    assert "redirected more than 3 times" in refused(server.url("/loop?n=4"), LOCAL)
    assert "without a Location" in refused(server.url("/redirect-bare"), LOCAL)


def test_byte_cap_with_and_without_content_length(server):
    limits = ImageLimits(max_image_bytes=1 << 20, allowed_hosts=("127.0.0.1",))
    assert "FRONTIER_IMAGE_MAX_BYTES" in refused(server.url("/big"), limits)
    assert "FRONTIER_IMAGE_MAX_BYTES" in refused(server.url("/big-unsized"), limits)
    assert get(server.url("/big-unsized"), ImageLimits(max_image_bytes=3 << 20, allowed_hosts=("127.0.0.1",)))


def test_timeout(server):
    limits = ImageLimits(fetch_timeout_s=0.5, allowed_hosts=("127.0.0.1",))
    start = time.monotonic()
    assert "took longer than 0.5s" in refused(server.url("/slow"), limits)
    assert time.monotonic() - start < 3


def test_slow_dns_counts_against_the_deadline(monkeypatch):
    async def slow(host, port):
        await asyncio.sleep(5)
    monkeypatch.setattr(fetch, "_resolve", slow)
    assert "took longer" in refused("http://slow.example/a.png", ImageLimits(fetch_timeout_s=0.3))


def test_content_type_encoding_and_status(server):
    assert "'text/html', not an image" in refused(server.url("/page.html"), LOCAL)
    assert "'gzip'-encoded" in refused(server.url("/gzip"), LOCAL)
    assert "HTTP 404" in refused(server.url("/missing.png"), LOCAL)


# ---------------------------------------------------------------- data: URLs

def test_data_urls():
    b64 = base64.b64encode(PNG).decode()
    assert get(f"data:image/png;base64,{b64}") == (PNG, "image/png")
    wrapped = "\n".join(b64[i:i + 20] for i in range(0, len(b64), 20)).rstrip("=")  # folded, unpadded
    assert get(f"DATA:Image/PNG;base64,{quote_from_bytes(wrapped.encode())}")[0] == PNG
    assert get("data:image/png," + quote_from_bytes(PNG)) == (PNG, "image/png")  # percent-encoded
    assert get(f"  data:image/png;base64,{b64}\n")[0] == PNG


@pytest.mark.parametrize("url,why", [
    ("data:text/plain;base64,aGk=", "'text/plain'"), ("data:,hello", "'text/plain'"),
    ("data:text/html,<svg/onload=alert(1)>", "'text/html'"), ("data:image/png;base64,!!!!", "not valid base64"),
    ("data:image/png;base64", "no ','"),
])
def test_bad_data_urls(url, why):
    assert why in refused(url)


def test_data_url_byte_cap():
    url = "data:image/png;base64," + base64.b64encode(b"\0" * 2000).decode()
    assert "FRONTIER_IMAGE_MAX_BYTES" in refused(url, ImageLimits(max_image_bytes=1000))
    assert "FRONTIER_IMAGE_MAX_BYTES" in refused("data:image/png," + "%00" * 2000, ImageLimits(max_image_bytes=1000))


# ---------------------------------------------------------------- decoding

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def test_bomb_header_refused_before_pillow_opens_it(monkeypatch):
    def never(*a, **k):
        raise AssertionError("Pillow opened a bomb")
    monkeypatch.setattr(decode.Image, "open", never)
    with pytest.raises(ImageRejected, match=r"100000x100000 = 10000000000 pixels.*FRONTIER_IMAGE_MAX_PIXELS"):
        decode_image(png_claiming(100_000, 100_000), ImageLimits())


def test_bomb_refused_even_when_our_limit_is_above_pillows():
    with pytest.raises(ImageRejected, match="too large to decode safely"):
        decode_image(png_claiming(100_000, 100_000), ImageLimits(max_image_pixels=10**12))


def test_real_compressible_image_over_the_pixel_cap():
    data = encode(Image.new("L", (2000, 2000)))
    assert len(data) < 50_000  # 4 MP in a few KB
    with pytest.raises(ImageRejected, match="2000x2000"):
        decode_image(data, ImageLimits(max_image_pixels=1_000_000))


def test_patched_jpeg_and_gif_headers_refused():
    jpeg = bytearray(encode(noise((16, 16)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(ImageRejected, match="60000x60000"):
        decode_image(bytes(jpeg), ImageLimits())
    gif = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    with pytest.raises(ImageRejected, match="65535x65535"):
        decode_image(bytes(gif), ImageLimits())


def test_gif_frame_enlarging_the_canvas_is_checked_too():
    gif = encode(Image.new("P", (8, 8)), "GIF")
    descriptor = gif.index(b"\x2c\x00\x00\x00\x00\x08\x00\x08\x00")  # first frame at (0, 0), 8x8
    for side, match in ((9000, "9000x9000 = 81000000 pixels"), (20000, "too large")):
        patched = gif[:descriptor + 5] + struct.pack("<HH", side, side) + gif[descriptor + 9:]
        assert header_size(patched) == ("GIF", 8, 8)  # the header alone looks harmless
        with pytest.raises(ImageRejected, match=match):
            decode_image(patched, ImageLimits())


@pytest.mark.parametrize("fmt,kw,mode", [
    ("PNG", {}, "RGB"), ("JPEG", {}, "RGB"), ("JPEG", {"progressive": True}, "RGB"), ("GIF", {}, "P"),
    ("WEBP", {}, "RGB"), ("WEBP", {"lossless": True}, "RGBA"), ("WEBP", {}, "RGBA"),
])
def test_header_size_matches_pillow(fmt, kw, mode):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    data = encode(noise((37, 23)).convert(mode), fmt, **kw)
    assert header_size(data) == (fmt, 37, 23)
    assert decode_image(data, ImageLimits()).size == (37, 23)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_truncated_images_refused(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    data = encode(noise((128, 128)), fmt)
    for cut in (len(data) * 6 // 10, 40):
        with pytest.raises(ImageRejected):
            decode_image(data[:cut], ImageLimits())


@pytest.mark.parametrize("data", [encode(Image.new("RGB", (4, 4)), "BMP"), encode(Image.new("RGB", (4, 4)), "TIFF"),
                                  b"", b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"\x89PNG\r\n\x1a\n"])
def test_unsupported_or_garbage_refused(data):
    with pytest.raises(ImageRejected):
        decode_image(data, ImageLimits())


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored sideways: rotate 90 degrees clockwise to show
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95), ImageLimits())
    assert out.size == (20, 40) and out.mode == "RGB"
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the left edge is now the top


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode_image(data, ImageLimits())
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (255, 0, 0)


def test_alpha_composited_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    out = decode_image(encode(img), ImageLimits())
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (255, 0, 0)
    assert all(120 <= c <= 135 for c in out.getpixel((2, 0)))
    la = decode_image(encode(Image.new("LA", (2, 2), (0, 0))), ImageLimits())
    assert la.getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 0)
    assert decode_image(encode(pal, "PNG", transparency=0), ImageLimits()).getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    img = Image.new("I;16", (3, 1))
    img.putdata([0, 32896, 65535])
    out = decode_image(encode(img), ImageLimits())
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_image_digest():
    img = noise((31, 17))
    opaque = img.convert("RGBA")  # same pixels through the alpha path
    same = decode_image(encode(opaque), ImageLimits())
    assert image_digest(img) == image_digest(same) == image_digest(decode_image(encode(img), ImageLimits()))
    assert len(image_digest(img)) == 64
    changed = img.copy()
    changed.putpixel((30, 16), tuple(255 - c for c in img.getpixel((30, 16))))
    assert image_digest(changed) != image_digest(img)
    flat = Image.frombytes("RGB", (4, 4), bytes(range(48)))
    assert image_digest(flat) != image_digest(Image.frombytes("RGB", (8, 2), bytes(range(48))))
    tall = noise((3, 5000))  # several hashing strips
    flipped = tall.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    assert image_digest(tall) == image_digest(tall.copy()) != image_digest(flipped)


# ---------------------------------------------------------------- load_images

def test_load_images_mixed_sources(server, monkeypatch):
    threads = []
    real = intake.decode_image
    monkeypatch.setattr(intake, "decode_image", lambda d, l: threads.append(threading.get_ident()) or real(d, l))
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    out = asyncio.run(load_images([server.url("/img.png"), data_url], LOCAL))
    assert [x.source for x in out] == ["http", "data"]
    assert out[0].digest == out[1].digest == image_digest(out[0].image)
    assert out[0].image.mode == "RGB" and out[0].image.size == (4, 3)
    assert threads and threading.get_ident() not in threads  # decoded off the event loop's thread


def test_load_images_too_many_refused_before_fetching(dns):
    with pytest.raises(ImageRejected, match="3 images; at most 2.*FRONTIER_IMAGE_MAX_PER_REQUEST"):
        asyncio.run(load_images(["http://a.example/1.png"] * 3, ImageLimits(max_images_per_request=2)))
    assert dns.calls == []


def test_load_images_names_the_refused_image(server):
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    with pytest.raises(ImageRejected) as e:
        asyncio.run(load_images([data_url, server.url("/page.html")], LOCAL))
    assert str(e.value).startswith("image 2 of 2: ") and e.value.index == 1
    with pytest.raises(ImageRejected) as e:
        asyncio.run(load_images([data_url, "data:image/png;base64," + base64.b64encode(b"junk").decode()], LOCAL))
    assert e.value.index == 1 and "not supported" in str(e.value)
