"""Vision stage: a chat request's image_url parts fetched and decoded (service/multimodal/intake.py,
safely) and kept on the job in prompt order; where each image sits, its message's text holds the
IMAGE marker, so that the other stages can keep treating contents as strings. At render time
(`template_messages`) the model's VisionPrep turns each content into what its chat template wants
(a marker token in the text, or a list of image and text parts); the one tokenization
(serving/chat.py) then makes the engine's MultimodalInput."""

from __future__ import annotations

from service.api.errors import APIError
from service.multimodal.errors import ImageRejected
from service.multimodal.intake import load_images
from service.multimodal.limits import ImageLimits
from service.serving.job import ChatJob

IMAGE = "\x00image\x00"  # where an image sits in a message's text; removed from what clients send


class VisionStage:
    def __init__(self, settings):
        self.limits = ImageLimits.from_settings(settings)

    def applies(self, job: ChatJob) -> bool:
        return job.model.vision is not None or any(m.has_images() for m in job.body.messages)

    async def apply(self, job: ChatJob) -> None:
        lm, vision = job.model, job.model.vision
        for m in job.messages:  # no client text may pose as an image
            if isinstance(m.get("content"), str) and IMAGE in m["content"]:
                m["content"] = m["content"].replace(IMAGE, "")
        if not any(m.has_images() for m in job.body.messages):
            return
        if vision is None:
            raise APIError(400, f"model {lm.id!r} does not accept images", param="messages",
                           code="images_not_supported")
        parts = [p for m in job.body.messages if m.has_images() for p in m.content if p.type == "image_url"]
        if any(p.image_url is None for p in parts):
            raise APIError(400, 'an image_url part needs {"image_url": {"url": ...}}', param="messages")
        if vision.max_images is not None and len(parts) > vision.max_images:
            raise APIError(400, f"model {lm.id!r} takes at most {vision.max_images} images per request; "
                           f"got {len(parts)}", param="messages", code="too_many_images")
        try:
            job.images = await load_images([p.image_url.url for p in parts], self.limits)
        except ImageRejected as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_image") from None
        for i, m in enumerate(job.body.messages):
            if m.has_images():
                text = "".join(IMAGE if p.type == "image_url" else (p.text or "").replace(IMAGE, "") for p in m.content)
                job.messages[i] = {**job.messages[i], "content": text}


def template_messages(messages: list[dict], vision) -> list[dict]:
    """Messages as the chat template of a model that takes images wants them (each content through
    its VisionPrep, text-only ones too: some templates read every content as a list of parts)."""
    if vision is None:
        return messages
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            pieces = content.split(IMAGE)
            parts = [{"type": "text", "text": pieces[0]}]
            for piece in pieces[1:]:
                parts += [{"type": "image"}, {"type": "text", "text": piece}]
            m = {**m, "content": vision.message_content([p for p in parts if p["type"] == "image" or p["text"]])}
        out.append(m)
    return out
