"""Text completion responses (one object or stream chunks), with echo and logprobs."""

from __future__ import annotations

import asyncio

from service.api.collect import Choice, usage
from service.api.logprobs import completion_logprobs, concat_logprobs, prompt_logprobs


def completion_choices(body, tok, prep, choices: dict[int, Choice]) -> list[dict]:
    """The response's choices; decodes every token of every choice (call it off the event loop).
    echo + logprobs: each prompt's logprobs head its n choices (the first entry None)."""
    n, prompts_text, prompt_ids = body.n, prep.prompts_text, prep.prompt_ids
    prompt_top = body.logprobs if body.echo and body.logprobs is not None else None
    heads: dict[int, dict] = {}  # prompt index -> its echoed logprobs (shared by its n choices)
    if prompt_top is not None:
        for c in choices.values():
            if c.index // n not in heads and c.prompt_logprobs is not None:
                heads[c.index // n] = prompt_logprobs(tok, prompt_ids[c.index // n], c.prompt_logprobs)
    out = []
    for c in choices.values():
        k = c.index // n
        echo, lps = prompts_text[k], None
        if body.logprobs is not None:
            lps = completion_logprobs(tok, c.logprobs, len(echo))
            if prompt_top is not None:
                head = heads.get(k) or prompt_logprobs(tok, prompt_ids[k], None)  # None: no values came
                lps = concat_logprobs(head, lps)
        out.append({"index": c.index, "text": echo + c.text, "finish_reason": c.finish_reason, "logprobs": lps})
    return out


async def completion_stream(merged, lm, cid, created, n, prompts_text, num_prompt, include_usage, logprobs,
                            prompt_ids=None):
    """prompt_ids: set for echo + logprobs: the first chunk of each choice carries the echoed
    prompt with its logprobs (as vLLM streams it). Text offsets count from the choice's start."""
    def chunk(choices, usage_=None):
        c = {"id": cid, "object": "text_completion", "created": created, "model": lm.id, "choices": choices}
        if include_usage:
            c["usage"] = usage_
        return c

    tok = lm.tokenizer
    generated: dict[int, int] = {}
    reports: dict[int, dict | None] = {}  # final reports per choice (speculative decoding's counts)
    sent: dict[int, int] = {}  # characters of text sent so far per choice (echo included)
    prompt_lps: dict[int, list] = {}  # prompt index -> its prompt logprobs (n choices share them)
    async for idx, out in merged:
        generated[idx] = out.num_generated_tokens
        text, lps = out.text, None
        k = idx // n
        if out.prompt_logprobs is not None:
            prompt_lps[k] = out.prompt_logprobs
        if idx not in sent:
            sent[idx] = len(prompts_text[k])
            text = prompts_text[k] + text
            if prompt_ids is not None:
                lps = await asyncio.to_thread(prompt_logprobs, tok, prompt_ids[k], prompt_lps.get(k))
        if logprobs and out.logprobs:
            lps = concat_logprobs(lps, completion_logprobs(tok, out.logprobs, sent[idx]))
        sent[idx] += len(out.text)
        reason = None
        if out.finished:
            reports[idx] = out.report
            reason = "length" if out.finish_reason.value == "length" else "stop"
        if text or out.finished or out.logprobs:
            yield chunk([{"index": idx, "text": text, "finish_reason": reason, "logprobs": lps}])
    if include_usage:
        yield chunk([], usage(num_prompt, sum(generated.values()), reports=reports.values()))
