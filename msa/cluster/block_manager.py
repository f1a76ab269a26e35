"""KV page allocation across the sequence shards of one engine replica.

A page holds one block of ``block_size`` tokens. With ``sp`` sequence shards a sequence's global
block j lives on shard ``j % sp``, at a page from that shard's free list; tensor-parallel ranks of a
shard share its page ids (each holds its own heads of the same pages). Pages are reference counted:
the choices of one request share the full blocks of their prompt (never written again).

The shards keep each sequence's pages as one row of a block table that lives on their device
between steps. A sequence gets a row when it is first scheduled and gives it back with its pages;
while it holds them its page lists only grow, so each step sends only the entries added since the
last (``table_updates``), not whole page lists.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from msa.cluster.sequence import Sequence


def blocks_on_shard(num_blocks: int, rank: int, world: int) -> int:
    """How many of the first ``num_blocks`` global blocks shard ``rank`` of ``world`` holds."""
    return max(0, (num_blocks - rank + world - 1) // world)


@dataclass(slots=True)
class PageTableUpdate:
    """Entries to write into one shard's block table: ``table[rows[i], cols[i]] = pages[i]``."""

    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pages)


class BlockManager:
    """Free lists and reference counts of ``num_pages`` pages on each of ``sp`` shards, and the
    block-table rows of the sequences that hold pages."""

    def __init__(self, num_pages: int, sp: int, block_size: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages, self.sp, self.block_size = num_pages, sp, block_size
        self._free = [deque(range(num_pages)) for _ in range(sp)]
        self._refs = [[0] * num_pages for _ in range(sp)]
        self._free_rows: list[int] = []  # a heap: the lowest free row is reused first
        self._num_rows = 0

    @property
    def max_sequence_tokens(self) -> int:
        """The longest sequence whose pages fit when it has the cache to itself."""
        return self.num_pages * self.sp * self.block_size

    @property
    def pages_used(self) -> list[int]:
        return [self.num_pages - len(free) for free in self._free]

    def _missing(self, seq: Sequence, num_tokens: int) -> list[int]:
        blocks = (num_tokens + self.block_size - 1) // self.block_size
        return [max(0, blocks_on_shard(blocks, r, self.sp) - len(seq.pages[r])) for r in range(self.sp)]

    def can_hold(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the free pages suffice for ``seq`` to hold its first ``num_tokens`` tokens."""
        missing = self._missing(seq, num_tokens)
        return all(need <= len(free) for need, free in zip(missing, self._free, strict=True))

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` the pages for its first ``num_tokens`` tokens (check ``can_hold`` first)."""
        missing = self._missing(seq, num_tokens)
        if not self.can_hold(seq, num_tokens):
            free = [len(f) for f in self._free]
            raise RuntimeError(f"out of KV pages for {seq}: needs {missing}, free {free}")
        for rank, need in enumerate(missing):
            for _ in range(need):
                page = self._free[rank].popleft()
                self._refs[rank][page] = 1
                seq.pages[rank].append(page)

    def share(self, source: Sequence, seq: Sequence, num_blocks: int) -> None:
        """Let ``seq`` (holding no pages) use ``source``'s pages of its first ``num_blocks`` global
        blocks; both must only ever write past them."""
        if any(seq.pages):
            raise RuntimeError(f"{seq} already holds pages; only a sequence without any can share")
        for rank in range(self.sp):
            pages = source.pages[rank][: blocks_on_shard(num_blocks, rank, self.sp)]
            for page in pages:
                self._refs[rank][page] += 1
            seq.pages[rank] = list(pages)

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s hold on its pages (a page is free once nobody holds it); its cache content
        is gone for it (``num_cached`` resets to 0)."""
        for rank, pages in enumerate(seq.pages):
            refs = self._refs[rank]
            for page in pages:
                refs[page] -= 1
                if refs[page] == 0:
                    self._free[rank].append(page)
            pages.clear()
        seq.num_cached = 0
        if seq.table_row is not None:
            heapq.heappush(self._free_rows, seq.table_row)
            seq.table_row = None
        seq.pages_sent = [0] * self.sp

    def table_updates(self, seqs: list[Sequence]) -> list[PageTableUpdate]:
        """Per shard, the block-table entries that ``seqs`` (about to run a step) hold but the
        shards were not sent yet; rows are assigned to sequences that have none. Marks them sent:
        the step that carries them must reach every shard."""
        updates = [PageTableUpdate() for _ in range(self.sp)]
        for seq in seqs:
            if seq.table_row is None:
                seq.table_row = self._new_row()
            for rank, update in enumerate(updates):
                pages, sent = seq.pages[rank], seq.pages_sent[rank]
                if len(pages) > sent:
                    update.rows.extend([seq.table_row] * (len(pages) - sent))
                    update.cols.extend(range(sent, len(pages)))
                    update.pages.extend(pages[sent:])
                    seq.pages_sent[rank] = len(pages)
        return updates

    def _new_row(self) -> int:
        if self._free_rows:
            return heapq.heappop(self._free_rows)
        self._num_rows += 1
        return self._num_rows - 1
