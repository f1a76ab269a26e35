"""Attention kernels of MiniMax Sparse Attention behind one set of entry points.

Every entry point works on packed variable-length queries over a paged cache (layout in
``msa.kernels._paged``) and dispatches by device: CUDA tensors run the Triton kernels, CPU tensors
the pure-PyTorch references. ``MSA_KERNEL_BACKEND=triton`` forces the Triton path (on CPU that
needs ``TRITON_INTERPRET=1``); ``MSA_KERNEL_BACKEND=reference`` forces the references.
"""

from msa.kernels.api import (
    merge_attention_states,
    merge_block_candidates,
    paged_attention,
    select_and_attend,
    select_blocks,
    selection_needed,
    sparse_attention,
    store_tokens,
)

__all__ = [
    "merge_attention_states",
    "merge_block_candidates",
    "paged_attention",
    "select_and_attend",
    "select_blocks",
    "selection_needed",
    "sparse_attention",
    "store_tokens",
]
