"""Chat completion responses: one object, stream chunks, or a finished response replayed as chunks
(self-consistency: the winner is known only after the vote). Reasoning is split from the answer
here; reasoning token counts and speculative decoding's counts (usage) come from the sequences'
final reports."""

from __future__ import annotations

from service.api.collect import Choice, usage
from service.api.logprobs import chat_logprobs
from service.serving.chat import PreparedChat
from service.structured.tools import split_calls


def _head(prep: PreparedChat, completion_id: str, created: int, obj: str) -> dict:
    lm = prep.job.model
    return {"id": completion_id, "object": obj, "created": created, "model": lm.id,
            "system_fingerprint": f"frontier-{lm.engine_kind}"}


def _message(c: Choice, plan, tools) -> dict:
    """The assistant message: reasoning split from the answer, tool calls parsed out of it."""
    msg = {"role": "assistant", "content": c.text}
    if plan is not None:
        splitter = plan.splitter()
        splitter.feed(c.text)
        splitter.finish()
        msg = {"role": "assistant", "content": splitter.content, "reasoning_content": splitter.reasoning,
               "reasoning": splitter.reasoning}
    if tools is not None:
        msg["content"], calls = split_calls(msg["content"], tools)
        if calls:
            msg["tool_calls"] = calls
    return msg


def _finish_reason(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


def chat_response(prep: PreparedChat, choices: dict[int, Choice], completion_id: str, created: int, metrics) -> dict:
    job, lm = prep.job, prep.job.model
    plan, logprobs = job.reasoning, job.body.logprobs
    out = _head(prep, completion_id, created, "chat.completion")
    items = []
    for c in choices.values():
        msg = _message(c, plan, job.tools)
        items.append({"index": c.index, "message": msg,
                      "logprobs": chat_logprobs(lm.tokenizer, c.logprobs) if logprobs else None,
                      "finish_reason": _finish_reason(c.finish_reason, "tool_calls" in msg)})
    reasoning_tokens, reports = None, [c.report for c in choices.values()]
    if plan is not None:
        plan.record(metrics, lm.id, reports)
        reasoning_tokens = plan.reasoning_tokens(reports)
        if plan.self_consistency:
            winner, votes = plan.vote([item["message"]["content"] for item in items])
            metrics.reasoning_votes.labels(lm.id).inc(len(items))
            items = [{**items[winner], "index": 0}]
            out["reasoning_votes"] = votes
    out["choices"] = items
    out["usage"] = usage(prep.num_prompt_tokens, sum(c.num_generated for c in choices.values()), reasoning_tokens,
                         reports)
    out.update(job.response_fields)
    return out


async def chat_stream(prep: PreparedChat, stream, completion_id: str, created: int, include_usage: bool, metrics):
    job, lm = prep.job, prep.job.model
    plan, n = job.reasoning, prep.request.sampling.n

    def chunk(choices, usage_=None):
        c = {**_head(prep, completion_id, created, "chat.completion.chunk"), "choices": choices}
        if include_usage:
            c["usage"] = usage_
        return c

    def delta_chunk(idx, reasoning: str, content: str, lps=None, calls=()):
        delta = {}
        if reasoning:
            delta["reasoning_content"] = delta["reasoning"] = reasoning
        if content or not (reasoning or calls):
            delta["content"] = content
        if calls:
            delta["tool_calls"] = list(calls)
        return chunk([{"index": idx, "delta": delta, "logprobs": lps, "finish_reason": None}])

    splitters = [plan.splitter() if plan else None for _ in range(n)]
    parsers = [job.tools.parser() if job.tools else None for _ in range(n)]  # tool calls out of the answer
    for i in range(n):
        first = chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}])
        if i == 0:
            first.update(job.response_fields)
        yield first
    generated, reports = [0] * n, [None] * n
    async for idx, out in stream:
        generated[idx] = out.num_generated_tokens
        lps = chat_logprobs(lm.tokenizer, out.logprobs) if job.body.logprobs and out.logprobs else None
        reasoning, content = splitters[idx].feed(out.text) if splitters[idx] else ("", out.text)
        if out.finished and splitters[idx]:
            r2, c2 = splitters[idx].finish()
            reasoning, content = reasoning + r2, content + c2
        calls = []
        if parsers[idx]:
            content, calls = parsers[idx].feed(content)
            if out.finished:
                content += parsers[idx].finish()
        if reasoning or content or lps or calls:
            yield delta_chunk(idx, reasoning, content, lps, calls)
        if out.finished:
            reports[idx] = out.report
            reason = "length" if out.finish_reason.value == "length" else "stop"
            reason = _finish_reason(reason, bool(parsers[idx] and parsers[idx].num_calls))
            yield chunk([{"index": idx, "delta": {}, "logprobs": None, "finish_reason": reason}])
    reasoning_tokens = None
    if plan is not None:
        plan.record(metrics, lm.id, reports)
        reasoning_tokens = plan.reasoning_tokens(reports)
    if include_usage:
        yield chunk([], usage(prep.num_prompt_tokens, sum(generated), reasoning_tokens, reports))


async def replay(response: dict, include_usage: bool):
    """A finished response as stream chunks (reasoning, then answer, then finish and usage)."""
    base = {k: response[k] for k in ("id", "created", "model", "system_fingerprint")}
    base["object"] = "chat.completion.chunk"
    choice = response["choices"][0]
    msg = choice["message"]
    first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    if "citations" in response:
        first["citations"] = response["citations"]
    yield first
    if msg.get("reasoning_content"):
        yield {**base, "choices": [{"index": 0, "delta": {"reasoning_content": msg["reasoning_content"],
                                                          "reasoning": msg["reasoning_content"]},
                                    "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {"content": msg["content"]}, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}],
           "reasoning_votes": response.get("reasoning_votes")}
    if include_usage:
        yield {**base, "choices": [], "usage": response["usage"]}
