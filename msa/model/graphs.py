"""Piecewise CUDA graphs: a step's token-wise work replayed, its attention run eagerly.

A decode step of a few tokens is bound by the host: every norm, projection, rotary embedding and
expert matmul is a kernel launch of its own, some 450 per step for four M3 layers, each costing
more host time than the GPU spends on it. Everything between two attentions works on each token
row by itself (o_proj, residuals, norms, the MLP or MoE, the next layer's projections), so it does
not depend on how the rows are grouped into sequences and can be captured once per token count
and replayed. Attention (storing the step's keys, selecting blocks, attending) depends on the
sequences, their lengths and pages, and runs eagerly between the pieces, on the real rows.

A step of T tokens runs on the smallest captured size S >= T: rows T..S of the static buffers
hold stale values whose results nobody reads (every token-wise op keeps rows apart). The graphs
read the model's parameters where they are, so an in-place weight update reaches them. This
follows vLLM's piecewise CUDA graphs, built by hand for this model's fixed layer structure.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from msa.model.attention import Projections
from msa.model.kv_cache import AttentionBatch
from msa.model.layers import SparseMoE, grouped_matmul_available
from msa.model.model import MiniMaxM3ForCausalLM


def capture_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture up to ``max_tokens``: 1, 2, 4, every multiple of 8 up to 256, every
    multiple of 16 above, and ``max_tokens`` itself, as vLLM pads its batches."""
    sizes = [s for s in (1, 2, 4) if s < max_tokens]
    sizes += range(8, min(max_tokens, 257), 8)
    sizes += range(272, max_tokens, 16)
    return sorted({*sizes, max_tokens}) if max_tokens > 0 else []


class PiecewiseForward:
    """``model.forward`` for steps of at most ``max(sizes)`` tokens, split at the attentions into
    token-wise pieces over static buffers. With ``graphs`` (CUDA) each piece is captured per size
    by ``capture`` and replayed; without, the pieces run eagerly (the same arithmetic, which is
    how the split is checked on a CPU). Only for a model without collectives in its token-wise
    parts (no tensor parallelism)."""

    def __init__(self, model: MiniMaxM3ForCausalLM, sizes: Sequence[int]) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"sizes must be positive token counts, got {list(sizes)}")
        self.model = model
        self.sizes = sorted(set(sizes))
        self.layers = list(model.model.layers)
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        n = self.sizes[-1]
        weight = model.model.embed_tokens.weight
        first = self.layers[0].self_attn
        hd = first.head_dim

        def buffer(*shape: int, dtype: torch.dtype = weight.dtype) -> torch.Tensor:
            return torch.zeros(n, *shape, dtype=dtype, device=weight.device)

        self.x = buffer(weight.shape[1])
        self.hidden = buffer(weight.shape[1])
        self.cos = buffer(first.rotary_dim // 2, dtype=torch.float32)
        self.sin = buffer(first.rotary_dim // 2, dtype=torch.float32)
        self.attention = buffer(first.q_proj.out_features // hd, hd)
        self.q = buffer(first.q_proj.out_features // hd, hd)
        self.k = buffer(first.k_proj.out_features // hd, hd)
        self.v = buffer(first.v_proj.out_features // hd, hd)
        sparse = next((layer.self_attn for layer in self.layers if layer.self_attn.sparse), None)
        self.index_q = self.index_k = None
        if sparse is not None:
            self.index_q = buffer(sparse.index_q_proj.out_features // sparse.index_dim, sparse.index_dim)
            self.index_k = buffer(sparse.index_dim)

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def fits(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.max_tokens

    def _piece(self, j: int, size: int) -> None:
        """Piece ``j`` over the first ``size`` rows: layer j-1's finish (j > 0), then layer j's norm
        and projections into the buffers (j < layers), or the final norm (j = layers)."""
        x = self.x[:size]
        if j > 0:
            x = self.layers[j - 1].finish(x, self.attention[:size])
        if j == len(self.layers):
            self.hidden[:size].copy_(self.model.model.norm(x))
            return
        if j > 0:
            self.x[:size].copy_(x)
        layer = self.layers[j]
        projected = layer.self_attn.project(
            layer.input_layernorm(x), self.cos[:size], self.sin[:size], index=True
        )
        buffers = (self.q, self.k, self.v, self.index_q, self.index_k)
        for buf, value in zip(buffers, projected, strict=True):
            if value is not None:
                buf[:size].copy_(value)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every piece at every size (largest first, into one memory pool: the pieces
        replay one after another, so their scratch memory may overlap)."""
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for size in reversed(self.sizes):
            graphs = []
            for j in range(len(self.layers) + 1):
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # first runs (library handles, autotuning) stay out
                    self._piece(j, size)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._piece(j, size)
                graphs.append(graph)
            self._graphs[size] = graphs
        torch.cuda.synchronize()

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, batch: AttentionBatch, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[len(rows) or T, vocab]`` fp32, as ``model(input_ids, batch, rows=rows)``."""
        T = input_ids.shape[0]
        if not self.fits(T):
            raise ValueError(f"a step of {T} tokens does not fit the pieces' {self.max_tokens} rows")
        size = self.sizes[bisect.bisect_left(self.sizes, T)]
        first = self.layers[0].self_attn
        cos, sin = batch.rope(first.rotary_dim, first.rope_theta)
        self.cos[:T].copy_(cos)
        self.sin[:T].copy_(sin)
        self.x[:T].copy_(self.model.model.embed_tokens(input_ids))
        graphs = self._graphs.get(size)
        for j, layer in enumerate(self.layers):
            self._run(graphs, j, size)
            index = (self.index_q[:T], self.index_k[:T]) if layer.self_attn.sparse else ()
            projected = Projections(self.q[:T], self.k[:T], self.v[:T], *index)
            self.attention[:T].copy_(layer.self_attn.attend(projected, batch))
        self._run(graphs, len(self.layers), size)
        return self.model.logits(self.hidden[:T], rows)

    def _run(self, graphs: list[torch.cuda.CUDAGraph] | None, j: int, size: int) -> None:
        if graphs is None:
            self._piece(j, size)
        else:
            graphs[j].replay()


def uncapturable_reason(model: MiniMaxM3ForCausalLM) -> str | None:
    """Why the token-wise pieces of ``model`` cannot be captured, or None when they can: they
    must run on a GPU, without host syncs (the MoE's grouped matmuls, not its loop over experts)
    and without collectives (no tensor-parallel all-reduce hooks)."""
    if not model.lm_head.weight.is_cuda:
        return "the model is not on a GPU"
    for name, module in model.model.layers.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{name} runs forward hooks (tensor-parallel collectives)"
        if isinstance(module, SparseMoE):
            if module.stacked is None:
                return f"{name} has no stacked experts"
            w2 = module.stacked[1]
            if not grouped_matmul_available(w2.new_empty(0, w2.shape[1]), w2.shape[-1]):
                return f"{name} cannot run grouped matmuls in {w2.dtype} here (its loop syncs the host)"
    return None
