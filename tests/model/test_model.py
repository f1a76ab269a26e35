"""The MiniMax-M3 network against independent references: dense SDPA, brute-force routing, and
full-forward vs paged incremental decoding."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
import torch.nn.functional as F

from msa.model import MiniMaxM3ForCausalLM, PagedKVCache, build_batch, cache_free_batch
from msa.model.attention import Attention
from msa.model.layers import GemmaRMSNorm, SparseMoE, apply_rope, rope_cos_sin, swiglu_oai
from msa.platform.config import SparseAttentionConfig, tiny


def full_logits(model: MiniMaxM3ForCausalLM, seqs: list[list[int]]) -> list[torch.Tensor]:
    ids = torch.tensor([t for s in seqs for t in s])
    with torch.no_grad():
        logits = model(ids, cache_free_batch([len(s) for s in seqs], model.config.sparse.block_size))
    return list(logits.split([len(s) for s in seqs]))


def test_gemma_rmsnorm_matches_formula():
    norm = GemmaRMSNorm(8, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 8, dtype=torch.float64)
    want = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight.double())
    torch.testing.assert_close(norm(x.float()).double(), want, rtol=1e-5, atol=1e-5)


def test_partial_neox_rope_rotates_first_dims_only():
    x = torch.randn(5, 2, 16)
    pos = torch.tensor([0, 1, 7, 100, 5000])
    cos, sin = rope_cos_sin(pos, 8, 10_000.0)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(y[0], x[0])
    for i in range(4):  # pair (i, i + 4) rotated by pos * theta^(-2i/8)
        ang = pos.double() * 10_000.0 ** (-2 * i / 8)
        a, b = x[..., i].double(), x[..., i + 4].double()
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        torch.testing.assert_close(y[..., i].double(), a * c - b * s, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[..., i + 4].double(), b * c + a * s, rtol=1e-5, atol=1e-5)


def test_swiglu_oai_clamps():
    gate = torch.tensor([-10.0, 0.5, 9.0])
    up = torch.tensor([-9.0, 0.2, 8.0])
    g, u = torch.tensor([-10.0, 0.5, 7.0]), torch.tensor([-7.0, 0.2, 7.0])
    torch.testing.assert_close(swiglu_oai(gate, up, 1.702, 7.0), g * torch.sigmoid(1.702 * g) * (u + 1))


def test_moe_matches_brute_force_routing():
    torch.manual_seed(1)
    config = tiny()
    moe = SparseMoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(9, config.hidden_size)
    out = moe(x)
    for t in range(9):
        s = torch.sigmoid(moe.gate.weight @ x[t])
        chosen = sorted(
            range(config.num_local_experts), key=lambda e: -(s[e] + moe.e_score_correction_bias[e])
        )[:2]
        w = s[chosen] / s[chosen].sum() * config.routed_scaling_factor
        want = sum(w[i] * moe.experts[e](x[t]) for i, e in enumerate(chosen)) + moe.shared_experts(x[t])
        torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-5)


def random_moe(config, seed: int) -> SparseMoE:
    torch.manual_seed(seed)
    moe = SparseMoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


@pytest.mark.parametrize("held", ["all", "second_half"], ids=["all_experts", "expert_parallel_rank"])
def test_stacked_experts_run_grouped_and_equal_the_loop_over_experts(held):
    config = dataclasses.replace(tiny(), num_local_experts=8, num_experts_per_tok=3)
    moe = random_moe(config, 2)
    if held == "second_half":  # as tensor rank 1 of 2 holds them: the rest is another rank's
        moe.experts, moe.expert_offset = torch.nn.ModuleList(list(moe.experts)[4:]), 4
    x = torch.randn(13, config.hidden_size)
    with torch.no_grad():
        looped = moe(x)
        names = [name for name, _ in moe.named_parameters()]
        moe.stack_experts()
        assert [name for name, _ in moe.named_parameters()] == names
        torch.testing.assert_close(moe(x), looped, rtol=1e-5, atol=1e-6)
        w13, _ = moe.stacked
        moe.experts[1].w3.weight.copy_(torch.ones_like(moe.experts[1].w3.weight))  # a weight update
        assert bool((w13[1, config.moe_intermediate_size :] == 1).all())
        grouped = moe(x)
        moe.stacked = None  # the same parameters, one expert at a time
        torch.testing.assert_close(grouped, moe(x), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_stacked_experts_on_the_gpu_in_bf16_match_the_loop():
    config = dataclasses.replace(tiny(), hidden_size=256, moe_intermediate_size=128, num_local_experts=8)
    moe = random_moe(config, 3).to("cuda", torch.bfloat16)
    moe.gate.float()
    moe.e_score_correction_bias.data = moe.e_score_correction_bias.float()
    x = torch.randn(24, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        looped = moe(x).float()
        moe.stack_experts()
        torch.testing.assert_close(moe(x).float(), looped, rtol=2e-2, atol=2e-2)


def dense_gqa_reference(q, k, v, scale):
    """Causal GQA by expanding KV heads and calling torch SDPA: [T, H, D] inputs."""
    group = q.shape[1] // k.shape[1]
    qh, kh, vh = (
        q.transpose(0, 1),
        k.repeat_interleave(group, 1).transpose(0, 1),
        v.repeat_interleave(group, 1).transpose(0, 1),
    )
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale).transpose(0, 1)


@pytest.mark.parametrize("length", [1, 4, 23, 64])
def test_msa_with_topk_covering_all_blocks_is_dense_attention(length):
    """Tolerance: fp32 throughout, 1e-5 absolute/relative."""
    torch.manual_seed(2)
    config = dataclasses.replace(
        tiny(), sparse=SparseAttentionConfig(block_size=4, topk_blocks=16, num_index_heads=2, index_dim=16)
    )
    attn = Attention(config, 1, sparse=True)
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(length, config.hidden_size)
    with torch.no_grad():
        got = attn(x, cache_free_batch([length], 4))
        T, h = length, config.head_dim
        cos, sin = rope_cos_sin(torch.arange(T), config.rotary_dim, config.rope_theta)
        q = apply_rope(attn.q_norm(attn.q_proj(x).view(T, -1, h)), cos, sin)
        k = apply_rope(attn.k_norm(attn.k_proj(x).view(T, -1, h)), cos, sin)
        v = attn.v_proj(x).view(T, -1, h)
        want = attn.o_proj(dense_gqa_reference(q, k, v, 1 / math.sqrt(h)).reshape(T, -1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_selection_is_really_sparse(model):
    """With 4-token blocks and top-4, a 60-token prompt must leave some visible blocks out."""
    attn = model.model.layers[1].self_attn
    captured = []
    original = attn._attend  # returns (out, lse, the selected blocks)
    attn._attend = lambda *a: captured.append(original(*a)) or captured[-1]
    try:
        full_logits(model, [list(range(60))])
    finally:
        del attn._attend
    ids = captured[0][2]
    visible = torch.arange(60) // 4 + 1
    assert bool((visible > 4).any())
    assert torch.equal((ids >= 0).sum(-1).amin(-1), torch.clamp(visible, max=4))


def test_dense_attention_flag_runs_the_msa_layers_as_the_dense_model_does(model):
    """The benchmark's dense side: the same weights with every layer dense (index weights unused)."""
    config = dataclasses.replace(model.config, sparse_attention_freq=[0] * model.config.num_hidden_layers)
    dense = MiniMaxM3ForCausalLM(config).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(".index_" in name for name in unexpected)
    ids = torch.tensor(list(range(60)))
    batch = cache_free_batch([60], config.sparse.block_size)
    with torch.no_grad():
        want = dense(ids, batch)
        got = model(ids, dataclasses.replace(batch, dense_attention=True))
        sparse = model(ids, batch)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(sparse, want, atol=1e-3)


