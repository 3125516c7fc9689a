"""Continuous-batching scheduler: which sequences run this step, and how many tokens each.

Every step mixes the decode token of each running sequence with chunks of prompts (chunked prefill)
under a per-step token budget, so a long prompt is spread over several steps instead of stalling
every stream. Decode rows are scheduled first; prefill gets what is left of the budget. When the KV
pool runs out, the newest running sequence is preempted: its blocks are freed and it is recomputed
later (prefix caching usually makes the recompute cheap).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from service.engine.kv_cache import BlockManager


@dataclass(frozen=True, eq=False)
class ImageSpan:
    """An image in a prompt (early fusion): positions start..start + length - 1 hold placeholder ids
    whose input rows are `embeds` [length, hidden]; `digest` (the image's content hash) stands for
    them in the prefix cache's block keys."""
    start: int
    length: int
    digest: str
    embeds: object  # torch.Tensor


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # output index within the request (0..n-1)
    token_ids: list[int]  # prompt + generated; the KV of token_ids[:num_computed_tokens] is cached
    num_prompt_tokens: int
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (first admission)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    siblings: list["Sequence"] = field(default_factory=list)  # the other sequences of its request
    payload: object = None  # the engine's per-sequence state (sampling row, output processor, ...)
    # Not None while this sequence still owes its prompt's logprobs (top-k alternatives): the runner
    # computes logits at every prompt position and the prefix cache is not read (a hit would skip them).
    prompt_logprobs: int | None = None
    # Speculative decoding: tokens proposed for after token_ids (not part of them until verified).
    # The engine sets them before `schedule`; the scheduler may drop them (no budget, no blocks).
    spec_tokens: list[int] = field(default_factory=list)
    images: list[ImageSpan] = field(default_factory=list)  # in prompt order

    def block_key(self, start: int, end: int) -> tuple:
        """What identifies tokens start..end - 1 in the prefix cache: their ids, except that an image
        position is (its image's digest, offset in the image): same image, same key; another image
        with the same placeholder ids, another key."""
        key = self.token_ids[start:end]
        if not self.images:
            return tuple(key)
        key = list(key)
        for im in self.images:
            for p in range(max(im.start, start), min(im.start + im.length, end)):
                key[p - start] = (im.digest, p - im.start)
        return tuple(key)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def reads_prefix_cache(self) -> bool:
        return self.prompt_logprobs is None

    @property
    def is_prefilling(self) -> bool:
        return self.num_uncomputed > 1


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step: token_ids[start : start + num_tokens]
    start: int
    num_spec: int = 0  # of num_tokens, the last num_spec are the sequence's proposed spec_tokens
    samples: bool = False  # the chunk reaches the last known token: its logits give the next token

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_tokens - self.num_spec == self.seq.num_tokens


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 256  # per-step budget (decode rows + prefill chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        assert config.max_num_batched_tokens >= config.max_num_seqs, "every decode row must fit the budget"
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the newest is preempted first
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            s.siblings = [o for o in seqs if o is not s]
        self.waiting.extend(seqs)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        scheduled: set[int] = set()
        # 1. Decode rows first (one token each, plus proposed tokens where the budget and free blocks
        # allow: speculation never preempts and never takes a decode row's place), preempting the
        # newest when blocks run out.
        decoding = [s for s in self.running if not s.is_prefilling]
        spare = budget - len(decoding)  # tokens left for proposed tokens this step
        for seq in decoding:
            if seq.status is not SeqStatus.RUNNING:  # preempted as a victim earlier in this loop
                continue
            k = self._spec_room(seq, spare, len(decoding) - len(out))
            spare -= k
            while not self.bm.can_append(seq):
                victim = next(s for s in reversed(self.running) if id(s) not in scheduled)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                self.bm.append(seq, extra=k)
                out.append(ScheduledSeq(seq, 1 + k, seq.num_computed_tokens, num_spec=k))
                scheduled.add(id(seq))
                budget -= 1 + k
        # 2. Continue prompts already admitted (they hold all their blocks).
        for seq in self.running:
            if budget <= 0:
                break
            if id(seq) not in scheduled and seq.is_prefilling:
                n = min(seq.num_uncomputed, budget)
                out.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
                scheduled.add(id(seq))
                budget -= n
        # 3. Admit waiting sequences, first come first served.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self._sibling_prefilling(seq) or not self.bm.can_allocate(seq):
                break
            self.waiting.popleft()
            cached = self.bm.allocate(seq)
            if seq.num_tokens == seq.num_prompt_tokens:  # not a recompute after preemption
                seq.num_cached_tokens = cached
            seq.num_computed_tokens = cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            out.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
            budget -= n
        return out

    def _spec_room(self, seq: Sequence, spare: int, rows_left: int) -> int:
        """How many of seq's proposed tokens run this step; the rest are dropped. Blocks for them must
        be free beyond one per decode row still to schedule."""
        k = min(len(seq.spec_tokens), max(spare, 0))
        while k and self.bm.blocks_needed(seq, extra=k) > self.bm.num_free_blocks - rows_left:
            k -= 1
        del seq.spec_tokens[k:]
        return k

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        """n > 1: wait until a sibling has computed the prompt, then share its blocks via the cache."""
        running = [s for s in seq.siblings if s.status is SeqStatus.RUNNING]
        return bool(running) and all(s.num_computed_tokens < s.num_prompt_tokens for s in running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.spec_tokens.clear()
        seq.status, seq.num_computed_tokens = SeqStatus.WAITING, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def on_step_done(self, batch: list[ScheduledSeq]) -> None:
        """Advance computed counts and publish full blocks to the prefix cache."""
        for item in batch:
            if item.seq.status is SeqStatus.RUNNING:
                # Proposed tokens count once verified (the engine calls `accept_spec`).
                item.seq.num_computed_tokens = item.start + item.num_tokens - item.num_spec
                self.bm.register_computed(item.seq)

    def accept_spec(self, seq: Sequence, num_accepted: int) -> None:
        """After verification: the first num_accepted proposed tokens (now in token_ids) hold valid
        KV; the rest are forgotten and blocks past the sequence's tokens go back to the pool. Their
        slots are rewritten before anything reads them, and never published to the prefix cache."""
        seq.spec_tokens.clear()
        if seq.status is not SeqStatus.RUNNING:
            return
        seq.num_computed_tokens += num_accepted
        self.bm.trim(seq)
        self.bm.register_computed(seq)

    def finish(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.bm.free(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    def abort(self, request_id: str) -> list[Sequence]:
        """Remove every sequence of a request; frees its blocks now. Returns the removed sequences."""
        seqs = [s for s in list(self.running) + list(self.waiting) if s.request_id == request_id]
        for s in seqs:
            self.finish(s)
        return seqs
