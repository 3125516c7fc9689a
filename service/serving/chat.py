"""Chat requests: messages through the stages, then one render and one tokenization, the budget
settled, and the engine request built. Routes call `prepare_chat`, then `submit`, then shape."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from service.api.errors import APIError
from service.engine.types import GenerationRequest
from service.serving.budget import TokenBudget
from service.serving.job import ChatJob, Stage
from service.serving.params import (
    check_sequences, check_token_ids, resolve_speculative, sampling_params,
)
from service.serving.stages import GroundingStage, ReasoningStage, StructuredStage, VisionStage
from service.serving.stages.vision import template_messages
from service.serving.grammar import as_api_error
from service.structured.grammar import GrammarError
from service.structured.tools import history_messages, template_renders_tools


@dataclass
class PreparedChat:
    job: ChatJob
    request: GenerationRequest

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)


def chat_stages(rag_store, settings) -> list[Stage]:
    """In order: images rewrite the messages the others extend; reasoning reserves thinking before
    grounding sizes its sources; structured output wraps the reasoning controller."""
    return [VisionStage(settings), ReasoningStage(), StructuredStage(settings.structured_max_string),
            GroundingStage(rag_store)]


def render_chat(tokenizer, messages: list[dict], model_id: str, **template_kwargs) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model {model_id!r} has no chat template; use /v1/completions",
                       param="model", code="no_chat_template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    except Exception as exc:  # templates raise on unsupported role orders etc.
        raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from None


def _check_request(body) -> None:
    if body.functions or body.function_call not in (None, "none"):  # OpenAI's deprecated form of tools
        raise APIError(400, "functions and function_call are not supported; use tools and tool_choice",
                       param="functions" if body.functions else "function_call", code="unsupported")


def _tokenize(job: ChatJob) -> list[int]:
    """Render and tokenize the finished job's prompt (with images: the model's VisionPrep, which also
    makes the engine's MultimodalInput). If it overflows what the budget allows, a stage that can
    give something up (RAG: its weakest source) does, and it renders again."""
    while True:
        messages = template_messages(job.messages, job.model.vision)
        prompt = render_chat(job.tokenizer, messages, job.model.id, **job.template_kwargs)
        for suffix in job.prompt_suffixes:
            prompt += suffix(prompt)
        if job.images:
            try:
                ids, job.multimodal = job.model.vision.prepare(prompt, job.images)
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages", code="invalid_image") from None
        else:
            ids = job.tokenizer.encode(prompt, add_special_tokens=False)
        if len(ids) <= job.budget.room_for_prompt() or not any(shrink() for shrink in job.shrinkers):
            return ids


async def prepare_chat(body, lm, settings, rag_store) -> PreparedChat:
    """400s for anything wrong with the request, before it reaches the engine."""
    _check_request(body)
    speculative = await resolve_speculative(body, settings, lm)
    try:
        messages = history_messages(body.messages, lm.manifest.tools, template_renders_tools(lm.tokenizer))
    except GrammarError as exc:
        raise as_api_error(exc) from None
    budget = TokenBudget(lm.max_model_len, body.max_completion_tokens or body.max_tokens, settings.max_tokens_default)
    job = ChatJob(body, lm, messages, budget)
    for stage in chat_stages(rag_store, settings):
        if stage.applies(job):
            await stage.apply(job)
    prompt_ids = await asyncio.to_thread(_tokenize, job)
    check_token_ids(body, len(lm.tokenizer))
    answer = budget.answer_tokens(len(prompt_ids))
    # The engine's limit covers thinking and answer; the reasoning controller bounds the thought.
    params = sampling_params(body, answer + budget.thinking, body.logprobs, body.top_logprobs or 0,
                             lm.manifest.defaults, **{"speculative": speculative, **job.sampling_overrides})
    check_sequences(1, params.n, settings.max_sequences_per_request)  # n, or reasoning.samples
    return PreparedChat(job, GenerationRequest(prompt_ids, params, controller_factory=job.controller_factory,
                                               multimodal=job.multimodal))