def run_incremental(model, seqs, steps, shuffle_pages=True, forward=None):
    """Feed each sequence in the given step sizes through a paged cache (by ``forward``, default
    the model); return the logits of every fed token per sequence."""
    config = model.config
    bs = config.sparse.block_size
    need = [(len(s) + bs - 1) // bs for s in seqs]
    pool = list(range(sum(need) + 3))
    if shuffle_pages:
        random.Random(0).shuffle(pool)
    tables = [pool[sum(need[:i]) : sum(need[: i + 1])] for i in range(len(seqs))]
    cache = PagedKVCache(config, len(pool), dtype=torch.float32, device="cpu", num_mtp=0)
    for layer_k, layer_v in zip(cache.k, cache.v, strict=True):  # poison: unwritten slots must never be read
        layer_k.fill_(float("nan"))
        layer_v.fill_(float("nan"))
    done = [0] * len(seqs)
    out = [[] for _ in seqs]
    while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
        new = [min(steps(i, done[i]), len(s) - done[i]) for i, s in enumerate(seqs)]
        batch = build_batch(tables, done, new, bs, cache=cache)
        ids = torch.tensor([t for i, s in enumerate(seqs) for t in s[done[i] : done[i] + new[i]]])
        with torch.no_grad():
            logits = (forward or model)(ids, batch)
        for i, part in enumerate(logits.split(new)):
            out[i].append(part)
            done[i] += new[i]
    return [torch.cat(o) for o in out]


SEQS = [list(range(3, 50)), [7, 1] * 15 + [9], list(range(100, 137))]  # 47, 31, 37 tokens: 8-12 blocks each


@pytest.mark.parametrize("mode", ["prefill_then_decode", "chunked_prefill", "mtp_sized_steps"])
def test_paged_incremental_matches_full_forward(model, mode):
    """Tolerance: fp32, 1e-4 on logits."""
    steps = {
        "prefill_then_decode": lambda i, d: [20, 9, 14][i] if d == 0 else 1,
        "chunked_prefill": lambda i, d: 6 if d < 30 else 1,
        "mtp_sized_steps": lambda i, d: 5 if d == 0 else 3,
    }[mode]
    want = full_logits(model, SEQS)
    got = run_incremental(model, SEQS, steps)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_mtp_module_runs_on_cache_and_cache_free(model):
    seq = list(range(10, 40))
    bs = model.config.sparse.block_size
    ids = torch.tensor(seq)
    batch = cache_free_batch([len(seq)], bs)
    with torch.no_grad():
        logits, hidden = model(ids, batch, return_hidden=True)
        nxt = torch.tensor(seq[1:] + [0])
        mtp_free, _ = model.mtp_logits(0, nxt, hidden, batch)
        cache = PagedKVCache(model.config, 8, dtype=torch.float32, device="cpu")
        paged = build_batch([list(range(8))], [0], [len(seq)], bs, cache=cache)
        mtp_paged, _ = model.mtp_logits(0, nxt, hidden, paged)
    assert mtp_free.shape == logits.shape
    torch.testing.assert_close(mtp_paged, mtp_free, rtol=1e-5, atol=1e-5)


def test_cache_free_forward_is_differentiable_and_equal(model):
    seqs = [list(range(5, 30)), list(range(40, 51))]
    ids = torch.tensor([t for s in seqs for t in s])
    batch = cache_free_batch([len(s) for s in seqs], model.config.sparse.block_size)
    with torch.no_grad():
        want = model(ids, batch)
    logits = model(ids, batch)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    logits.logsumexp(-1).mean().backward()
    grad = model.model.layers[1].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
