"""A draft model: a small model of the target's tokenizer that proposes the next k tokens greedily,
batched over every speculating sequence, on a paged KV cache of its own.

Each target sequence has a draft view (a scheduler `Sequence` in the draft's own block manager)
that keeps the draft's KV of the tokens it has seen. A proposal round:
  1. catch up: the view takes the target's tokens; its KV stays valid up to the longest prefix it
     shares with them (accepted proposals keep theirs, rejected ones are recomputed over), and the
     tokens past it are one prefill chunk (usually the 1-2 tokens verification added; a long
     prompt is caught up on in chunks over several steps, the sequence proposing nothing meanwhile);
  2. k - 1 more decode rows, one per proposed token (the k-th proposal needs no KV).
A greedy proposal is a point mass, so verification by drawing from the target is the exact
rejection rule (service/engine/speculative.py): the draft changes speed, never the output. The
draft never publishes prefix-cache blocks (prefix caching is off in its block manager), so no
rejected token can ever be served to anyone.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.engine.kv_cache import BlockManager
from service.engine.runner import ModelRunner
from service.engine.scheduler import ScheduledSeq, Sequence


@dataclass(eq=False)
class _View(Sequence):
    """The draft's copy of a target sequence: its tokens, and proposals past them."""

    num_synced: int = 0  # the target's length when the view last took its tokens


class DraftModel:
    def __init__(self, model_id: str, model, num_blocks: int, block_size: int, max_chunk: int = 256):
        self.id, self.model = model_id, model
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, num_blocks, block_size)  # batched attention: speed over exactness
        self.max_chunk = max_chunk  # prompt tokens a view catches up on per round (bounds a round's memory)
        self._views: dict[int, tuple[Sequence, _View]] = {}  # id(target seq) -> (target, draft view)

    @classmethod
    def for_target(cls, model_id: str, model, target_capacity_tokens: int, max_num_seqs: int, block_size: int,
                   max_proposal: int, max_chunk: int = 256) -> DraftModel:
        """A KV pool that holds every token the target's pool holds plus each sequence's proposals,
        so the draft never runs out before the target does."""
        per_seq = (max_proposal + block_size - 1) // block_size + 1
        num_blocks = (target_capacity_tokens + block_size - 1) // block_size + max_num_seqs * per_seq
        return cls(model_id, model, num_blocks, block_size, max_chunk)

    def propose(self, wants: list[tuple[Sequence, int]]) -> dict[int, list[int]]:
        """wants: (target sequence, k >= 1). Returns {id(target sequence): up to k proposed tokens}
        for the sequences that propose this round: not one whose view finds no free blocks, nor one
        still catching up on a long prompt (`max_chunk` tokens a round, as the target's prefill)."""
        batch, ks, out, owner = [], {}, {}, {}
        for seq, k in wants:
            view = self._sync(seq)
            if not self._reserve(view, k - 1):
                continue
            n = min(view.num_tokens - view.num_computed_tokens, self.max_chunk)
            batch.append(it := ScheduledSeq(view, n, view.num_computed_tokens))
            if it.samples:
                ks[id(view)], out[id(seq)], owner[id(view)] = k, [], id(seq)
        while batch:
            samplers, logits = self.runner.run(batch)
            for it in batch:
                it.seq.num_computed_tokens = it.start + it.num_tokens
            batch = []
            for it, tok in zip(samplers, logits.argmax(-1).tolist()):
                view = it.seq
                proposal = out[owner[id(view)]]
                proposal.append(tok)
                if len(proposal) < ks[id(view)]:
                    view.token_ids.append(tok)
                    batch.append(ScheduledSeq(view, 1, view.num_computed_tokens))
        return out

    def _sync(self, seq: Sequence) -> _View:
        """The view of `seq` holding the target's tokens, its KV kept for the prefix they share."""
        entry = self._views.get(id(seq))
        if entry is None or entry[0] is not seq:  # new, or an id reused by a new sequence
            entry = self._views[id(seq)] = (seq, _View(seq.request_id, seq.index, [], seq.num_prompt_tokens))
        view, tokens = entry[1], seq.token_ids
        same = min(view.num_computed_tokens, len(tokens) - 1)  # the last token is always fed: it proposes
        # The target only appends: the view can differ from it only after the tokens it last took.
        for i in range(min(view.num_synced, same), same):
            if view.token_ids[i] != tokens[i]:
                same = i
                break
        view.token_ids, view.num_computed_tokens, view.num_synced = list(tokens), same, len(tokens)
        return view

    def _reserve(self, view: Sequence, extra: int) -> bool:
        """Blocks for the view's tokens plus `extra` proposed ones (their KV is written)."""
        bm = self.block_manager
        bm.trim(view)
        if bm.blocks_needed(view, extra) > bm.num_free_blocks:
            return False
        bm.append(view, extra)
        return True

    def release(self, seq: Sequence) -> None:
        """A finished or aborted target sequence: its view's blocks go back."""
        entry = self._views.pop(id(seq), None)
        if entry is not None:
            self.block_manager.free(entry[1])

    def reset(self) -> None:
        """After a failed proposal round (views may be half-advanced): forget every view."""
        for _, view in self._views.values():
            self.block_manager.free(view)
        self._views.clear()
