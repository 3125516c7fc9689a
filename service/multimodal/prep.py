"""The seam between a chat request's images and a vision-language engine.

A loaded vision-chat model carries one `VisionPrep` (LoadedModel.vision), chosen by how its engine
consumes images:
- native early fusion (service/multimodal/native_prep.py): images become placeholder spans in the
  token ids plus encoder rows (MultimodalInput.spans / embeds);
- transformers VLMs (service/multimodal/hf_prep.py): the model's AutoProcessor expands image tokens
  and makes pixel tensors (MultimodalInput.processor_inputs).

The serving layer (service/serving/stages/vision.py) loads the images (service/multimodal/intake.py),
asks `message_content` how each message must look to the chat template, renders the prompt once,
and calls `prepare` (off the event loop) for the token ids and the engine's MultimodalInput.
"""

from __future__ import annotations

from typing import Any, Protocol

from service.engine.types import MultimodalInput
from service.multimodal.intake import LoadedImage


class VisionPrep(Protocol):
    max_images: int | None  # most images one request may carry for this model (None: no model limit)

    def message_content(self, parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        """One message's content for the chat template. parts: in order, {"type": "text", "text"} or
        {"type": "image"} (the image itself is passed to `prepare`, in prompt order)."""

    def prepare(self, prompt: str, images: list[LoadedImage]) -> tuple[list[int], MultimodalInput]:
        """The rendered prompt and its images -> (prompt token ids, the engine's input). Raises
        ValueError with a message for the client when they do not fit together (e.g. the number of
        image markers differs from the number of images)."""
