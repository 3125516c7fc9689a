"""The generic transformers backend: any AutoModelForCausalLM, one request at a time.

Simple and slow next to the native engine, but it serves every architecture transformers knows.
Requests are served in arrival order; the n sequences of one request run as one batch (same
prompt, so no padding). Each `_step` is one forward, so aborts take effect within a token, and
whatever a step raises is the active request's failure alone: the requests waiting behind it are
served next. Vision-language models (AutoModelForImageTextToText) take a request's images as
processor outputs (GenerationRequest.multimodal.processor_inputs), given to its prefill only, which
then runs once at batch 1 and is repeated n times in the cache (service/engine/hf_vision.py).
Loading: service/engine/loading.py `load_hf_engine`, `load_hf_vision_engine`.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from service.engine import hf_vision
from service.engine.config import EngineConfig
from service.engine.output_processor import token_logprobs
from service.engine.sampler import sample
from service.engine.sequence import SequenceState
from service.engine.threaded import ThreadedEngine
from service.engine.types import (
    FinishReason, GenerationRequest, RequestOutput, RequestTooLarge, TokenLogprob,
)

log = logging.getLogger(__name__)


@dataclass
class _Active:
    req: GenerationRequest
    seqs: list[SequenceState]
    cache: object | None = None
    next_input: torch.Tensor | None = None  # [n, t] ([1, T] for an image prefill)
    prefill_kwargs: dict[str, Any] | None = None  # images: the prefill's processor outputs
    decode_kwargs: dict[str, Any] | None = None  # images: what every decode step gets (Mllama's mask row)


class HFEngine(ThreadedEngine):
    name = "hf"

    def __init__(self, model, tokenizer, eos_token_ids: Iterable[int], config: EngineConfig | None = None,
                 kernels: dict[str, Any] | None = None):
        """eos_token_ids: every id that ends a sequence (service/engine/loading.py resolves them).
        Of the config, this backend reads max_model_len and max_waiting (no paged KV, no batching)."""
        super().__init__()
        self.config = config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos_token_ids = frozenset(eos_token_ids)
        limits = [x for x in (hf_vision.max_positions(model), config.max_model_len) if x]
        self.max_model_len = min(limits) if limits else 2048
        self.max_waiting = config.max_waiting
        self.kernels = kernels or {"backend": "transformers", "dtype": str(self.dtype).removeprefix("torch.")}
        self._vocab_bound = hf_vision.token_id_bound(model)
        self._rope_state = hf_vision.rope_state_modules(model)  # cleared before every prefill
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._num_waiting_seqs = 0  # sequences of _waiting (written by the worker, read by admission)
        self._active: _Active | None = None
        self.num_steps = 0

    def _validate(self, req: GenerationRequest, num_ahead: int = 0) -> None:
        n = len(req.prompt_token_ids)
        if n + 1 > self.max_model_len:
            raise RequestTooLarge(
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"the prompt has {n} tokens."
            )
        vocab = self._vocab_bound
        if vocab and n and (min(req.prompt_token_ids) < 0 or max(req.prompt_token_ids) >= vocab):
            raise RequestTooLarge(f"The prompt contains a token id outside the vocabulary [0, {vocab}).")
        self._check_queue(self._num_waiting_seqs, req, num_ahead)

    def stats(self) -> dict[str, float]:
        return {
            "num_requests_running": 1.0 if self._active else 0.0,
            "num_requests_waiting": float(len(self._waiting)),
        }

    def _add(self, req: GenerationRequest) -> None:
        self._waiting.append(req)
        self._num_waiting_seqs += req.sampling.n

    def _has_work(self) -> bool:
        return self._active is not None or bool(self._waiting)

    def _request_ids(self) -> set[str]:
        active = [self._active.req.request_id] if self._active is not None else []
        return {*active, *(r.request_id for r in self._waiting)}

    def _drop(self, request_id: str) -> list[RequestOutput]:
        for req in list(self._waiting):
            if req.request_id == request_id:
                self._waiting.remove(req)
                self._num_waiting_seqs -= req.sampling.n
                # Not started: no sequence state (nor controller, whose factory may raise) to build.
                return [RequestOutput(request_id, i, "", [], finished=True, finish_reason=FinishReason.ABORT,
                                      num_prompt_tokens=len(req.prompt_token_ids)) for i in range(req.sampling.n)]
        if self._active and self._active.req.request_id == request_id:
            outs = [s.abort() for s in self._active.seqs if not s.finished]
            self._active = None
            return outs
        return []

    def _states(self, req: GenerationRequest) -> list[SequenceState]:
        return [SequenceState(req, i, self.tokenizer, self.eos_token_ids, self.max_model_len, self.device)
                for i in range(req.sampling.n)]

    def _begin(self, req: GenerationRequest) -> _Active:
        hf_vision.clear_rope_state(self._rope_state)
        mm = req.multimodal
        if mm is not None and mm.processor_inputs is None and mm.embeds:
            raise ValueError("this engine (transformers backend) takes images as processor inputs, not embeddings")
        if mm is None or not mm.processor_inputs:
            ids = torch.tensor([req.prompt_token_ids] * req.sampling.n, device=self.device)
            return _Active(req, self._states(req), None, ids)
        # Images: one batch-1 prefill with the processor outputs, its cache then repeated n times.
        prefill = hf_vision.prefill_kwargs(mm.processor_inputs, self.device, self.dtype)
        ids = torch.tensor([req.prompt_token_ids], device=self.device)  # [1, T]
        return _Active(req, self._states(req), None, ids, prefill, hf_vision.decode_kwargs(prefill, req.sampling.n))

    def _step(self) -> list[RequestOutput]:
        # One request per step: whatever raises here is that request's failure alone.
        if self._active is None:
            req = self._waiting.popleft()
            self._num_waiting_seqs -= req.sampling.n
            try:
                self._active = self._begin(req)
            except Exception as exc:
                log.exception("hf: could not start request %s", req.request_id)
                return self._fail_request(req.request_id, str(exc), req.sampling.n)
        try:
            return self._advance(self._active)
        except Exception as exc:
            log.exception("hf: step failed for request %s", self._active.req.request_id)
            return self._fail_request(self._active.req.request_id, str(exc))

    def _advance(self, act: _Active) -> list[RequestOutput]:
        for s in act.seqs:
            s.before_sample()
        p = act.req.sampling
        # Prompt logprobs need the logits of every prompt position; otherwise only the last
        # position's (logits_to_keep=1: a prefill would otherwise build [n, T, V]).
        prefill = act.cache is None
        every = prefill and p.prompt_logprobs is not None and act.next_input.shape[1] > 1
        if prefill and p.prompt_logprobs is not None and not every:  # a one-token prompt: [None]
            self._set_prompt_logprobs(act, None)
        if prefill and p.max_tokens == 0 and not every:  # nothing to compute
            return self._prompt_only(act)
        images = (act.prefill_kwargs if prefill else act.decode_kwargs) or {}
        result = self.model(input_ids=act.next_input, cache=act.cache, use_cache=True,
                            logits_to_keep=0 if every else 1, **images)
        act.cache = result.cache
        if every:
            self._set_prompt_logprobs(act, result.logits)
        if p.max_tokens == 0:
            return self._prompt_only(act)
        logits = result.logits[:, -1, :]  # [n, V] ([1, V] after an image prefill)
        if logits.shape[0] != len(act.seqs):  # the image prefill ran once for the n sequences
            hf_vision.expand_cache(act.cache, len(act.seqs))
            logits = logits.repeat(len(act.seqs), 1)  # [n, V]
        act.prefill_kwargs = None  # the pixels are in the cache now
        token_ids, logprobs = sample(logits, [s.row for s in act.seqs])
        token_list = token_ids.tolist()
        outputs: list[RequestOutput] = []
        for i, s in enumerate(act.seqs):
            if s.finished:
                continue
            delta = s.accept(token_list[i], logprobs[i] if logprobs else None, logits[i])
            token_list[i] = s.last_token
            if delta is not None:
                outputs.append(delta)
        self.num_steps += 1
        act.next_input = torch.tensor(token_list, device=self.device).unsqueeze(1)
        if all(s.out.finished for s in act.seqs):
            self._active = None
        return outputs

    def _set_prompt_logprobs(self, act: _Active, logits: torch.Tensor | None) -> None:
        """After the prefill: logits [n, T, V] of every prompt position (None: a one-token prompt)."""
        k = act.req.sampling.prompt_logprobs
        values: list[TokenLogprob | None] = [None]
        if logits is not None:  # row 0: the n rows share the prompt; position t predicts token t + 1
            values += token_logprobs(logits[0, :-1], act.next_input[0, 1:], k)
        for s in act.seqs:
            s.set_prompt_logprobs(values)

    def _prompt_only(self, act: _Active) -> list[RequestOutput]:
        """max_tokens 0 (echo the prompt and its logprobs): done after the prefill, nothing sampled."""
        self._active = None
        return [s.finish_prompt_only() for s in act.seqs]

