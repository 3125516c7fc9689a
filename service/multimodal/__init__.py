"""Multimodal intake: image parts of chat messages -> safe, decoded RGB images (see intake.py)."""

from service.multimodal.errors import ImageRejected
from service.multimodal.intake import LoadedImage, load_images
from service.multimodal.limits import ImageLimits

__all__ = ["ImageLimits", "ImageRejected", "LoadedImage", "load_images"]
