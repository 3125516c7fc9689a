"""Per-sequence postprocessing shared by every engine: stop conditions, stop strings, deltas.

The engine hands each accepted token to `SequenceOutput.append`; it returns the delta to stream
(text that can no longer turn out to be part of a stop string) and whether the sequence is done.
"""

from __future__ import annotations

import torch

from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.types import FinishReason, RequestOutput, SamplingParams, TokenLogprob


class SequenceOutput:
    def __init__(
        self,
        request_id: str,
        index: int,
        params: SamplingParams,
        tokenizer,
        eos_token_ids: set[int],
        num_prompt_tokens: int,
        max_model_len: int,
    ):
        self.request_id = request_id
        self.index = index
        self.params = params
        self.eos_token_ids = set() if params.ignore_eos else set(eos_token_ids)
        self.stop_token_ids = set(params.stop_token_ids)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.num_prompt_tokens = num_prompt_tokens
        self.max_model_len = max_model_len
        # Generated tokens allowed: max_tokens, lowered by a token controller (a reasoning request's
        # answer is bounded on its own once the thought has closed).
        self.max_tokens = params.max_tokens
        self.token_ids: list[int] = []
        self.text = ""  # all text decoded so far (stop strings cut off)
        self.num_emitted_chars = 0
        self.finished = False
        self.finish_reason: FinishReason | None = None
        self._pending_ids: list[int] = []
        self._pending_logprobs: list[TokenLogprob] = []
        self._prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, then None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids)

    def append(self, token_id: int, logprob: TokenLogprob | None = None) -> RequestOutput | None:
        """Accept one generated token. Returns a delta to stream, or None when nothing is new."""
        assert not self.finished, "token appended to a finished sequence"
        self.token_ids.append(token_id)
        self._pending_ids.append(token_id)
        if logprob is not None:
            self._pending_logprobs.append(logprob)
        if token_id in self.eos_token_ids or token_id in self.stop_token_ids:
            self._finish(FinishReason.STOP)
        else:
            self.text += self.detok.push(token_id)
            if self.params.stop and self._cut_at_stop_string():
                self._finish(FinishReason.STOP)
            elif self.num_generated >= self.max_tokens:
                self._finish(FinishReason.LENGTH)
            elif self.num_prompt_tokens + self.num_generated >= self.max_model_len:
                self._finish(FinishReason.LENGTH)
        return self._delta()

    def set_prompt_logprobs(self, values: list[TokenLogprob | None]) -> None:
        """The prompt's logprobs (first entry None): they ride on the next delta, once."""
        self._prompt_logprobs = values

    def finish_prompt_only(self) -> RequestOutput:
        """max_tokens 0 (echo the prompt with its logprobs): done after the prefill, nothing generated."""
        self._finish(FinishReason.LENGTH)
        return self._delta(force=True)

    def abort(self, reason: FinishReason = FinishReason.ABORT, error: str | None = None) -> RequestOutput:
        self.finished, self.finish_reason = True, reason
        out = self._delta(force=True)
        out.error = error
        return out

    def _finish(self, reason: FinishReason) -> None:
        if reason == FinishReason.LENGTH:
            # The flush may complete a character that completes a stop string: then it is a stop.
            self.text += self.detok.flush()
            if self.params.stop and self._cut_at_stop_string():
                reason = FinishReason.STOP
        self.finished, self.finish_reason = True, reason

    def _cut_at_stop_string(self) -> bool:
        # Only the tail can hold a new match: text before num_emitted_chars was already checked.
        longest = max(len(s) for s in self.params.stop)
        start = max(0, self.num_emitted_chars - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def _holdback(self) -> int:
        """Characters at the end of the text that could still begin a stop string."""
        if not self.params.stop or self.finished:
            return 0
        for k in range(min(max(len(s) for s in self.params.stop) - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.params.stop):
                return k
        return 0

    def _delta(self, force: bool = False) -> RequestOutput | None:
        end = len(self.text) - self._holdback()
        new_text = self.text[self.num_emitted_chars : end] if end > self.num_emitted_chars else ""
        if not (new_text or self.finished or force or self._pending_logprobs or self._prompt_logprobs is not None):
            return None
        self.num_emitted_chars = max(self.num_emitted_chars, end)
        out = RequestOutput(
            request_id=self.request_id,
            index=self.index,
            text=new_text,
            token_ids=self._pending_ids,
            logprobs=self._pending_logprobs if self.params.logprobs else None,
            prompt_logprobs=self._prompt_logprobs,
            finished=self.finished,
            finish_reason=self.finish_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generated_tokens=self.num_generated,
        )
        self._pending_ids, self._pending_logprobs, self._prompt_logprobs = [], [], None
        return out


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Logprob of each target token under its row's distribution, plus the top-k alternatives.
    logits: [T, V] (any float dtype; computed in float32); targets: [T] token ids."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    chosen = lp.gather(1, targets.view(-1, 1)).squeeze(1).tolist()
    ids = targets.tolist()
    if k <= 0:
        return [TokenLogprob(t, v) for t, v in zip(ids, chosen)]
    top_vals, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return [TokenLogprob(t, v, list(zip(ti, tv)))
            for t, v, ti, tv in zip(ids, chosen, top_ids.tolist(), top_vals.tolist())]
