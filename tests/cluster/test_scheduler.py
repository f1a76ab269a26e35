"""Scheduler and block manager on their own: page placement across sequence shards, chunked
prefill under a token budget, preemption by recompute."""

from __future__ import annotations

from msa.cluster.block_manager import BlockManager
from msa.cluster.scheduler import Scheduler
from msa.cluster.sequence import Sequence, SequenceStatus
from tests.cluster.conftest import greedy


def seq(length: int, sp: int = 1, max_tokens: int = 50) -> Sequence:
    return Sequence("r", 0, list(range(length)), greedy(max_tokens), 0, sp)


def step(scheduler: Scheduler, seqs: list[Sequence], token: int = 7):
    plan = scheduler.schedule()
    scheduler.postprocess(plan, {s.seq_id: s for s in seqs}, [token] * len(plan.samples))
    return plan


def test_global_blocks_go_round_robin_over_sequence_shards():
    blocks = BlockManager(num_pages=8, sp=3, block_size=4)
    s = seq(1, sp=3)
    blocks.allocate(s, 4 * 7 - 1)  # 7 blocks: shards hold blocks {0,3,6}, {1,4}, {2,5}
    assert [len(p) for p in s.pages] == [3, 2, 2] and blocks.pages_used == [3, 2, 2]
    blocks.allocate(s, 4 * 8)  # block 7 lands on shard 1
    assert [len(p) for p in s.pages] == [3, 3, 2]
    assert blocks.max_sequence_tokens == 8 * 3 * 4
    assert not blocks.can_hold(seq(1, sp=3), 4 * 3 * 6)
    blocks.free(s)
    assert blocks.pages_used == [0, 0, 0] and s.num_cached == 0


def test_long_prompt_is_prefilled_in_chunks_without_stalling_a_running_decode():
    scheduler = Scheduler(BlockManager(100, 1, 4), max_num_seqs=4, max_num_batched_tokens=16)
    short, long = seq(3), seq(100)
    scheduler.add(short)
    step(scheduler, [short])  # short's prefill, then it decodes
    scheduler.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        plan = step(scheduler, [short, long])
        assert plan.seq_ids[0] == short.seq_id and plan.num_new[0] == 1  # the decode comes first
        assert plan.num_tokens <= 16
        chunks.append(plan.num_new[1])
    assert chunks == [15] * 6 + [10] and short.num_output_tokens == 8


def test_a_decode_short_of_pages_preempts_the_newest_sequence_which_is_recomputed():
    scheduler = Scheduler(BlockManager(4, 1, 4), max_num_seqs=4, max_num_batched_tokens=64)
    old, new = seq(8), seq(7)
    scheduler.add(old)
    scheduler.add(new)
    seqs = [old, new]
    step(scheduler, seqs)  # both prefilled: 2 + 2 pages, all in use
    assert old.num_output_tokens == new.num_output_tokens == 1
    plan = step(scheduler, seqs)  # old's 9th token needs a third page: new is preempted
    assert plan.seq_ids == [old.seq_id] and scheduler.num_preemptions == 1
    assert new.status is SequenceStatus.WAITING and new.num_cached == 0 and new.pages == [[]]
    assert scheduler.waiting[0] is new and new.token_ids[-1] == 7  # its sampled token is kept
    scheduler.remove(old)
    plan = step(scheduler, seqs)  # readmitted: prompt and output recomputed in one chunk
    assert plan.seq_ids == [new.seq_id] and plan.num_new == [8] and plan.num_cached == [0]
    assert new.num_output_tokens == 2


def test_further_choices_share_the_first_choices_full_prompt_blocks():
    blocks = BlockManager(20, 2, 4)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    first = seq(10, sp=2)
    others = [Sequence("r", i, list(range(10)), greedy(50), 0, 2, prefix_source=first) for i in (1, 2)]
    seqs = [first, *others]
    for s in seqs:
        scheduler.add(s)
    plan = step(scheduler, seqs)  # only the first choice prefills; the others wait for its blocks
    assert plan.seq_ids == [first.seq_id] and plan.num_new == [10]
    plan = step(scheduler, seqs)  # blocks 0-1 shared (8 tokens), tokens 8-9 computed by each
    assert plan.seq_ids == [s.seq_id for s in seqs]
    assert plan.num_cached == [10, 8, 8] and plan.num_new == [1, 2, 2]
    assert all(s.pages[r][:1] == first.pages[r][:1] for s in others for r in range(2))
    assert blocks.pages_used == [2 + 1 + 1, 1] and scheduler.num_shared_tokens == 16
    scheduler.remove(first)  # the shared pages stay while a choice still holds them
    assert blocks.pages_used == [3, 1]
    for s in others:
        scheduler.remove(s)
    assert blocks.pages_used == [0, 0]
