"""The generic transformers backend: any AutoModelForCausalLM, one request at a time.

Simple and slow next to the native engine, but it serves every architecture transformers knows.
Requests are served in arrival order; the n sequences of one request run as one batch (same
prompt, so no padding). Each `_step` is one forward, so aborts take effect within a token, and
whatever a step raises is the active request's failure alone: the requests waiting behind it are
served next. Loading: service/engine/loading.py `load_hf_engine`.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch

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
    next_input: torch.Tensor | None = None  # [n, t]


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
        self.eos_token_ids = frozenset(eos_token_ids)
        limits = [x for x in (getattr(getattr(model, "config", None), "max_position_embeddings", None),
                              config.max_model_len) if x]
        self.max_model_len = min(limits) if limits else 2048
        self.max_waiting = config.max_waiting
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.kernels = kernels or {"backend": "transformers", "dtype": dtype}
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
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
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
        ids = torch.tensor([req.prompt_token_ids] * req.sampling.n, device=self.device)
        return _Active(req, self._states(req), None, ids)

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
        result = self.model(input_ids=act.next_input, cache=act.cache, use_cache=True, logits_to_keep=0 if every else 1)
        act.cache = result.cache
        if every:
            self._set_prompt_logprobs(act, result.logits)
        if p.max_tokens == 0:
            return self._prompt_only(act)
        logits = result.logits[:, -1, :]  # [n, V]
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

