"""One output sequence's life, the same in every engine: sampling row, token controller, forced
tokens, stop checks and detokenized deltas.

An engine runs the model and samples a batch; for each row it calls `before_sample` (banned
tokens) and then `accept(sampled, logprob, logits_row)`, which applies forcing and controller
rewrites, appends the accepted token and returns the delta to publish. What a controller has to
report (reasoning tokens, forced closes...) rides on the sequence's final delta (`report`), so the
API never reads controller objects across threads.
"""

from __future__ import annotations

import collections

import torch

from service.engine.output_processor import SequenceOutput
from service.engine.sampler import SamplingRow, make_generator
from service.engine.speculative import SequenceSpeculation
from service.engine.types import FinishReason, GenerationRequest, RequestOutput, TokenLogprob


class SequenceState:
    def __init__(self, req: GenerationRequest, index: int, tokenizer, eos_token_ids, max_model_len: int,
                 device: torch.device, speculates: bool = False):
        """speculates: the engine verifies proposals (native); elsewhere `speculative` is ignored."""
        p = req.sampling
        self.out = SequenceOutput(req.request_id, index, p, tokenizer, eos_token_ids, len(req.prompt_token_ids),
                                  max_model_len)
        self.row = SamplingRow(p, make_generator(p.seed, index, device), self.out.token_ids,
                               list(req.prompt_token_ids), [])
        self.controller = req.controller_factory() if req.controller_factory else None
        self.forced: collections.deque[int] = collections.deque()
        self.prompt_lps: list[TokenLogprob | None] | None = None  # native: prompt logprobs being gathered
        spec = p.speculative
        self.spec = (SequenceSpeculation(spec.method, spec.num_tokens, spec.model)
                     if speculates and spec is not None and spec.enabled else None)

    @property
    def finished(self) -> bool:
        return self.out.finished

    @property
    def num_generated(self) -> int:
        return self.out.num_generated

    @property
    def last_token(self) -> int:
        return self.out.token_ids[-1]

    def before_sample(self) -> None:
        """Tokens the controller bans for the next draw (e.g. ending a thought below its minimum), and
        the tokens a grammar allows (structured output; `allowed_mask` is optional)."""
        c = self.controller
        self.row.banned_token_ids = c.banned_tokens(self.out.num_generated) if c is not None else []
        if c is not None and hasattr(c, "allowed_mask"):
            self.row.allowed_mask = c.allowed_mask(self.out.num_generated)

    def accept(self, sampled: int, lp: TokenLogprob | None, logits: torch.Tensor) -> RequestOutput | None:
        """The sampled token through forcing and the controller; returns the delta to publish (or None).
        logits: [V] of this row, to report the logprob of a token that replaced the sampled one."""
        tok = sampled
        if self.forced:
            tok = self.forced.popleft()
        elif self.controller is not None and hasattr(self.controller, "rewrite"):  # rewrite is optional
            replacement = self.controller.rewrite(tok, self.out.num_generated)
            tok = replacement[0]
            self.forced.extend(replacement[1:])
        if not 0 <= tok < logits.shape[-1]:  # a forced id past the vocabulary would fail the next forward for all
            raise ValueError(f"token id {tok} is outside the vocabulary [0, {logits.shape[-1]})")
        if lp is not None and lp.token_id != tok:
            lp = TokenLogprob(tok, float(torch.log_softmax(logits.float(), -1)[tok]), lp.top)
        delta = self.out.append(tok, lp)
        c = self.controller
        if c is not None and not self.out.finished:
            self.forced.extend(c.on_token(tok, self.out.num_generated))
            if hasattr(c, "generation_limit"):  # optional: a lower limit on the generated tokens
                limit = c.generation_limit(self.out.params.max_tokens)
                if limit is not None:
                    self.out.max_tokens = min(self.out.max_tokens, max(limit, self.out.num_generated + 1))
        return self._with_report(delta)

    def set_prompt_logprobs(self, values: list[TokenLogprob | None]) -> None:
        self.out.set_prompt_logprobs(values)

    def finish_prompt_only(self) -> RequestOutput:
        """max_tokens 0 (echo the prompt and its logprobs): done after the prefill, nothing generated."""
        return self._with_report(self.out.finish_prompt_only())

    def abort(self, reason: FinishReason = FinishReason.ABORT, error: str | None = None) -> RequestOutput:
        return self._with_report(self.out.abort(reason, error))

    def _with_report(self, delta: RequestOutput | None) -> RequestOutput | None:
        if delta is None or not delta.finished:
            return delta
        report = {}
        if self.controller is not None and hasattr(self.controller, "report"):
            report.update(self.controller.report())
        if self.spec is not None:
            report.update(self.spec.report())
        delta.report = report or None
        return delta
