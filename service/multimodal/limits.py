"""Limits on image intake, frozen at startup from Settings (FRONTIER_IMAGE_*)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import cached_property
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ImageLimits:
    max_images_per_request: int = 8
    max_image_bytes: int = 20 * 1024 * 1024  # encoded bytes of one image (data: payload or HTTP body)
    # width x height read from the file header and refused before any pixel is decoded. 40 MP covers
    # phone and DSLR photos; keep it under Pillow's MAX_IMAGE_PIXELS (~89 MP) so our check, with our
    # message, always fires before Pillow's decompression-bomb guard.
    max_image_pixels: int = 40_000_000
    fetch_timeout_s: float = 10.0  # one URL end to end: DNS, connect, every redirect hop, the body
    max_redirects: int = 3
    # Host names (exact, case-insensitive), IPs or CIDRs that may be fetched although they resolve to
    # loopback/private/link-local addresses. A cloud metadata address is only allowed by naming it
    # exactly (the IP itself, or a metadata host name such as metadata.google.internal): neither a
    # CIDR such as 169.254.0.0/16 nor another allowed name that resolves to it opens it.
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_images_per_request", "max_redirects"):
            if getattr(self, name) < 0:
                raise ValueError(f"ImageLimits.{name} must be >= 0")
        for name in ("max_image_bytes", "max_image_pixels", "fetch_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ImageLimits.{name} must be > 0")
        self.allowed_networks  # parse now: a bad entry fails at startup, not on the first request

    @classmethod
    def from_settings(cls, settings: Any) -> ImageLimits:
        return cls(
            max_images_per_request=settings.image_max_per_request,
            max_image_bytes=settings.image_max_bytes,
            max_image_pixels=settings.image_max_pixels,
            fetch_timeout_s=settings.image_fetch_timeout_s,
            max_redirects=settings.image_max_redirects,
            allowed_hosts=tuple(settings.image_allowed_hosts),
        )

    @cached_property
    def allowed_networks(self) -> tuple[IPNetwork, ...]:
        nets = []
        for entry in self.allowed_hosts:
            entry = entry.strip().strip("[]")
            if _looks_like_ip(entry):
                try:
                    nets.append(ipaddress.ip_network(entry, strict=False))
                except ValueError as e:
                    raise ValueError(f"image_allowed_hosts entry {entry!r} is not a valid IP or CIDR: {e}") from None
        return tuple(nets)

    @cached_property
    def allowed_names(self) -> frozenset[str]:
        return frozenset(
            e.strip().lower().rstrip(".") for e in self.allowed_hosts if not _looks_like_ip(e.strip().strip("[]"))
        )


def _looks_like_ip(entry: str) -> bool:
    head = entry.split("/", 1)[0]
    return ":" in head or (head.replace(".", "").isdigit() and head.count(".") == 3)
