"""Scheduler: decode-first mixed batches, chunked prefill, preemption, abort, n > 1 sharing."""

from service.engine.kv_cache import BlockManager
from service.engine.scheduler import Scheduler, SchedulerConfig, Sequence, SeqStatus


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=16):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs, budget), bm), bm


def seq(rid, n, index=0, base=0):
    return Sequence(rid, index, [base + i for i in range(n)], n)


def step(s: Scheduler, new_token=7):
    """One engine step without a model: every sampling row gets `new_token`."""
    batch = s.schedule()
    s.on_step_done(batch)
    for it in batch:
        if it.samples:
            it.seq.token_ids.append(new_token)
    return batch


def test_prefill_then_decode():
    s, _ = make()
    a = seq("a", 6)
    s.add([a])
    b = step(s)
    assert [(it.start, it.num_tokens, it.samples) for it in b] == [(0, 6, True)]
    b = step(s)
    assert [(it.start, it.num_tokens) for it in b] == [(6, 1)]
    assert a.num_computed_tokens == 7 and a.num_tokens == 8


def test_long_prompt_is_chunked_and_never_stalls_decodes():
    s, _ = make(budget=16)
    runners = [seq(f"r{i}", 3, base=100 * i) for i in range(3)]
    for r in runners:
        s.add([r])
    step(s)  # all three prefilled in one step (9 tokens)
    long = seq("long", 50, base=1000)
    s.add([long])
    for _ in range(4):
        b = step(s)
        decodes = [it for it in b if it.seq is not long]
        assert len(decodes) == 3 and all(it.num_tokens == 1 for it in decodes)
        assert b[0].seq is not long  # decode rows come first
        assert sum(it.num_tokens for it in b) <= 16
    # 13 prompt tokens per step: after 4 steps 52 >= 50, the long prompt has sampled
    assert long.num_computed_tokens == 50 and long.num_tokens == 51


def test_max_num_seqs_limits_running():
    s, _ = make(max_num_seqs=2, budget=16)
    s.add([seq("a", 2)])
    s.add([seq("b", 2)])
    s.add([seq("c", 2)])
    step(s)
    assert len(s.running) == 2 and s.num_waiting == 1


def test_preempts_newest_when_blocks_run_out_and_recomputes():
    s, bm = make(num_blocks=4, block_size=4, budget=16)
    old, new = seq("old", 4), seq("new", 4, base=50)
    s.add([old])
    s.add([new])
    step(s)  # 2 blocks each... both hold one block, tokens 5 each now
    step(s)  # both need a second block: 4 blocks used
    assert bm.num_free_blocks == 0
    for _ in range(4):
        step(s)  # the 9th token needs a third block for `old`
    assert s.num_preemptions >= 1
    assert new.status is SeqStatus.WAITING and new.block_table == []
    assert old.status is SeqStatus.RUNNING
    assert s.waiting[0] is new
    s.finish(old)
    b = step(s)  # recompute: the whole sequence (prompt + generated) is prefilled again
    item = next(it for it in b if it.seq is new)
    # its first block survived in the prefix cache (the tail was evicted first): 4 tokens reused
    assert item.samples and item.start == 4


def test_single_sequence_that_outgrows_others_preempts_itself_only_if_alone_newest():
    s, bm = make(num_blocks=2, block_size=4, budget=16)
    a = seq("a", 7)
    s.add([a])
    step(s)  # prefill: 8 tokens
    step(s)  # decode the 8th: two full blocks, 9 tokens
    b = step(s)  # 9th token needs a third block, none exists: a preempts itself
    assert b == [] and a.status is SeqStatus.WAITING and s.num_preemptions == 1


def test_abort_frees_blocks_immediately():
    s, bm = make()
    a, b = seq("a", 9), seq("b", 5)
    s.add([a])
    s.add([b])
    step(s)
    used = bm.num_used_blocks
    removed = s.abort("a")
    assert removed == [a] and a.status is SeqStatus.FINISHED
    assert bm.num_used_blocks == used - 3
    assert s.abort("missing") == []


def test_abort_waiting_request():
    s, _ = make(max_num_seqs=1)
    s.add([seq("a", 3)])
    s.add([seq("b", 3)])
    step(s)
    assert [x.request_id for x in s.abort("b")] == ["b"] and s.num_waiting == 0


def test_n_siblings_wait_for_prompt_then_share_blocks():
    s, bm = make(block_size=4, budget=8)
    prompt = list(range(13))
    sibs = [Sequence("r", i, list(prompt), 13) for i in range(3)]
    s.add(sibs)
    b = step(s)
    assert [it.seq.index for it in b] == [0]  # chunk 1 of the prompt; siblings wait
    b = step(s)
    assert [it.seq.index for it in b] == [0] and sibs[0].num_computed_tokens == 13
    b = step(s)  # siblings admitted with 12 cached tokens: only the last one is computed
    sib_items = [it for it in b if it.seq.index > 0]
    assert [(it.start, it.num_tokens) for it in sib_items] == [(12, 1), (12, 1)]
    assert sibs[1].block_table[:3] == sibs[0].block_table[:3]
    assert bm.num_prefix_hits == 24 and sibs[1].num_cached_tokens == 12


def test_chunked_prefill_resumes_where_it_stopped():
    s, _ = make(budget=8)
    a = seq("a", 20)
    s.add([a])
    starts = [(it.start, it.num_tokens) for _ in range(3) for it in step(s)]
    assert starts == [(0, 8), (8, 8), (16, 4)]
