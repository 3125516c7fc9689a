"""Request fields to engine parameters, and the request-level limits checked before tokenizing."""

from __future__ import annotations

import dataclasses

from service.api.errors import APIError
from service.engine.types import SamplingParams, SpeculativeParams
from service.pool.drafts import DraftUnavailable


def check_sequences(num_prompts: int, n: int, limit: int) -> None:
    """Bounded work: one request may not queue more than `limit` sequences (prompts x n), however
    the engine's queue stands; checked before any prompt is tokenized."""
    if num_prompts * n > limit:
        raise APIError(400, f"this request asks for {num_prompts * n} sequences ({num_prompts} prompt(s) x n={n}); "
                       f"at most {limit} per request (max_sequences_per_request)", param="n",
                       code="too_many_sequences")


def check_token_ids(body, vocab: int) -> None:
    """Token ids a request names must exist in the model's vocabulary."""
    bad = [t for t in body.stop_token_ids or () if t >= vocab]
    if bad:
        raise APIError(400, f"stop_token_ids must be in [0, {vocab}); got {bad[0]}", param="stop_token_ids")


def _first(*values):
    return next(v for v in values if v is not None)


def speculative_params(body, settings, manifest) -> SpeculativeParams | None:
    """The request's speculative decoding, field by field: the request's `speculative` > the setting
    (FRONTIER_SPECULATIVE_METHOD unless "auto"; FRONTIER_SPECULATIVE_NUM_TOKENS / _MODEL) > the model
    manifest's `speculative` > off (4 tokens). None when it resolves to off."""
    req, spec = body.speculative, manifest.speculative
    setting = None if settings.speculative_method == "auto" else settings.speculative_method
    method = _first(req and req.method, setting, spec.method)
    num_tokens = _first(req and req.num_tokens, settings.speculative_num_tokens, spec.num_tokens)
    if method != "draft":
        if req and req.model:
            raise APIError(400, f"speculative.model names a draft model, but the method is {method!r}; "
                           'use method "draft"', param="speculative.model")
        return None if method == "off" else SpeculativeParams(method, num_tokens)
    model = (req and req.model) or settings.speculative_model or spec.model
    if not model:
        raise APIError(400, f"model {manifest.id!r} has no default draft model; name one in speculative.model",
                       param="speculative.model", code="draft_unavailable")
    return SpeculativeParams("draft", num_tokens, model)


async def resolve_speculative(body, settings, lm) -> SpeculativeParams | None:
    """speculative_params, with a draft model loaded into lm's engine (once). A draft the request
    asked for that cannot serve this model (another tokenizer, unknown, not pulled, an engine
    without drafts) is a 400 naming both; a default draft that cannot runs without speculation
    (the pool logged why at load)."""
    spec = speculative_params(body, settings, lm.manifest)
    if spec is None or spec.method != "draft" or spec.model in lm.drafts:
        return spec
    asked = body.speculative is not None and (body.speculative.method == "draft" or body.speculative.model)
    try:
        if lm.attach_draft is None:
            raise DraftUnavailable(f"model {lm.id!r} cannot load draft models")
        await lm.attach_draft(spec.model)
    except DraftUnavailable as exc:
        if asked:
            raise APIError(400, str(exc), param="speculative.model", code="draft_unavailable") from None
        return None
    return spec


def _pick(value, default, fallback):
    return value if value is not None else (default if default is not None else fallback)


def sampling_params(body, max_tokens: int, logprobs: bool, top_logprobs: int, defaults=None,
                    **overrides) -> SamplingParams:
    """Fields left out take the manifest's defaults, then OpenAI's (temperature 1, top_p 1).
    max_tokens: settled by the request's TokenBudget; `overrides` from the stages win over all."""
    top_k = _pick(body.top_k, defaults and defaults.top_k, 0)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_pick(body.temperature, defaults and defaults.temperature, 1.0),
        top_p=_pick(body.top_p, defaults and defaults.top_p, 1.0),
        top_k=0 if top_k < 0 else top_k,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=_pick(body.repetition_penalty, defaults and defaults.repetition_penalty, 1.0),
        seed=body.seed,
        stop=tuple(body.stop or ()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        n=body.n,
    )
    return dataclasses.replace(params, **overrides) if overrides else params
