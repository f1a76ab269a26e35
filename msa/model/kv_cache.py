"""The paged KV cache and the per-step batch description the attention layers read.

A page holds one block of ``sparse_block_size`` tokens, so a block of the MSA indexer is a page.
Per layer the cache holds K after QK-norm and RoPE, raw V, and (MSA layers) the index keys.
With sequence sharding a shard stores the global blocks ``rank, rank + world, ...`` of every
sequence; its page table lists only those, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from msa.model.layers import rope_cos_sin
from msa.platform.config import ModelConfig


class ContextParallel(Protocol):
    """What a sequence-sharded engine supplies so the attention layers can combine the shards."""

    def gather_block_candidates(
        self, ids: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All shards' ``[T, G, K]`` candidates stacked as ``[R, T, G, K]``."""

    def gather_attention(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All shards' partial ``out [T, H, D]``, ``lse [T, H]`` stacked as ``[R, ...]``."""


@dataclass
class AttentionBatch:
    """One forward step over packed tokens of several sequences.

    positions ``[T]`` int64 global positions; cu_seqlens_q ``[B+1]`` int32; seq_lens ``[B]`` int32
    (lengths including this step's tokens); block_table ``[B, max_blocks]`` int32 (this shard's
    pages); slot_mapping ``[T]`` int64 (flat cache slot of each new token, -1 when another shard
    stores it). ``cache`` None means a cache-free forward (training, full-sequence scoring):
    the layer builds pages from the step's own keys. ``max_q_len`` and ``max_seq_len``, the
    longest query run and sequence as host ints, spare the kernels a device-to-host read and let
    a step whose sequences all fit in the top-k blocks skip block selection. ``dense_attention``
    has the MSA layers attend densely like the dense ones, without their indexer (benchmarks
    compare the two on the same weights and cache). ``indexer_losses``, when a list, collects each
    MSA layer's indexer loss (``msa.model.indexer_loss``) in a cache-free forward (training).
    ``query_bounds``: ``cu_seqlens_q`` as host ints, for the per-sequence work of cache-free layers.
    """

    positions: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    block_size: int
    cache: PagedKVCache | None = None
    shard_rank: int = 0
    shard_world: int = 1
    context_parallel: ContextParallel | None = None
    max_q_len: int | None = None
    max_seq_len: int | None = None
    dense_attention: bool = False
    indexer_losses: list[torch.Tensor] | None = None
    query_bounds: list[int] | None = None

    def host_query_bounds(self) -> list[int]:
        """``cu_seqlens_q`` as host ints: ``query_bounds`` when the builder kept them (no device read)."""
        return self.query_bounds if self.query_bounds is not None else host_bounds(self.cu_seqlens_q)

    def rope(self, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of this step's positions, computed once per step and shared by all layers."""
        key = (rotary_dim, theta)
        memo = self.__dict__.setdefault("_rope_memo", {})
        if key not in memo:
            memo[key] = rope_cos_sin(self.positions, rotary_dim, theta)
        return memo[key]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def last_token_rows(self) -> torch.Tensor:
        """Row index of each sequence's last token in this step ``[B]``."""
        return self.cu_seqlens_q[1:].long() - 1


class PagedKVCache:
    """Per-layer cache tensors: k, v ``[pages, block, kv_heads, head_dim]``; index_k
    ``[pages, block, index_dim]`` on MSA layers (``index_dtype`` may be torch.float8_e4m3fn).
    Layers ``num_hidden_layers + j`` are MTP module j."""

    def __init__(
        self,
        config: ModelConfig,
        num_pages: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_heads: int | None = None,
        index_dtype: torch.dtype | None = None,
        num_mtp: int | None = None,
    ):
        self.block_size = config.sparse.block_size
        self.num_pages = num_pages
        kv_heads = kv_heads or config.num_key_value_heads
        shape = (num_pages, self.block_size, kv_heads, config.head_dim)
        num_mtp = config.num_mtp_modules if num_mtp is None else num_mtp
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.index_k: list[torch.Tensor | None] = []
        for layer in range(config.num_hidden_layers + num_mtp):
            self.k.append(torch.empty(shape, dtype=dtype, device=device))
            self.v.append(torch.empty(shape, dtype=dtype, device=device))
            sparse = layer >= config.num_hidden_layers or config.is_sparse_layer(layer)
            self.index_k.append(
                torch.empty(
                    (num_pages, self.block_size, config.sparse.index_dim),
                    dtype=index_dtype or dtype,
                    device=device,
                )
                if sparse
                else None
            )

    @staticmethod
    def bytes_per_page(
        config: ModelConfig,
        *,
        dtype: torch.dtype,
        kv_heads: int | None = None,
        index_dtype: torch.dtype | None = None,
        num_mtp: int | None = None,
    ) -> int:
        """Bytes one page costs across all layers (what admission control divides memory by)."""
        kv_heads = kv_heads or config.num_key_value_heads
        item = torch.empty((), dtype=dtype).element_size()
        index_item = torch.empty((), dtype=index_dtype or dtype).element_size()
        num_mtp = config.num_mtp_modules if num_mtp is None else num_mtp
        n_sparse = sum(config.sparse_attention_freq) + num_mtp
        per_layer_kv = 2 * config.sparse.block_size * kv_heads * config.head_dim * item
        return (
            config.num_hidden_layers + num_mtp
        ) * per_layer_kv + n_sparse * config.sparse.block_size * config.sparse.index_dim * index_item


def build_batch(
    page_tables: list[list[int]],
    num_cached: list[int],
    num_new: list[int],
    block_size: int,
    *,
    device: torch.device | str = "cpu",
    cache: PagedKVCache | None = None,
    shard_rank: int = 0,
    shard_world: int = 1,
    context_parallel: ContextParallel | None = None,
) -> AttentionBatch:
    """Describe a step in which sequence b already has ``num_cached[b]`` tokens in its pages
    (``page_tables[b]``: this shard's pages, covering the new tokens too) and appends
    ``num_new[b]``."""
    positions, slots, cu = [], [], [0]
    for pages, cached, new in zip(page_tables, num_cached, num_new, strict=True):
        for pos in range(cached, cached + new):
            block = pos // block_size
            mine = block % shard_world == shard_rank
            positions.append(pos)
            slots.append(pages[block // shard_world] * block_size + pos % block_size if mine else -1)
        cu.append(cu[-1] + new)
    width = max([len(p) for p in page_tables] + [1])
    table = [p + [0] * (width - len(p)) for p in page_tables]
    as_tensor = lambda x, dt: torch.tensor(x, dtype=dt, device=device)
    lengths = [c + n for c, n in zip(num_cached, num_new, strict=True)]
    return AttentionBatch(
        positions=as_tensor(positions, torch.int64),
        cu_seqlens_q=as_tensor(cu, torch.int32),
        seq_lens=as_tensor(lengths, torch.int32),
        block_table=as_tensor(table, torch.int32),
        slot_mapping=as_tensor(slots, torch.int64),
        block_size=block_size,
        cache=cache,
        shard_rank=shard_rank,
        shard_world=shard_world,
        context_parallel=context_parallel,
        max_q_len=max(num_new, default=0),
        max_seq_len=max(lengths, default=0),
        query_bounds=cu,
    )


def cache_free_batch(
    lengths: list[int], block_size: int, device: torch.device | str = "cpu"
) -> AttentionBatch:
    """A full forward of whole sequences (no cache): each sequence's keys are laid into pages of
    its own, ``ceil(len / block)`` of them, in sequence order."""
    tables, start = [], 0
    for n in lengths:
        count = (n + block_size - 1) // block_size
        tables.append(list(range(start, start + count)))
        start += count
    return build_batch(tables, [0] * len(lengths), list(lengths), block_size, device=device)


def host_bounds(cu_seqlens: torch.Tensor | list[int]) -> list[int]:
    """Sequence bounds as host ints (a list passes through; a tensor is read once)."""
    return cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)


def pack_into_pages(x: torch.Tensor, cu_seqlens: torch.Tensor | list[int], block_size: int) -> torch.Tensor:
    """Differentiably lay packed rows ``x [T, ...]`` into pages ``[P, block, ...]`` in the order of
    ``cache_free_batch`` (each sequence padded with zeros to whole blocks). Host bounds spare a
    device read."""
    parts = []
    bounds = host_bounds(cu_seqlens)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        seq = x[start:end]
        pad = (-seq.shape[0]) % block_size
        if pad:
            seq = F.pad(seq, [0, 0] * (x.dim() - 1) + [0, pad])
        parts.append(seq.reshape(-1, block_size, *x.shape[1:]))
    return torch.cat(parts, 0)
