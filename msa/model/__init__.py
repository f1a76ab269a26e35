"""The MiniMax-M3 network with MiniMax Sparse Attention, in plain PyTorch (no distributed code)."""

from msa.model.kv_cache import AttentionBatch, PagedKVCache, build_batch, cache_free_batch
from msa.model.model import MiniMaxM3ForCausalLM

__all__ = ["AttentionBatch", "MiniMaxM3ForCausalLM", "PagedKVCache", "build_batch", "cache_free_batch"]
