"""Building paged caches and packed query batches for the kernel tests and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msa.kernels._paged import num_local_blocks


@dataclass
class Batch:
    """Packed queries of B sequences: the last ``q_lens[b]`` of ``seq_lens[b]`` tokens."""

    seq_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32

    @property
    def total_q(self) -> int:
        return int(self.cu_seqlens_q[-1])


def make_batch(seq_lens: list[int], q_lens: list[int], device: str | torch.device = "cpu") -> Batch:
    cu = [0]
    for q in q_lens:
        cu.append(cu[-1] + q)
    return Batch(
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        torch.tensor(cu, dtype=torch.int32, device=device),
    )


def paginate(
    tokens: list[torch.Tensor],
    block_size: int,
    shard_rank: int = 0,
    shard_world: int = 1,
    spare_pages: int = 2,
    generator: torch.Generator | None = None,
    poison: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter each sequence's tokens ``[L_b, ...]`` into shuffled pages of a fresh cache.

    Returns (cache ``[pages, block_size, ...]``, block_table ``[B, max local blocks]`` int32). Only
    this shard's blocks (global ``shard_rank + i * shard_world``) are stored. Every slot nothing
    writes (tails of last blocks, spare pages, the page that pads the block table) holds NaN when
    ``poison`` is set, so any read of it shows up in the result.
    """
    feat = tokens[0].shape[1:]
    n_local = [num_local_blocks(-(-t.shape[0] // block_size), shard_rank, shard_world) for t in tokens]
    pages = sum(n_local) + spare_pages + 1
    device, dtype = tokens[0].device, tokens[0].dtype
    cache = torch.empty(pages, block_size, *feat, dtype=dtype, device=device)
    cache.fill_(float("nan") if poison else 0.0)
    order = torch.randperm(pages - 1, generator=generator).tolist()
    pad_page = pages - 1
    table = torch.full((len(tokens), max(1, max(n_local))), pad_page, dtype=torch.int32)
    for b, t in enumerate(tokens):
        for i in range(n_local[b]):
            page = order.pop()
            table[b, i] = page
            blk = shard_rank + i * shard_world
            chunk = t[blk * block_size : (blk + 1) * block_size]
            cache[page, : chunk.shape[0]] = chunk
    return cache, table.to(device)


def index_values(
    total_q: int, groups: int, dim: int, block: int, seq_lens: list[int], g: torch.Generator, ties: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp32 index queries ``[total_q, groups, dim]`` and each sequence's index keys ``[n, dim]``:
    normal noise, or with ``ties`` small integers whose keys repeat every two blocks, so many block
    scores are exactly equal."""
    if not ties:
        iq = torch.randn(total_q, groups, dim, generator=g)
        return iq, [torch.randn(n, dim, generator=g) for n in seq_lens]
    iq = torch.randint(-2, 3, (total_q, groups, dim), generator=g).float()
    ik = []
    for n in seq_lens:
        base = torch.randint(-2, 3, (2 * block, dim), generator=g).float()
        ik.append(base.repeat(-(-n // (2 * block)), 1)[:n])
    return iq, ik
