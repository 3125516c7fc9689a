"""Reasoning stage: thinking budget reserved on the request's TokenBudget, scaffold instruction or
template switch, the opened thought after the prompt, one budget controller per sequence, and
self-consistency's n and temperature."""

from __future__ import annotations

import dataclasses

from service.api.errors import APIError
from service.reasoning.controller import ThinkingFormat
from service.reasoning.params import parse_reasoning
from service.reasoning.plan import ReasoningPlan
from service.serving.job import ChatJob

VOTING_TEMPERATURE = 0.7  # diverse paths: the point of voting (when the request sets none)


class ReasoningStage:
    def applies(self, job: ChatJob) -> bool:
        b = job.body
        return b.reasoning_effort is not None or b.thinking is not None or b.reasoning is not None

    async def apply(self, job: ChatJob) -> None:
        cfg = job.model.manifest.reasoning
        params = parse_reasoning(job.body, cfg.efforts)
        if params is None:  # reasoning_effort "none", thinking disabled
            return
        if params.preset:  # a preset (xhigh, max) must not leave a long-context model's prompt no room
            cap = max(1, job.model.max_model_len // 2)
            params = dataclasses.replace(params, max_tokens=min(params.max_tokens, cap),
                                         min_tokens=min(params.min_tokens, cap))
        plan = ReasoningPlan(params, ThinkingFormat.from_manifest(cfg), job.tokenizer, job.model.engine.eos_token_ids)
        if plan.self_consistency:
            if job.body.n != 1:
                raise APIError(400, "'n' must be 1 with strategy 'self_consistency' (use reasoning.samples)", param="n")
            job.sampling_overrides["n"] = params.samples
            if job.body.temperature is None:
                job.sampling_overrides["temperature"] = VOTING_TEMPERATURE
        job.reasoning = plan
        job.budget.thinking = params.max_tokens
        job.messages = plan.messages(job.messages)
        job.template_kwargs.update(plan.template_kwargs())
        job.prompt_suffixes.append(plan.prompt_suffix)
        job.controller_factory = plan.controller_factory()  # None when the budget cannot hold a thought
