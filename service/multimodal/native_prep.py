"""Early fusion for the native engine: a trained vision adapter (service/multimodal/vision/) turns
each image into N rows of the language model's embedding space, which fill N placeholder positions
of the prompt (service/multimodal/vision/prompt.py has the convention the adapter was trained with).

The encoder runs once per distinct image: rows are cached by the image's content digest (bounded,
least recently used out), so the same image in another request, or another turn of the same chat,
costs nothing; the engine's prefix cache then reuses its KV blocks too (keyed by the same digest).
"""

from __future__ import annotations

import collections
import threading
import time

import torch

from service.engine.types import MultimodalInput
from service.multimodal.intake import LoadedImage
from service.multimodal.vision.prompt import (
    IMAGE_TOKEN, count_image_placeholders, expand_image_placeholders, image_token_id, strip_image_token,
)


class NativeVisionPrep:
    def __init__(self, adapter, tokenizer, device: torch.device | str = "cpu", cache_size: int = 256,
                 max_images: int | None = None):
        self.adapter = adapter.to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.placeholder = image_token_id(tokenizer)
        self.num_image_tokens = adapter.num_image_tokens
        self.max_images = max_images
        self._cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # requests prepare on worker threads

    def message_content(self, parts: list[dict]) -> str:
        """One marker line per image where it appears; a literal marker in the text is removed (it
        would pose as an image)."""
        return "".join(IMAGE_TOKEN + "\n" if p["type"] == "image" else strip_image_token(p["text"]) for p in parts)

    def prepare(self, prompt: str, images: list[LoadedImage]) -> tuple[list[int], MultimodalInput]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        found = count_image_placeholders(ids, self.placeholder)
        if found != len(images):
            raise ValueError(f"the rendered prompt holds {found} image markers for {len(images)} images "
                             "(does the chat template keep every message's content?)")
        ids = expand_image_placeholders(ids, self.num_image_tokens, self.placeholder)
        starts = [i for i, t in enumerate(ids) if t == self.placeholder and (i == 0 or ids[i - 1] != self.placeholder)]
        embeds, report = self.encode(images)
        return ids, MultimodalInput(digests=[im.digest for im in images],
                                    spans=[(s, self.num_image_tokens) for s in starts], embeds=embeds,
                                    report=report)

    def encode(self, images: list[LoadedImage]) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Rows [N, hidden] per image, from the cache or the encoder (new images in one batch)."""
        with self._lock:
            cached = {im.digest: self._cache[im.digest] for im in images if im.digest in self._cache}
            for d in cached:
                self._cache.move_to_end(d)
        todo = {im.digest: im for im in images if im.digest not in cached}
        t0 = time.perf_counter()
        if todo:
            rows = self.adapter.embed_images([im.image for im in todo.values()])  # [k, N, hidden]
            fresh = dict(zip(todo, rows))
            with self._lock:
                for d, r in fresh.items():
                    self._cache[d] = r
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            cached.update(fresh)
        report = {"images": float(len(images)), "encoded": float(len(todo)),
                  "cache_hits": float(len(images) - len(todo)), "encode_seconds": time.perf_counter() - t0}
        return [cached[im.digest] for im in images], report
