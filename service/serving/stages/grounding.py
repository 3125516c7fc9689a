"""RAG grounding stage: numbered sources from a collection as the first (system) message, trimmed
to what the budget leaves after the conversation, the thinking budget and the answer.

The sources message comes first so that it is stable across turns (the prefix cache reuses it).
Source sizes are counted with the chat model's tokenizer; should the rendered prompt still
overflow, the pipeline asks this stage to drop its weakest source (a shrinker) and renders again.
"""

from __future__ import annotations

import asyncio

from service.rag.errors import RagError
from service.rag.grounding import parse_spec, last_user_text
from service.rag.prompt import drop_weakest, select_sources, sources_message
from service.serving.job import ChatJob

TEMPLATE_MARGIN = 16  # tokens a chat template adds around one message


def conversation_tokens(tokenizer, messages: list[dict]) -> int:
    """The messages' tokens plus the template's per-message overhead: an estimate the pipeline
    checks against the rendered prompt."""
    return sum(len(tokenizer.encode(m["content"], add_special_tokens=False)) + TEMPLATE_MARGIN for m in messages)


class GroundingStage:
    def __init__(self, store):
        self.store = store  # service.rag.store.RagStore, or None when RAG is off

    def applies(self, job: ChatJob) -> bool:
        return job.body.rag is not None

    async def apply(self, job: ChatJob) -> None:
        if self.store is None:
            raise RagError(400, "RAG is not enabled on this server", param="rag")
        spec = parse_spec(job.body.rag)
        results = await self.store.search(spec.collection, last_user_text(job.messages), spec.top_k, spec.mode,
                                          spec.filter)
        tokenizer, messages = job.tokenizer, job.messages

        def choose() -> list[dict]:
            room = job.budget.room_for_prompt() - conversation_tokens(tokenizer, messages) - 2 * TEMPLATE_MARGIN
            return select_sources(results, tokenizer, room)

        chosen = await asyncio.to_thread(choose)
        source_msg = {"role": "system", "content": ""}

        def install(sources: list[dict]) -> None:
            source_msg["content"], job.response_fields["citations"] = sources_message(sources)

        def shrink() -> bool:
            nonlocal chosen
            if not chosen:
                return False
            chosen = drop_weakest(chosen)
            install(chosen)
            return True

        install(chosen)
        job.messages = [source_msg, *job.messages]
        job.shrinkers.append(shrink)
