"""Continuous batching: which tokens of which sequences the next step computes.

Every step has a token budget (``max_num_batched_tokens``). Running decodes are served first, one
token each, so a long prompt never stalls them; the rest of the budget goes to prefill chunks of
sequences already admitted, then to newly admitted ones. A sequence is admitted when the pages for
its whole uncomputed prefix are free; a decode that needs a page nobody has preempts the newest
running sequence, which drops its pages and is recomputed later (nothing is lost). The further
choices of a request wait for the first one to cache the prompt and then share its full blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from msa.cluster.block_manager import BlockManager, PageTableUpdate
from msa.cluster.sampler import SampleRequest
from msa.cluster.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class StepPlan:
    """What every shard runs in one step. Sequence b computes ``num_new[b]`` tokens (its slice of
    the packed ``token_ids``) on top of ``num_cached[b]`` cached ones; its pages are row
    ``table_rows[b]`` of the shards' block tables, which ``table_updates[r]`` brings up to date on
    sequence shard r first. ``samples`` names the rows whose last token's logits are sampled.
    ``num_prompt_tokens`` of the tokens are prompt tokens (prefill), the rest generated ones
    (decode). ``return_logits`` sends those logits back; ``profile`` has rank 0 time its device kernels;
    ``dense_attention`` runs the MSA layers' attention densely (benchmarks).
    Block-table rows belong to the scheduler that planned them: one scheduler drives an executor
    at a time."""

    seq_ids: list[int]
    token_ids: list[int]
    num_cached: list[int]
    num_new: list[int]
    table_rows: list[int]
    table_updates: list[PageTableUpdate]
    samples: list[SampleRequest]
    num_prompt_tokens: int = 0
    return_logits: bool = False
    profile: bool = False
    dense_attention: bool = False
    weight_version: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class _Chunk:
    seq: Sequence
    num_new: int


@dataclass
class Scheduler:
    block_manager: BlockManager
    max_num_seqs: int
    max_num_batched_tokens: int
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    num_preemptions: int = 0
    num_shared_tokens: int = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its pages."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when nothing can run."""
        budget = self.max_num_batched_tokens
        chunks: list[_Chunk] = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed != 1:
                continue
            while not self.block_manager.can_hold(seq, seq.num_tokens):
                victim = self.running[-1]  # the newest; at worst seq itself
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.allocate(seq, seq.num_tokens)
                chunks.append(_Chunk(seq, 1))
                budget -= 1
        for seq in self.running:
            if budget > 0 and seq.num_uncomputed > 1:
                chunks.append(_Chunk(seq, min(seq.num_uncomputed, budget)))
                budget -= chunks[-1].num_new
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._share_prefix(seq):
                break  # its request's first choice is still prefilling the prompt it will share
            if not self.block_manager.can_hold(seq, seq.num_tokens):
                self.block_manager.free(seq)
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(_Chunk(seq, min(seq.num_uncomputed, budget)))
            budget -= chunks[-1].num_new
        return self._plan(chunks) if chunks else None

    def _share_prefix(self, seq: Sequence) -> bool:
        """Give ``seq`` the cached full prompt blocks of its prefix source when that one has them;
        False while the source is running but has not cached them yet (worth waiting for)."""
        source, blocks = seq.prefix_source, seq.shareable_prompt_blocks(self.block_manager.block_size)
        if source is None or blocks == 0 or source.status is not SequenceStatus.RUNNING:
            return True
        shared_tokens = blocks * self.block_manager.block_size
        if source.num_cached < shared_tokens:
            return False
        self.block_manager.share(source, seq, blocks)
        seq.num_cached = shared_tokens
        self.num_shared_tokens += shared_tokens
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _plan(self, chunks: list[_Chunk]) -> StepPlan:
        tokens, samples, num_prompt = [], [], 0
        for b, c in enumerate(chunks):
            start, end = c.seq.num_cached, c.seq.num_cached + c.num_new
            tokens.extend(c.seq.token_ids[start:end])
            num_prompt += max(0, min(end, c.seq.num_prompt_tokens) - start)
            if end == c.seq.num_tokens:
                samples.append(SampleRequest.for_sequence(b, c.seq))
        updates = self.block_manager.table_updates([c.seq for c in chunks])
        return StepPlan(
            seq_ids=[c.seq.seq_id for c in chunks],
            token_ids=tokens,
            num_cached=[c.seq.num_cached for c in chunks],
            num_new=[c.num_new for c in chunks],
            table_rows=[c.seq.table_row for c in chunks],
            table_updates=updates,
            samples=samples,
            num_prompt_tokens=num_prompt,
        )

    def postprocess(
        self, plan: StepPlan, sequences: dict[int, Sequence], sampled: list[int]
    ) -> list[tuple[Sequence, int]]:
        """Advance the sequences of a finished step and append each sampled token. Returns
        (sequence, index into ``plan.samples``) of those that got one; aborted ones are skipped."""
        for seq_id, num_new in zip(plan.seq_ids, plan.num_new, strict=True):
            seq = sequences.get(seq_id)
            if seq is not None and seq.status is SequenceStatus.RUNNING:
                seq.num_cached += num_new
        advanced = []
        for i, (sample, token) in enumerate(zip(plan.samples, sampled, strict=True)):
            seq = sequences.get(plan.seq_ids[sample.row])
            if seq is not None and seq.status is SequenceStatus.RUNNING:
                seq.token_ids.append(token)
                advanced.append((seq, i))
        return advanced
