"""The native engine: continuous batching over a paged KV cache for Llama-family models.

`_step` reads schedule -> run -> sample -> postprocess. The n sequences of a request are separate
scheduler sequences that share their prompt blocks through the prefix cache (the first computes
the prompt; the others start once it is cached). Per-sequence state (sampling row with its seeded
generator, output processor, token controller) lives in `Sequence.payload`, never in the engine.
Options come in one `EngineConfig`; loading a checkpoint (quantization, EOS ids) is
service/engine/loading.py. A step that raises past the per-row isolation ends every request the
engine holds with an error (ThreadedEngine._fail_all); the engine then serves new requests.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

import torch

from service.engine.config import MAX_SPECULATIVE_TOKENS, EngineConfig
from service.engine.draft import DraftModel
from service.engine.kv_cache import BlockManager, kv_bytes_per_block
from service.engine.output_processor import token_logprobs
from service.engine.runner import ModelRunner
from service.engine.sampler import sample
from service.engine.scheduler import ImageSpan, Scheduler, SchedulerConfig, Sequence
from service.engine.sequence import SequenceState
from service.engine.spec_step import Speculation
from service.engine.threaded import ThreadedEngine
from service.engine.types import (
    GenerationRequest, RequestOutput, RequestTooLarge, TokenLogprob,
)

log = logging.getLogger(__name__)


class NativeEngine(ThreadedEngine):
    name = "native"

    def __init__(self, model, tokenizer, eos_token_ids: Iterable[int], config: EngineConfig | None = None,
                 kernels: dict[str, Any] | None = None):
        """model: a service/modeling LlamaForCausalLM (weights already quantized, if at all);
        eos_token_ids: every id that ends a sequence (service/engine/loading.py resolves them);
        kernels: what the loader chose, for the model card."""
        super().__init__()
        self.config = config = config or EngineConfig()
        cfg = model.config
        self.model, self.tokenizer, self.eos_token_ids = model, tokenizer, frozenset(eos_token_ids)
        self.runner_dtype = model.model.embed_tokens.weight.dtype
        self.kernels = kernels or {"quantization": "none", "dtype": str(self.runner_dtype).removeprefix("torch.")}
        bs = config.block_size
        per_block = kv_bytes_per_block(cfg.num_layers, bs, cfg.num_kv_heads, cfg.head_dim, self.runner_dtype)
        self.kv_cache_bytes = config.kv_cache_bytes
        num_blocks = self.kv_cache_bytes // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={self.kv_cache_bytes} is below one KV block ({per_block} bytes)")
        self.kv_capacity_tokens = num_blocks * bs
        self.model_len_limit = min(cfg.max_position_embeddings, config.max_model_len or cfg.max_position_embeddings)
        self.max_model_len = min(self.model_len_limit, self.kv_capacity_tokens)
        self.max_waiting = config.max_waiting
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            config.max_num_seqs, max(config.max_num_batched_tokens, config.max_num_seqs)), self.block_manager)
        self.runner = ModelRunner(model, num_blocks, bs)
        self.device = self.runner.device
        self.speculation = Speculation(config.spec_max_batch)
        self.runner.row_exact_max = config.spec_max_batch  # verify rows compute as plain decode rows
        self._num_requests = 0  # requests added and not finished (worker thread only)
        self._stats: dict[str, float] = {}
        self.num_steps = 0
        self._update_stats(0.0, 0, 0)

    def attach_draft(self, model_id: str, model) -> None:
        """Make `model` (a service/modeling model of this engine's tokenizer, on its device) available
        to requests with speculative method "draft" and model `model_id`. Any thread: the worker
        reads the dict entry only for requests admitted after this returns."""
        c = self.config
        self.speculation.drafts[model_id] = DraftModel.for_target(
            model_id, model, self.kv_capacity_tokens, c.max_num_seqs, c.block_size, MAX_SPECULATIVE_TOKENS,
            max(c.max_num_batched_tokens, c.max_num_seqs))

    # ---- admission (event loop thread) ----
    def _validate(self, req: GenerationRequest, num_ahead: int = 0) -> None:
        n = len(req.prompt_token_ids)
        if n == 0:
            raise RequestTooLarge("The prompt is empty; at least one token is required.")
        if n + 1 > self.max_model_len:
            why = (f"the KV cache holds {self.kv_capacity_tokens} tokens (kv_cache_bytes={self.kv_cache_bytes})"
                   if self.max_model_len < self.model_len_limit else
                   f"this model's maximum context length is {self.max_model_len} tokens")
            raise RequestTooLarge(f"The prompt has {n} tokens and cannot fit: {why}; at least 1 token must be generated.")
        vocab = self.model.config.vocab_size
        if min(req.prompt_token_ids) < 0 or max(req.prompt_token_ids) >= vocab:
            raise RequestTooLarge(f"The prompt contains a token id outside the vocabulary [0, {vocab}).")
        mm = req.multimodal
        if mm is not None and (mm.processor_inputs or not (len(mm.spans) == len(mm.embeds) == len(mm.digests))
                               or any(s < 0 or s + k > n or tuple(e.shape) != (k, self.model.config.hidden_size)
                                      for (s, k), e in zip(mm.spans, mm.embeds))):
            raise RequestTooLarge("The request's images do not fit this engine (early fusion: one span of "
                                  "placeholder positions and one row per position for each image).")
        self._check_queue(self.scheduler.num_waiting, req, num_ahead)

    # ---- worker thread hooks ----
    def _add(self, req: GenerationRequest) -> None:
        p, prompt = req.sampling, list(req.prompt_token_ids)
        mm = req.multimodal
        images = [ImageSpan(start, length, digest, rows) for (start, length), digest, rows
                  in zip(mm.spans, mm.digests, mm.embeds)] if mm is not None else []
        seqs = []
        for i in range(p.n):
            state = SequenceState(req, i, self.tokenizer, self.eos_token_ids, self.max_model_len, self.device,
                                  speculates=True)
            seqs.append(Sequence(req.request_id, i, list(prompt), len(prompt), payload=state, images=images))
        if p.prompt_logprobs is not None:  # sequence 0 computes them (no cache reads); the others get a copy
            seqs[0].payload.prompt_lps = [None] * len(prompt)
            if len(prompt) > 1:
                seqs[0].prompt_logprobs = p.prompt_logprobs
            else:
                for s in seqs:
                    s.payload.set_prompt_logprobs(seqs[0].payload.prompt_lps)
        self.scheduler.add(seqs)
        self._num_requests += 1

    def _drop(self, request_id: str) -> list[RequestOutput]:
        seqs = self.scheduler.abort(request_id)
        for s in seqs:
            self.speculation.release(s)
        outs = [s.payload.abort() for s in seqs if not s.payload.finished]
        if seqs:
            self._num_requests -= 1
            self._refresh_queue_stats()  # an abort may leave the engine idle: no step will refresh them
        return outs

    def _refresh_queue_stats(self) -> None:
        running = {s.request_id for s in self.scheduler.running}
        self._stats = {**self._stats, "num_requests_running": float(len(running)),
                       "num_requests_waiting": float(max(0, self._num_requests - len(running))),
                       "kv_cache_usage_perc": self.block_manager.usage}

    def _has_work(self) -> bool:
        return self.scheduler.has_work()

    def _request_ids(self) -> set[str]:
        return {s.request_id for s in (*self.scheduler.running, *self.scheduler.waiting)}

    def _after_failed_step(self) -> None:
        self.runner.prompt_logits = []  # a step that raised may have left them for sequences now gone
        self._refresh_queue_stats()

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        self.speculation.propose(self.scheduler)  # propose
        batch = self.scheduler.schedule()  # schedule
        if not batch:
            return []
        samplers, logits = self.runner.run(batch)  # run
        self.scheduler.on_step_done(batch)
        if self.runner.prompt_logits:
            self._record_prompt_logprobs()
        samplers, logits, verifying = self.speculation.split(samplers, logits)
        outputs = []
        if samplers:
            samplers, logits, outputs = self._finish_prompt_only(samplers, logits)
        if samplers:
            outputs += self._sample_and_process(samplers, logits)
        if verifying:  # speculating sequences: their k + 1 rows, token by token
            outputs += self.speculation.verify(verifying, self)
        self.num_steps += 1
        self._update_stats(time.perf_counter() - t0, len(batch), sum(it.num_tokens for it in batch))
        return outputs

    def _record_prompt_logprobs(self) -> None:
        """This step's prompt-position logits into logprobs; a finished prompt's list goes to every
        sequence of its request (each sends it on its first delta)."""
        for it, logits in self.runner.prompt_logits:  # logits: [m, V], row j = position it.start + j
            seq, st = it.seq, it.seq.payload
            first, end = it.start + 1, it.start + 1 + logits.shape[0]  # prompt tokens these rows predict
            targets = torch.tensor(seq.token_ids[first:end], device=logits.device)
            st.prompt_lps[first:end] = token_logprobs(logits, targets, seq.prompt_logprobs)
            if end >= seq.num_prompt_tokens:
                seq.prompt_logprobs = None  # done: a recompute after preemption may read the cache again
                for s in (seq, *seq.siblings):
                    s.payload.set_prompt_logprobs(st.prompt_lps)
        self.runner.prompt_logits = []

    def _finish_prompt_only(self, samplers, logits: torch.Tensor):
        """max_tokens 0 (echo the prompt and its logprobs): such a sequence ends at its prefill,
        unsampled. Returns the other rows and their logits, and the final outputs."""
        keep = [i for i, it in enumerate(samplers) if it.seq.payload.out.params.max_tokens > 0]
        if len(keep) == len(samplers):
            return samplers, logits, []
        outputs = []
        for it in samplers:
            seq = it.seq
            if seq.payload.out.params.max_tokens == 0:
                delta = seq.payload.finish_prompt_only()
                delta.num_cached_tokens = seq.num_cached_tokens
                outputs.append(delta)
                self._release(seq)
        return [samplers[i] for i in keep], logits[keep], outputs

    def _sample_and_process(self, samplers, logits: torch.Tensor) -> list[RequestOutput]:
        # A row that raises (its sampling, its controller) fails its own request; the batch goes on.
        failed: dict[str, str] = {}  # request id -> error
        for it in samplers:  # controllers may ban tokens for this sample (e.g. end-of-thinking too early)
            try:
                it.seq.payload.before_sample()
            except Exception as exc:
                failed.setdefault(it.seq.request_id, str(exc))
        live = [i for i, it in enumerate(samplers) if it.seq.request_id not in failed]
        outputs: list[RequestOutput] = []
        for i, (tok, lp) in self._sample(logits, samplers, live, failed).items():  # sample
            if samplers[i].seq.request_id in failed:  # a sibling failed earlier in this step
                continue
            try:
                delta = self._accept(samplers[i].seq, tok, lp, logits[i])  # postprocess
            except Exception as exc:
                failed.setdefault(samplers[i].seq.request_id, str(exc))
                continue
            if delta is not None:
                outputs.append(delta)
        for rid, message in failed.items():
            log.error("request %s failed in a step: %s", rid, message)
            outputs.extend(self._fail_request(rid, message))
        return outputs

    def _sample(self, logits, samplers, live: list[int], failed: dict[str, str]) -> dict[int, tuple]:
        """{row: (token id, logprob or None)} for the live rows. If the batched draw raises, each row
        draws alone, so that only the rows that raise fail. (A seeded neighbour may then draw from
        a generator the failed batch already advanced: a rare path, traded for isolation.)"""
        if not live:
            return {}
        rows = [samplers[i].seq.payload.row for i in live]
        try:
            tokens, lps = sample(logits if len(live) == len(samplers) else logits[live], rows)
            return {i: (tok, lps[k] if lps else None) for k, (i, tok) in enumerate(zip(live, tokens.tolist()))}
        except Exception:
            log.warning("batched sampling failed; sampling the %d rows one by one", len(live), exc_info=True)
        picks = {}
        for i, row in zip(live, rows):
            try:
                tokens, lps = sample(logits[i : i + 1], [row])
                picks[i] = (int(tokens[0]), lps[0] if lps else None)
            except Exception as exc:
                failed.setdefault(samplers[i].seq.request_id, str(exc))
        return picks

    def _accept(self, seq: Sequence, tok: int, lp: TokenLogprob | None, logits: torch.Tensor) -> RequestOutput | None:
        """One sampled token through the sequence's state machine. logits: [V] of this row."""
        st: SequenceState = seq.payload
        delta = st.accept(tok, lp, logits)
        seq.token_ids.append(st.last_token)
        if delta is not None:
            delta.num_cached_tokens = seq.num_cached_tokens
        if st.finished:
            self._release(seq)
        return delta

    def _release(self, seq: Sequence) -> None:
        """A finished sequence gives back its blocks; the last of its request ends the request."""
        self.scheduler.finish(seq)
        self.speculation.release(seq)
        if all(s.payload.finished for s in seq.siblings):
            self._num_requests -= 1

    # ---- stats (read from any thread: the worker swaps in a fresh dict) ----
    def _update_stats(self, step_s: float, batch_size: int, num_tokens: int) -> None:
        running = {s.request_id for s in self.scheduler.running}
        bm = self.block_manager
        self._stats = {
            "num_requests_running": float(len(running)),
            "num_requests_waiting": float(max(0, self._num_requests - len(running))),
            "kv_cache_usage_perc": bm.usage,  # fraction 0..1, as vLLM reports it
            "kv_cache_num_blocks": float(bm.num_blocks),
            # monotonic since the engine started: Prometheus counters (frontier_*_total), as vLLM's
            "prefix_cache_queries_total": float(bm.num_prefix_queries),
            "prefix_cache_hits_total": float(bm.num_prefix_hits),
            "num_preemptions_total": float(self.scheduler.num_preemptions),
            "last_step_seconds": step_s,
            "last_batch_size": float(batch_size),
            "last_num_batched_tokens": float(num_tokens),
            "num_steps": float(self.num_steps),
            **self.speculation.stats.as_stats(),
        }

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

