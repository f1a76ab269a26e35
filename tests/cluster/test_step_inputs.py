"""Each shard's step inputs, kept up to date incrementally (block-table rows that live between
steps, only new entries sent), against a from-scratch ``build_batch`` of the full page lists, over
schedules with chunked prefill, decodes, preemption, aborts and shared prompt blocks."""

from __future__ import annotations

import random

import pytest
import torch

from msa.cluster.block_manager import BlockManager, blocks_on_shard
from msa.cluster.scheduler import Scheduler, StepPlan
from msa.cluster.sequence import Sequence, SequenceStatus
from msa.cluster.step_inputs import StepInputBuilder
from msa.model.kv_cache import build_batch
from tests.cluster.conftest import greedy

BLOCK = 4


def check_step(plan: StepPlan, builders: list[StepInputBuilder], seqs: dict[int, Sequence]) -> None:
    """Every shard's inputs equal a fresh build from the sequences' full page lists."""
    for rank, builder in enumerate(builders):
        got = builder.build(plan, cache=None)
        tables = [list(seqs[i].pages[rank]) for i in plan.seq_ids]
        want = build_batch(
            tables, plan.num_cached, plan.num_new, BLOCK, shard_rank=rank, shard_world=len(builders)
        )
        b, w = got.batch, want
        for name in ("positions", "cu_seqlens_q", "seq_lens", "slot_mapping"):
            assert torch.equal(getattr(b, name), getattr(w, name)), name
            # Uploaded together, each starts 16-byte aligned (one Triton specialization per kernel).
            t = getattr(b, name)
            assert t.storage_offset() * t.element_size() % 16 == 0, name
        # Columns: the blocks this step's lengths reach here (a prefill chunk's sequence may already
        # hold pages for the rest of its prompt); entries past them are never read.
        needed = [blocks_on_shard(-(-n // BLOCK), rank, len(builders)) for n in w.seq_lens.tolist()]
        assert b.block_table.shape == (len(tables), max(needed + [1])) and b.block_table.is_contiguous()
        for row, (pages, n) in enumerate(zip(tables, needed, strict=True)):
            assert b.block_table[row, :n].tolist() == pages[:n]
        assert got.token_ids.tolist() == plan.token_ids
        want_rows = (w.cu_seqlens_q[1:].long() - 1)[[s.row for s in plan.samples]]
        assert torch.equal(got.sample_rows, want_rows)
        assert b.max_q_len == max(plan.num_new) and b.max_seq_len == int(w.seq_lens.max())


def arrivals(rng: random.Random, name: str, sp: int) -> list[Sequence]:
    """A new request: one choice, or two where the second shares the first one's prompt blocks."""
    prompt = [rng.randrange(50) for _ in range(rng.randint(1, 30))]
    first = Sequence(name, 0, prompt, greedy(rng.randint(2, 12)), 0, sp)
    if rng.random() < 0.3:
        return [first, Sequence(name, 1, prompt, first.params, 0, sp, prefix_source=first)]
    return [first]


def run_schedule(sp: int, num_pages: int, seed: int) -> tuple[int, int, int]:
    """Random arrivals and aborts under page pressure; every step checked. Returns (steps,
    preemptions, aborts)."""
    rng = random.Random(seed)
    scheduler = Scheduler(BlockManager(num_pages, sp, BLOCK), max_num_seqs=6, max_num_batched_tokens=24)
    builders = [StepInputBuilder(torch.device("cpu"), BLOCK, r, sp) for r in range(sp)]
    live: dict[int, Sequence] = {}
    aborted = steps = 0
    for step in range(120):
        if step < 80 and rng.random() < 0.3:
            for s in arrivals(rng, f"r{step}", sp):
                live[s.seq_id] = s
                scheduler.add(s)
        if live and rng.random() < 0.08:  # abort a random sequence, running or waiting
            victim = live.pop(rng.choice(list(live)))
            scheduler.remove(victim)
            aborted += 1
        plan = scheduler.schedule()
        if plan is None:
            continue
        check_step(plan, builders, live)
        steps += 1
        scheduler.postprocess(plan, live, [rng.randrange(50) for _ in plan.samples])
        for s in list(live.values()):
            if s.status is SequenceStatus.RUNNING and s.num_output_tokens >= s.params.max_tokens:
                scheduler.remove(live.pop(s.seq_id))
    return steps, scheduler.num_preemptions, aborted


@pytest.mark.parametrize("sp", [1, 2, 3], ids=["sp1", "sp2", "sp3"])
def test_incremental_block_tables_equal_a_rebuild_under_preemption_and_aborts(sp):
    steps, preemptions, aborted = run_schedule(sp, num_pages=12 // sp, seed=sp)
    assert steps > 50 and preemptions > 0 and aborted > 0


def test_rows_are_reused_and_only_new_pages_are_sent():
    blocks = BlockManager(num_pages=16, sp=2, block_size=BLOCK)
    a, b = Sequence("a", 0, list(range(9)), greedy(8), 0, 2), Sequence("b", 0, [1], greedy(8), 0, 2)
    blocks.allocate(a, 9)  # 3 blocks: shard 0 holds blocks 0 and 2, shard 1 block 1
    first = blocks.table_updates([a])
    assert a.table_row == 0 and [len(u) for u in first] == [2, 1] and first[0].cols == [0, 1]
    assert [len(u) for u in blocks.table_updates([a])] == [0, 0]
    blocks.allocate(a, 13)  # block 3 lands on shard 1, column 1
    again = blocks.table_updates([a])
    assert [len(u) for u in again] == [0, 1] and again[1].cols == [1] and again[1].rows == [0]
    blocks.allocate(b, 1)
    blocks.table_updates([b])
    assert b.table_row == 1
    blocks.free(a)
    assert a.table_row is None and a.pages_sent == [0, 0]
    blocks.allocate(a, 5)
    assert [len(u) for u in blocks.table_updates([a])] == [1, 1] and a.table_row == 0
