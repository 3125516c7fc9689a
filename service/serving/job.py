"""A chat request on its way through the stages, and the Stage protocol.

Stages read the parsed request and the model, and contribute to the job: messages, template
switches, text after the rendered prompt, token reservations (on the budget), a per-sequence
controller, sampling overrides, and fields for the response. Nothing is rendered or tokenized
until every stage has run (serving/chat.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from service.serving.budget import TokenBudget


@dataclass
class ChatJob:
    body: Any  # ChatCompletionRequest
    model: Any  # LoadedModel
    messages: list[dict]
    budget: TokenBudget
    template_kwargs: dict = field(default_factory=dict)
    prompt_suffixes: list[Callable[[str], str]] = field(default_factory=list)  # text appended to the rendered prompt
    controller_factory: Callable[[], object] | None = None  # one TokenController per output sequence
    sampling_overrides: dict = field(default_factory=dict)  # e.g. n and temperature for self-consistency
    response_fields: dict = field(default_factory=dict)  # extra top-level fields (citations)
    reasoning: Any = None  # ReasoningPlan when the request thinks (response: split, usage, vote)
    tools: Any = None  # ToolPlan when the request offers tools (response: calls parsed out of the text)
    images: list = field(default_factory=list)  # LoadedImage, in prompt order (the vision stage)
    multimodal: Any = None  # the engine's MultimodalInput, made with the prompt's token ids
    # Called when the rendered prompt does not fit: return True after making it smaller (RAG drops
    # its weakest source), False when there is nothing left to give up.
    shrinkers: list[Callable[[], bool]] = field(default_factory=list)

    @property
    def tokenizer(self):
        return self.model.tokenizer


class Stage(Protocol):
    """One step of request preparation; `applies` decides from the request alone."""

    def applies(self, job: ChatJob) -> bool: ...

    async def apply(self, job: ChatJob) -> None: ...
