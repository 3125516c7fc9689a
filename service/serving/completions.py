"""Legacy completions: each prompt (text or token ids) to one engine request of n choices."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from service.api.errors import APIError
from service.engine.types import GenerationRequest
from service.serving.budget import TokenBudget
from service.serving.params import (
    check_sequences, check_token_ids, resolve_speculative, sampling_params,
)
from service.serving.grammar import as_api_error, grammar_factory
from service.structured.grammar import GrammarError, answer_grammar, response_format_schema

OPENAI_DEFAULT_MAX_TOKENS = 16  # legacy completions without max_tokens


@dataclass
class PreparedCompletions:
    requests: list[GenerationRequest]
    prompt_ids: list[list[int]]
    prompts_text: list[str]  # what echo puts in front of each prompt's choices ("" without echo)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)


def split_prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [prompt]  # one prompt given as token ids
    return list(prompt)


async def prepare_completions(body, lm, settings) -> PreparedCompletions:
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be at least 1; 0 is accepted only with echo (the prompt and "
                       "its logprobs, nothing generated)", param="max_tokens")
    try:  # response_format: every choice follows the schema
        schema = response_format_schema(body.response_format)
        grammar = answer_grammar(schema, settings.structured_max_string) if schema is not None else None
    except GrammarError as exc:
        raise as_api_error(exc) from None
    speculative = await resolve_speculative(body, settings, lm)
    tok = lm.tokenizer
    prompts = split_prompts(body.prompt)
    check_sequences(len(prompts), body.n, settings.max_sequences_per_request)  # before any tokenizing
    vocab = len(tok)
    check_token_ids(body, vocab)
    prompt_ids = [list(p) if isinstance(p, list) else await asyncio.to_thread(tok.encode, p) for p in prompts]
    # echo + logprobs: the engine also scores the prompt's tokens (top-k alternatives as asked)
    prompt_top = body.logprobs if body.echo and body.logprobs is not None else None
    controllers = await grammar_factory(lm, grammar)
    requests, texts = [], []
    for p, ids in zip(prompts, prompt_ids):
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if any(i < 0 or i >= vocab for i in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        budget = TokenBudget(lm.max_model_len, body.max_tokens, OPENAI_DEFAULT_MAX_TOKENS, param="prompt")
        params = sampling_params(body, budget.answer_tokens(len(ids)), body.logprobs is not None, body.logprobs or 0,
                                 lm.manifest.defaults, prompt_logprobs=prompt_top,
                                 speculative=speculative)
        requests.append(GenerationRequest(prompt_token_ids=ids, sampling=params, controller_factory=controllers))
        # the prompt as given (OpenAI, vLLM); token-id prompts decoded
        texts.append((p if isinstance(p, str) else tok.decode(ids)) if body.echo else "")
    return PreparedCompletions(requests, prompt_ids, texts)
