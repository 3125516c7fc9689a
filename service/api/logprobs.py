"""OpenAI logprob shapes: chat (`content: [{token, logprob, bytes, top_logprobs}]`) and legacy."""

from __future__ import annotations

from service.engine.types import TokenLogprob


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


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
