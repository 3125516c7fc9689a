"""POST /v1/chat/completions, plain or in reasoning mode (thinking split from the answer)."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request

from service.api.deps import resolve_model, state
from service.api.errors import APIError
from service.api.generation import (Choice, admit, check_context, check_sequences, check_token_ids, collect, indexed,
                                    run_request, sampling_params, usage)
from service.api.logprobs import chat_logprobs
from service.api.schemas.openai import ChatCompletionRequest
from service.api.streaming import sse_response
from service.engine.types import GenerationRequest
from service.pool.manifest import Task
from service.rag.grounding import ground
from service.reasoning.controller import ThinkingFormat
from service.reasoning.params import parse_reasoning
from service.reasoning.plan import ReasoningPlan

router = APIRouter()


def render_chat(tokenizer, messages: list[dict], model_id: str, **template_kwargs) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model {model_id!r} has no chat template; use /v1/completions",
                       param="model", code="no_chat_template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    except Exception as exc:  # templates raise on unsupported role orders etc.
        raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from None


async def _encode(tokenizer, text: str) -> list[int]:
    return await asyncio.to_thread(lambda: tokenizer.encode(text, add_special_tokens=False))


def _reasoning_plan(body, lm, prompt_len: int) -> ReasoningPlan | None:
    cfg = lm.manifest.reasoning
    params = parse_reasoning(body, cfg.efforts, lm.max_model_len, prompt_len)
    if params is None:
        return None
    if params.strategy == "self_consistency" and body.n != 1:
        raise APIError(400, "'n' must be 1 with strategy 'self_consistency' (use reasoning.samples)", param="n")
    return ReasoningPlan(params, ThinkingFormat.from_manifest(cfg), lm.tokenizer, lm.engine.eos_token_ids)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = state(request)
    lm = await resolve_model(request, body.model, (Task.CHAT, Task.VISION_CHAT, Task.COMPLETION),
                             st.settings.default_chat_model)
    if body.tools:
        raise APIError(400, "tool calling is not supported yet", param="tools", code="unsupported")
    if any(m.has_images() for m in body.messages) and lm.manifest.task != Task.VISION_CHAT:
        raise APIError(400, f"model {lm.id!r} does not accept images", param="messages",
                       code="images_not_supported")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    citations = None
    if body.rag is not None:  # RAG: numbered sources as the first (system) message, citations beside the answer
        messages, citations = await ground(st.rag, body.rag, messages, lm.tokenizer,
                                           lambda msgs: render_chat(lm.tokenizer, msgs, lm.id), lm.max_model_len,
                                           body.max_completion_tokens or body.max_tokens,
                                           st.settings.max_tokens_default)
    prompt = await asyncio.to_thread(render_chat, lm.tokenizer, messages, lm.id)
    prompt_ids = await _encode(lm.tokenizer, prompt)
    plan = _reasoning_plan(body, lm, len(prompt_ids))
    if plan is not None:
        prompt = await asyncio.to_thread(render_chat, lm.tokenizer, plan.messages(messages), lm.id,
                                         **plan.template_kwargs())
        prompt += plan.prompt_suffix(prompt)
        prompt_ids = await _encode(lm.tokenizer, prompt)
    max_tokens = body.max_completion_tokens or body.max_tokens
    check_context(len(prompt_ids), max_tokens, lm.max_model_len, "messages")
    check_token_ids(body, len(lm.tokenizer))
    params = sampling_params(body, max_tokens, len(prompt_ids), lm.max_model_len, st.settings.max_tokens_default,
                             body.logprobs, body.top_logprobs or 0, lm.manifest.defaults)
    if plan is not None:
        # max_tokens bounds the answer; the thinking budget comes on top of it.
        total = min(params.max_tokens + plan.params.max_tokens, lm.max_model_len - len(prompt_ids))
        changes = {"max_tokens": total}
        if plan.self_consistency:
            changes["n"] = plan.params.samples
            if body.temperature is None:
                changes["temperature"] = 0.7  # diverse paths: the point of voting
        params = params.__class__(**{**params.__dict__, **changes})
    check_sequences(1, params.n, st.settings.max_sequences_per_request)  # n, or reasoning.samples
    greq = GenerationRequest(prompt_token_ids=prompt_ids, sampling=params,
                             controller_factory=plan.controller_factory() if plan else None)
    admit(lm.engine, [greq])  # 429 / 400 before the first response byte, streamed or not
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stream = indexed(run_request(lm.engine, greq, st.metrics, lm.id, st.settings.request_timeout_s), 0)
    meta = dict(lm=lm, completion_id=completion_id, created=created, num_prompt=len(prompt_ids),
                logprobs=body.logprobs, plan=plan, citations=citations)
    if body.stream and not (plan and plan.self_consistency):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(stream, params.n, include_usage, **meta))
    choices = {i: Choice(i) for i in range(params.n)}
    await collect(request, stream, choices)
    response = _response(choices, **meta, st=st)
    if body.stream:  # self-consistency: the winner is known only after the vote
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_replay(response, include_usage))
    return response


def _message(c: Choice, plan: ReasoningPlan | None) -> dict:
    if plan is None:
        return {"role": "assistant", "content": c.text}
    splitter = plan.splitter()
    splitter.feed(c.text)
    splitter.finish()
    return {"role": "assistant", "content": splitter.content, "reasoning_content": splitter.reasoning,
            "reasoning": splitter.reasoning}


def _response(choices, lm, completion_id, created, num_prompt, logprobs, plan, st, citations=None) -> dict:
    completion_tokens = sum(c.num_generated for c in choices.values())
    out = {"id": completion_id, "object": "chat.completion", "created": created, "model": lm.id,
           "system_fingerprint": f"frontier-{lm.engine_kind}"}
    items = [{"index": c.index, "message": _message(c, plan),
              "logprobs": chat_logprobs(lm.tokenizer, c.logprobs) if logprobs else None,
              "finish_reason": c.finish_reason} for c in choices.values()]
    reasoning_tokens = None
    if plan is not None:
        plan.record(st.metrics, lm.id)
        reasoning_tokens = plan.reasoning_tokens()
        if plan.self_consistency:
            winner, votes = plan.vote([item["message"]["content"] for item in items])
            st.metrics.reasoning_votes.labels(lm.id).inc(len(items))
            items = [{**items[winner], "index": 0}]
            out["reasoning_votes"] = votes
    out["choices"] = items
    out["usage"] = usage(num_prompt, completion_tokens, reasoning_tokens)
    if citations is not None:
        out["citations"] = citations
    return out


async def _stream(stream, n, include_usage, lm, completion_id, created, num_prompt, logprobs, plan, citations=None):
    def chunk(choices, usage_=None):
        c = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": lm.id,
             "system_fingerprint": f"frontier-{lm.engine_kind}", "choices": choices}
        if include_usage:
            c["usage"] = usage_
        return c

    def delta_chunk(idx, reasoning: str, content: str, lps=None):
        delta = {}
        if reasoning:
            delta["reasoning_content"] = delta["reasoning"] = reasoning
        if content or not reasoning:
            delta["content"] = content
        return chunk([{"index": idx, "delta": delta, "logprobs": lps, "finish_reason": None}])

    splitters = [plan.splitter() if plan else None for _ in range(n)]
    for i in range(n):
        first = chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}])
        if citations is not None and i == 0:
            first["citations"] = citations
        yield first
    generated = [0] * n
    async for idx, out in stream:
        generated[idx] = out.num_generated_tokens
        lps = chat_logprobs(lm.tokenizer, out.logprobs) if logprobs and out.logprobs else None
        reasoning, content = splitters[idx].feed(out.text) if splitters[idx] else ("", out.text)
        if out.finished and splitters[idx]:
            r2, c2 = splitters[idx].finish()
            reasoning, content = reasoning + r2, content + c2
        if reasoning or content or lps:
            yield delta_chunk(idx, reasoning, content, lps)
        if out.finished:
            reason = "length" if out.finish_reason.value == "length" else "stop"
            yield chunk([{"index": idx, "delta": {}, "logprobs": None, "finish_reason": reason}])
    if include_usage:
        yield chunk([], usage(num_prompt, sum(generated), plan.reasoning_tokens() if plan else None))


async def _replay(response: dict, include_usage: bool):
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
