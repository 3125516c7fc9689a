"""OpenAI logprob shapes: chat (`content: [{token, logprob, bytes, top_logprobs}]`) and legacy."""

from __future__ import annotations

from service.engine.types import TokenLogprob


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _token_strings(tokenizer, ids) -> dict[int, str]:
    """Each distinct id decoded alone, in one batched call (a prompt's logprobs name thousands)."""
    unique = list(dict.fromkeys(ids))
    return dict(zip(unique, tokenizer.batch_decode([[i] for i in unique]))) if unique else {}


def chat_logprobs(tokenizer, items: list[TokenLogprob]) -> dict:
    content = []
    for lp in items:
        tok = _token(tokenizer, lp.token_id)
        content.append({
            "token": tok, "logprob": lp.logprob, "bytes": list(tok.encode()),
            "top_logprobs": [
                {"token": (t := _token(tokenizer, tid)), "logprob": v, "bytes": list(t.encode())}
                for tid, v in lp.top
            ],
        })
    return {"content": content}


def completion_logprobs(tokenizer, items: list[TokenLogprob], text_offset_start: int = 0) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset_start
    for lp in items:
        tok = _token(tokenizer, lp.token_id)
        tokens.append(tok)
        token_lps.append(lp.logprob)
        tops.append({_token(tokenizer, tid): v for tid, v in lp.top} if lp.top else None)
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(tokenizer, prompt_ids: list[int], values: list[TokenLogprob | None] | None) -> dict:
    """Legacy logprobs of an echoed prompt: one entry per prompt token, text offsets from 0. The
    first token's logprob and top_logprobs are null (nothing precedes it), as OpenAI and vLLM
    answer; so is every entry when the engine gave no values."""
    values = values if values is not None and len(values) == len(prompt_ids) else [None] * len(prompt_ids)
    names = _token_strings(tokenizer, [*prompt_ids, *(t for v in values if v for t, _ in v.top)])
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    for tid, v in zip(prompt_ids, values):
        tokens.append(names[tid])
        token_lps.append(v.logprob if v is not None else None)
        tops.append({names[t]: x for t, x in v.top} if v is not None and v.top else None)
        offsets.append(offset)
        offset += len(names[tid])
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def concat_logprobs(head: dict | None, tail: dict | None) -> dict | None:
    """Two legacy logprob objects (prompt, then completion) as one."""
    if head is None or tail is None:
        return head if tail is None else tail
    return {k: head[k] + tail[k] for k in head}
