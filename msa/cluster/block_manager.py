"""KV page allocation across the sequence shards of one engine replica.

A page holds one block of ``block_size`` tokens. With ``sp`` sequence shards a sequence's global
block j lives on shard ``j % sp``, at a page from that shard's free list; tensor-parallel ranks of a
shard share its page ids (each holds its own heads of the same pages).
"""

from __future__ import annotations

from collections import deque

from msa.cluster.sequence import Sequence


def blocks_on_shard(num_blocks: int, rank: int, world: int) -> int:
    """How many of the first ``num_blocks`` global blocks shard ``rank`` of ``world`` holds."""
    return max(0, (num_blocks - rank + world - 1) // world)


class BlockManager:
    """Free lists of ``num_pages`` pages on each of ``sp`` shards."""

    def __init__(self, num_pages: int, sp: int, block_size: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages, self.sp, self.block_size = num_pages, sp, block_size
        self._free = [deque(range(num_pages)) for _ in range(sp)]

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
            seq.pages[rank].extend(self._free[rank].popleft() for _ in range(need))

    def free(self, seq: Sequence) -> None:
        """Return all of ``seq``'s pages; its cache content is gone (``num_cached`` resets to 0)."""
        for rank, pages in enumerate(seq.pages):
            self._free[rank].extend(pages)
            pages.clear()
        seq.num_cached = 0
