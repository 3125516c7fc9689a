"""Speculative decoding in the native engine's step: propose before scheduling, verify after the
forward (service/engine/speculative.py has the proposers and why verification is lossless;
service/engine/draft.py the draft models).

A speculating sequence is scheduled as its last accepted token plus its proposed tokens, one decode
row each in the mixed batch (service/engine/runner.py: each attends to its own prefix, computed as
plain decoding computes it); its k + 1 logits rows are then sampled one at a time through the
sequence's own state machine (penalties, controllers, stop checks, its seeded generator), accepting
while the emitted token equals the proposal. The scheduler then keeps the KV of the accepted
tokens and gives back blocks taken only for rejected ones.
"""

from __future__ import annotations

import logging

import torch

from service.engine.draft import DraftModel
from service.engine.sampler import sample
from service.engine.scheduler import Scheduler, ScheduledSeq, Sequence
from service.engine.speculative import SpecStats
from service.engine.types import RequestOutput

log = logging.getLogger(__name__)


class Speculation:
    def __init__(self, max_batch: int):
        # Above this many decoding sequences nobody speculates: proposed tokens then cost about what
        # they save (bench/speculative.py), and rows would lose their own attention calls.
        self.max_batch = max_batch
        self.stats = SpecStats()
        self.drafts: dict[str, DraftModel] = {}  # draft model id -> its model and KV (NativeEngine.attach_draft)

    def propose(self, scheduler: Scheduler) -> None:
        """Set each decoding sequence's spec_tokens: n-gram lookups one by one, then one batched
        round per draft model. A draft that fails proposes nothing this step; the target goes on."""
        decoding = [s for s in scheduler.running if not s.is_prefilling]
        busy = len(decoding) > self.max_batch
        drafting: dict[str, list[tuple[Sequence, int]]] = {}
        for seq in decoding:
            seq.spec_tokens = []
            st = seq.payload
            if busy or st.spec is None or st.finished or st.forced:
                continue
            out = st.out  # room after the next token: max_tokens, then the context
            room = min(out.max_tokens - out.num_generated, out.max_model_len - len(seq.token_ids)) - 1
            k = st.spec.num_to_propose(room)
            if k and st.spec.proposer is not None:
                seq.spec_tokens = st.spec.proposer.propose(seq.token_ids, k)
            elif k and st.spec.draft in self.drafts:
                drafting.setdefault(st.spec.draft, []).append((seq, k))
        for draft_id, wants in drafting.items():
            draft = self.drafts[draft_id]
            try:
                proposals = draft.propose(wants)
            except Exception:
                log.exception("draft model %s failed to propose; this step runs without it", draft_id)
                draft.reset()
                continue
            for seq, _ in wants:
                seq.spec_tokens = proposals.get(id(seq), [])

    def release(self, seq: Sequence) -> None:
        """A sequence that finished or was aborted gives back its draft KV."""
        for draft in self.drafts.values():
            draft.release(seq)

    @staticmethod
    def split(samplers: list[ScheduledSeq], logits: torch.Tensor):
        """(plain items, their logits rows, [(speculating item, its k + 1 rows)])."""
        if all(it.num_spec == 0 for it in samplers):
            return samplers, logits, []
        plain, rows, verifying, r = [], [], [], 0
        for it in samplers:
            if it.num_spec:
                verifying.append((it, logits[r : r + 1 + it.num_spec]))
            else:
                plain.append(it)
                rows.append(r)
            r += 1 + it.num_spec
        return plain, logits[rows], verifying

    def verify(self, items, engine) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for it, rows in items:
            seq, st = it.seq, it.seq.payload
            if st.finished:  # a sibling's failure ended the request earlier in this loop
                continue
            drafts = seq.spec_tokens[: it.num_spec]
            accepted, last = 0, None
            try:
                for j in range(len(drafts) + 1):
                    st.before_sample()
                    tokens, lps = sample(rows[j : j + 1], [st.row])
                    last = engine._accept(seq, int(tokens[0]), lps[0] if lps else None, rows[j])
                    if last is not None:
                        outputs.append(last)
                    if st.finished or j == len(drafts) or st.last_token != drafts[j]:
                        break
                    accepted += 1
            except Exception as exc:  # this request fails alone, as in plain sampling
                log.error("request %s failed verifying a draft: %s", seq.request_id, exc)
                outputs.extend(engine._fail_request(seq.request_id, str(exc)))
                continue
            st.spec.record(len(drafts), accepted)
            self.stats.record(len(drafts), accepted)
            if last is not None and last.report is not None:  # the final report was cut before this draft
                last.report.update(st.spec.report())
            engine.scheduler.accept_spec(seq, accepted)
        return outputs
