"""VisionPrep for transformers vision-language models: the model's own AutoProcessor expands each
image marker of the rendered prompt into the family's image tokens and makes the pixel tensors.

Families and what their processor gives (all kept for the prefill, service/engine/hf_vision.py):
LLaVA pixel_values [images, 3, H, W]; Idefics3/SmolVLM pixel_values [1, images, 3, H, W] and
pixel_attention_mask; Qwen2-VL pixel_values [patches, dim], image_grid_thw [images, 3] and
mm_token_type_ids [1, T]; Mllama pixel_values [1, images, tiles, 3, H, W], aspect_ratio_ids,
aspect_ratio_mask and cross_attention_mask [1, T, images, tiles].
"""

from __future__ import annotations

from typing import Any, Iterable

from service.engine.types import MultimodalInput
from service.multimodal.intake import LoadedImage

# Processor outputs that are no model input (the ids travel as the request's prompt_token_ids; one
# unpadded prompt needs no attention mask).
_DROPPED = frozenset({"input_ids", "attention_mask", "text_replacement_offsets", "num_tiles"})


class HFVisionPrep:
    """VisionPrep (service/multimodal/prep.py) around a transformers processor.

    processor: the model's AutoProcessor (tokenizer + image processor + image marker).
    max_images: most images one request may carry (None: the model sets no limit).
    model_inputs: the names the model's forward accepts (service/engine/loading.py passes them);
    processor outputs outside them are dropped (None: keep every output but ids and masks).
    """

    def __init__(self, processor, max_images: int | None = None, model_inputs: Iterable[str] | None = None):
        self.processor = processor
        self.max_images = max_images
        self.image_token: str | None = getattr(processor, "image_token", None)  # the marker the template writes
        self._keep = None if model_inputs is None else frozenset(model_inputs) - _DROPPED

    def message_content(self, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The HF content list these processors' chat templates expect: {"type": "image"} where an
        image goes, {"type": "text", "text": ...} for text."""
        content: list[dict[str, Any]] = []
        for part in parts:
            kind = part.get("type")
            if kind == "image":
                content.append({"type": "image"})
            elif kind == "text":
                content.append({"type": "text", "text": part.get("text", "")})
            else:
                raise ValueError(f"unsupported content part type {kind!r} (expected 'text' or 'image')")
        return content

    def prepare(self, prompt: str, images: list[LoadedImage]) -> tuple[list[int], MultimodalInput]:
        """The rendered prompt (its image markers in place) and its images, in order -> (token ids with
        the image tokens expanded, MultimodalInput with the processor's tensors). ValueError when the
        markers and the images disagree or the processor refuses them."""
        if self.max_images is not None and len(images) > self.max_images:
            raise ValueError(f"this model accepts at most {self.max_images} images per request; got {len(images)}")
        if self.image_token:
            found = prompt.count(self.image_token)
            if found != len(images):
                raise ValueError(f"the prompt has {found} image markers ({self.image_token!r}) for {len(images)} "
                                 f"image{'s' if len(images) != 1 else ''}; each image needs exactly one marker")
        kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt", "add_special_tokens": False}
        if images:
            # One list of images per prompt: Idefics3 and Mllama need the nesting, the others accept it.
            kwargs["images"] = [[img.image for img in images]]
        try:
            out = self.processor(**kwargs)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"the images could not be prepared for this model: {exc}") from exc
        ids = out["input_ids"][0].tolist()
        if not images:
            return ids, MultimodalInput(digests=[])
        inputs = {k: v for k, v in out.items()
                  if k not in _DROPPED and (self._keep is None or k in self._keep)}
        return ids, MultimodalInput(digests=[img.digest for img in images], processor_inputs=inputs)
