"""Image parts of one request -> decoded RGB images with content digests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from service.multimodal.decode import decode_image, image_digest
from service.multimodal.errors import ImageRejected
from service.multimodal.fetch import fetch_image_bytes
from service.multimodal.limits import ImageLimits


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB
    digest: str  # image_digest(image): prefix-cache and encoder-cache key
    source: Literal["data", "http"]


async def load_images(urls: list[str], limits: ImageLimits) -> list[LoadedImage]:
    """Fetch concurrently, decode one at a time off the event loop; the first refusal wins and
    cancels the other fetches. ImageRejected carries the image's index and names it."""
    if len(urls) > limits.max_images_per_request:
        raise ImageRejected(f"request has {len(urls)} images; at most {limits.max_images_per_request} "
                            "are accepted (FRONTIER_IMAGE_MAX_PER_REQUEST)")
    tasks = [asyncio.ensure_future(_numbered(i, len(urls), fetch_image_bytes(u, limits))) for i, u in enumerate(urls)]
    try:
        fetched = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()  # no-op for finished ones
    loaded = []
    for i, (url, (data, _media)) in enumerate(zip(urls, fetched)):
        # Sequential: bounded memory and CPU per request; the thread keeps the loop serving others.
        image, digest = await _numbered(i, len(urls), asyncio.to_thread(_decode_and_hash, data, limits))
        loaded.append(LoadedImage(image, digest, "data" if url.strip()[:5].lower() == "data:" else "http"))
    return loaded


def _decode_and_hash(data: bytes, limits: ImageLimits) -> tuple[Image.Image, str]:
    image = decode_image(data, limits)
    return image, image_digest(image)


async def _numbered(index: int, total: int, work):
    try:
        return await work
    except ImageRejected as e:
        message = f"image {index + 1} of {total}: {e.message}" if total > 1 else e.message
        raise ImageRejected(message, index=index) from None
