"""The tiny model the model tests share."""

from __future__ import annotations

import pytest
import torch

from msa.model import MiniMaxM3ForCausalLM
from msa.platform.config import tiny


@pytest.fixture(scope="module")
def model() -> MiniMaxM3ForCausalLM:
    torch.manual_seed(0)
    m = MiniMaxM3ForCausalLM(tiny()).eval()
    # Larger random MoE correction bias so routing differs from plain top-k of the scores.
    with torch.no_grad():
        for layer in m.model.layers:
            if hasattr(layer, "block_sparse_moe"):
                layer.block_sparse_moe.e_score_correction_bias.normal_(0, 0.5)
    return m
