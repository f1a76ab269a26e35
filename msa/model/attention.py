"""Attention of the MiniMax-M3 layers: dense causal GQA, and MiniMax Sparse Attention (MSA).

Both write this step's keys into the paged cache (or lay them into pages of their own for a
cache-free forward) and call the ``msa.kernels`` entry points. Under autograd the PyTorch
references run, since the Triton kernels have no backward. The index branch reads a detached copy
of the layer input: only the indexer's own loss (``msa.model.indexer_loss``), collected through
``AttentionBatch.indexer_losses``, trains it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from msa.kernels import (
    merge_attention_states,
    merge_block_candidates,
    paged_attention,
    select_and_attend,
    select_blocks,
    selection_needed,
    sparse_attention,
    store_tokens,
)
from msa.kernels.sparse_attention.reference import paged_attention_reference
from msa.model.indexer_loss import indexer_kl
from msa.model.kv_cache import AttentionBatch, pack_into_pages
from msa.model.layers import GemmaRMSNorm, apply_rope
from msa.platform.config import ModelConfig


class Projections(NamedTuple):
    """One layer's token-wise projections of a step (``Attention.project``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    index_q: torch.Tensor | None = None
    index_k: torch.Tensor | None = None


class _PagedView:
    """The caches one layer reads in this step, and the batch tables that address them."""

    def __init__(
        self,
        batch: AttentionBatch,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        index_k: torch.Tensor | None,
    ) -> None:
        self.batch = batch
        if batch.cache is None:
            bs, bounds = batch.block_size, batch.host_query_bounds()
            self.k = pack_into_pages(k, bounds, bs)
            self.v = pack_into_pages(v, bounds, bs)
            self.index_k = pack_into_pages(index_k, bounds, bs) if index_k is not None else None
            return
        cache = batch.cache
        self.k, self.v, self.index_k = cache.k[layer], cache.v[layer], cache.index_k[layer]
        store_tokens(self.k, k, batch.slot_mapping)
        store_tokens(self.v, v, batch.slot_mapping)
        if index_k is not None:
            store_tokens(self.index_k, index_k, batch.slot_mapping)

    @property
    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.batch.block_table, self.batch.cu_seqlens_q, self.batch.seq_lens


