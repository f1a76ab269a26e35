"""The MiniMax-M3 text network: decoder layers, MTP modules, final norm and untied lm_head.

Parameter names equal the checkpoint's (without the ``language_model.`` prefix of the VL layout),
so loading is a name-for-name copy (``msa.platform.checkpoint``).
"""

from __future__ import annotations

import torch
from torch import nn

from msa.model.attention import Attention
from msa.model.kv_cache import AttentionBatch
from msa.model.layers import GatedMLP, GemmaRMSNorm, SparseMoE
from msa.platform.config import ModelConfig


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)); MLP dense or MoE."""

    def __init__(self, config: ModelConfig, layer: int, sparse: bool, moe: bool) -> None:
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, sparse)
        if moe:
            self.block_sparse_moe = SparseMoE(config)
        else:
            self.mlp = GatedMLP(config, config.intermediate_size)

    @property
    def feed_forward(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        return self.finish(x, self.self_attn.heads(self.input_layernorm(x), batch))

    def finish(self, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The rest of ``forward`` from the attention output ``[T, H, D]`` (before o_proj): the
        residual, the MLP or MoE, and its residual. Token-wise."""
        x = x + self.self_attn.o_proj(attention.flatten(1))
        return x + self.feed_forward(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """Multi-token prediction: h = eh_proj([enorm(embed(next token)); hnorm(hidden)]) -> a sparse MoE
    decoder layer; final_layernorm then the shared lm_head turn it into logits for one more token."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.enorm = GemmaRMSNorm(d, config.rms_norm_eps)
        self.hnorm = GemmaRMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.final_layernorm = GemmaRMSNorm(d, config.rms_norm_eps)
        # The decoder layer's parameters sit directly under this module's prefix, as in the checkpoint.
        self.input_layernorm = GemmaRMSNorm(d, config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(d, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, sparse=True)
        self.block_sparse_moe = SparseMoE(config)

    def forward(
        self, token_embeds: torch.Tensor, hidden: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(hidden)], dim=-1))
        x = x + self.self_attn(self.input_layernorm(x), batch)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class MTPStack(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MTPModule(config, config.num_hidden_layers + j) for j in range(config.num_mtp_modules)
        )


class MiniMaxM3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, config.is_sparse_layer(i), config.is_moe_layer(i))
            for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.num_mtp_modules:
            self.mtp = MTPStack(config)

    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """input_ids ``[T]`` -> final-normed hidden ``[T, hidden]`` (also what MTP module 0 reads)."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, batch)
        return self.norm(x)


@torch.no_grad()
def init_parameter_(
    name: str, p: torch.Tensor, *, std: float = 0.02, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random init of the parameter ``name`` in place: normal weights (``std``), small random norm
    weights, zero correction bias. Returns ``p``."""
    if name.endswith("e_score_correction_bias"):
        return p.zero_()
    return p.normal_(0.0, 0.1 if p.dim() == 1 else std, generator=generator)


class MiniMaxM3ForCausalLM(nn.Module):
    """The text model. ``forward`` runs packed tokens of a batch of sequences described by an
    ``AttentionBatch`` (cache-backed or cache-free) and returns logits of the rows asked for."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MiniMaxM3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Seeded random init (for presets without a checkpoint), by ``init_parameter_``."""
        for name, p in self.named_parameters():
            init_parameter_(name, p, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        batch: AttentionBatch,
        *,
        rows: torch.Tensor | None = None,
        return_hidden: bool = False,
    ):
        """Logits ``[len(rows) or T, vocab]`` fp32 (``rows``: which token rows to project, e.g.
        ``batch.last_token_rows()``); with ``return_hidden`` also the final hidden ``[T, hidden]``."""
        hidden = self.model(input_ids, batch)
        logits = self.logits(hidden, rows)
        return (logits, hidden) if return_hidden else logits

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of the final hidden ``[T, hidden]``, of the rows ``rows`` when given."""
        return self.lm_head(hidden if rows is None else hidden[rows]).float()

    def mtp_logits(
        self,
        module: int,
        next_ids: torch.Tensor,
        hidden: torch.Tensor,
        batch: AttentionBatch,
        *,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module ``module`` on (embedding of the token after each row ``next_ids [T]``, the
        previous stage's hidden ``[T, hidden]``) -> (logits for the token after that, the hidden the
        next module reads)."""
        mtp = self.model.mtp.layers[module]
        out = mtp(self.model.embed_tokens(next_ids), hidden, batch)
        picked = out if rows is None else out[rows]
        return self.lm_head(mtp.final_layernorm(picked)).float(), out
