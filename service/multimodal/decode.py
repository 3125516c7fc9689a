"""Encoded bytes -> an RGB PIL image, refusing what is not a sane PNG/JPEG/WebP/GIF.

The pixel count is read from the file header by our own few lines, before Pillow even opens
the file, so our limit (and message) fires first and nothing is allocated for a bomb; Pillow's
own size is checked again after open (a GIF frame may enlarge the canvas) and before load().
"""

from __future__ import annotations

import hashlib
import io
import re
import struct

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from service.multimodal.errors import ImageRejected
from service.multimodal.limits import ImageLimits

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_JPEG_FILL = re.compile(rb"\xff+")
_JPEG_MAX_SEGMENTS = 4096  # real files have tens; this bounds a crafted header's walk
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; ImageRejected for other or broken files."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return ("PNG", *struct.unpack(">II", data[16:24]))
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return ("GIF", *struct.unpack("<HH", data[6:10]))
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return ("WEBP", *_webp_size(data))
        if data[:3] == b"\xff\xd8\xff":
            return ("JPEG", *_jpeg_size(data))
    except (struct.error, IndexError):
        raise ImageRejected("image header is truncated") from None
    raise ImageRejected("image format is not supported; send PNG, JPEG, WebP or GIF")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: 24-bit canvas size minus one
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L":  # lossless: 14-bit sizes minus one after the 0x2f signature
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy: key frame start code, 14-bit sizes
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    raise ImageRejected("WebP header is not recognized")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    for _ in range(_JPEG_MAX_SEGMENTS):  # walk the marker segments up to the start-of-frame one
        fill = _JPEG_FILL.match(data, i)  # a marker: one or more 0xFF, then its code
        if fill is None:
            raise ImageRejected("JPEG header is corrupt")
        i = fill.end()
        marker = data[i]
        i += 1
        if marker in _JPEG_SOF:
            h, w = struct.unpack(">HH", data[i + 3:i + 7])
            return w, h
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            raise ImageRejected("JPEG has no frame header")
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers carry no length
            continue
        i += struct.unpack(">H", data[i:i + 2])[0]
    raise ImageRejected("JPEG header has too many segments")


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """RGB image (EXIF orientation applied, alpha composited on white; GIF/WebP: first frame)."""
    fmt, width, height = header_size(data)
    _check_pixels(width, height, limits)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
        _check_pixels(img.width, img.height, limits)
        img.load()
        img = _orient(img)
        return _to_rgb(img)
    except ImageRejected:
        raise
    except Image.DecompressionBombError:  # backstop: only with a limit above Pillow's own
        raise ImageRejected(f"image is too large to decode safely ({fmt})") from None
    except UnidentifiedImageError:
        raise ImageRejected(f"image data is not a valid {fmt} file") from None
    except MemoryError:
        raise
    except Exception as e:  # hostile input reaches Pillow's decoders, which raise a zoo of types
        raise ImageRejected(f"image data is truncated or corrupt ({fmt}): {e}") from None


def image_digest(img: Image.Image) -> str:
    """sha256 over mode, size and raw pixels: the content key for prefix and encoder caches."""
    h = hashlib.sha256(f"{img.mode} {img.width}x{img.height}\n".encode())
    rows = max(1, (1 << 22) // max(1, img.width * len(img.getbands())))  # ~4 MiB strips, not one copy
    for top in range(0, img.height, rows):
        h.update(img.crop((0, top, img.width, min(top + rows, img.height))).tobytes())
    return h.hexdigest()


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageRejected(f"image has an empty size ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise ImageRejected(f"image is {width}x{height} = {width * height} pixels; at most "
                            f"{limits.max_image_pixels} are accepted (FRONTIER_IMAGE_MAX_PIXELS)")


def _orient(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # unreadable EXIF should not cost a good picture
        return img
    return ImageOps.exif_transpose(img) if orientation != 1 else img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: scale, don't clip at 255
        return img.convert("I").point(lambda v: v * (1 / 257)).convert("L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