class Attention(nn.Module):
    """q/k/v/o projections, per-head QK Gemma norm, partial NeoX RoPE; dense or MSA by ``sparse``."""

    def __init__(self, config: ModelConfig, layer: int, sparse: bool) -> None:
        super().__init__()
        d, h = config.hidden_size, config.head_dim
        self.layer, self.sparse, self.head_dim = layer, sparse, h
        self.q_proj = nn.Linear(d, config.num_attention_heads * h, bias=False)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * h, bias=False)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * h, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * h, d, bias=False)
        self.q_norm = GemmaRMSNorm(h, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(h, config.rms_norm_eps)
        self.rotary_dim, self.rope_theta = config.rotary_dim, config.rope_theta
        self.scale = 1.0 / math.sqrt(h)
        if sparse:
            sp = config.sparse
            self.index_dim, self.topk = sp.index_dim, sp.topk_blocks
            self.index_q_proj = nn.Linear(d, sp.num_index_heads * sp.index_dim, bias=False)
            self.index_k_proj = nn.Linear(d, sp.index_dim, bias=False)
            self.index_q_norm = GemmaRMSNorm(sp.index_dim, config.rms_norm_eps)
            self.index_k_norm = GemmaRMSNorm(sp.index_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """x ``[T, hidden]`` -> ``[T, hidden]`` (this rank's partial sum under tensor parallelism)."""
        return self.o_proj(self.heads(x, batch).flatten(1))

    def heads(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """``project`` then ``attend``: x ``[T, hidden]`` -> the attention output ``[T, H, D]``
        before o_proj."""
        cos, sin = batch.rope(self.rotary_dim, self.rope_theta)
        return self.attend(self.project(x, cos, sin, index=not batch.dense_attention), batch)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, index: bool) -> Projections:
        """The token-wise half: each row of x ``[T, hidden]`` on its own to normed, rotated q ``[T,
        H, D]``, k and v ``[T, KV, D]`` and, for an MSA layer when ``index``, the index query ``[T,
        index heads, index_dim]`` and key ``[T, index_dim]``."""
        T, h = x.shape[0], self.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).view(T, -1, h)), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(x).view(T, -1, h)), cos, sin)
        v = self.v_proj(x).view(T, -1, h)
        if not (self.sparse and index):
            return Projections(q, k, v)
        xi = x.detach()
        index_q = apply_rope(self.index_q_norm(self.index_q_proj(xi).view(T, -1, self.index_dim)), cos, sin)
        index_k = apply_rope(self.index_k_norm(self.index_k_proj(xi).view(T, 1, self.index_dim)), cos, sin)
        return Projections(q, k, v, index_q, index_k[:, 0])

    def attend(self, projected: Projections, batch: AttentionBatch) -> torch.Tensor:
        """The sequence-wise half: store this step's keys, select blocks (MSA), attend; returns
        the attention output ``[T, H, D]`` before o_proj. Under ``batch.dense_attention`` the index
        branch is ignored."""
        q, k, v, index_q, index_k = projected
        if batch.dense_attention:
            index_q = index_k = None
        view = _PagedView(batch, self.layer, k, v, index_k)
        differentiable = torch.is_grad_enabled() and q.requires_grad
        out, lse, block_ids = self._attend(q, index_q, view, differentiable)
        if batch.indexer_losses is not None and index_q is not None:
            if batch.cache is not None or batch.context_parallel is not None:
                raise ValueError("indexer_losses needs a cache-free forward of whole sequences")
            loss = indexer_kl(
                q, k, index_q, index_k, batch.host_query_bounds(), block_ids, batch.block_size, self.scale
            )
            batch.indexer_losses.append(loss)
        if batch.context_parallel is not None:
            outs, lses = batch.context_parallel.gather_attention(out, lse)
            out, _ = merge_attention_states(outs, lses)
        return out

    def _attend(
        self, q: torch.Tensor, index_q: torch.Tensor | None, view: _PagedView, differentiable: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Output, lse and the selected blocks (None when every query attends to all it sees)."""
        b = view.batch
        shard = {"shard_rank": b.shard_rank, "shard_world": b.shard_world}
        block_ids = None
        if index_q is not None and selection_needed(b.max_seq_len, b.block_size, self.topk):
            if not differentiable and b.context_parallel is None:
                # Each shard's own selection: the kernels take it and attend in one call.
                return select_and_attend(
                    q, view.k, view.v, index_q.detach(), view.index_k.detach(), *view.tables, topk=self.topk,
                    scale=self.scale, max_q_len=b.max_q_len, **shard,
                )  # fmt: skip
            with torch.no_grad():
                block_ids = self.select(index_q, view)
        if differentiable:
            out, lse = paged_attention_reference(
                q, view.k, view.v, *view.tables, block_ids, scale=self.scale, **shard
            )
        elif block_ids is None:
            out, lse = paged_attention(
                q, view.k, view.v, *view.tables, scale=self.scale, max_q_len=b.max_q_len, **shard
            )
        else:
            out, lse = sparse_attention(
                q, view.k, view.v, *view.tables, block_ids, scale=self.scale, max_q_len=b.max_q_len, **shard
            )
        return out, lse, block_ids

    def select(self, index_q: torch.Tensor, view: _PagedView) -> torch.Tensor:
        """Global top-k blocks ``[T, G, K]`` for this step's queries."""
        b = view.batch
        args = (index_q.detach(), view.index_k.detach(), *view.tables)
        kwargs = {
            "topk": self.topk,
            "shard_rank": b.shard_rank,
            "shard_world": b.shard_world,
            "max_q_len": b.max_q_len,
        }
        ids, scores = select_blocks(*args, **kwargs)
        if b.context_parallel is None:
            return ids
        all_ids, all_scores = b.context_parallel.gather_block_candidates(ids, scores)
        return merge_block_candidates(all_ids, all_scores, self.topk)
