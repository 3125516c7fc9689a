"""The one error image intake raises: the API maps it to HTTP 400, code "invalid_image"."""

from __future__ import annotations


class ImageRejected(Exception):
    """An image part was refused; the message says why in words a client can act on."""

    def __init__(self, message: str, *, index: int | None = None):
        super().__init__(message)
        self.message = message
        self.index = index  # 0-based position among the request's images, when known
