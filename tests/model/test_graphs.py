"""The piecewise forward (token-wise pieces over static buffers, attention eagerly between them):
on a CPU its pieces run eagerly and must give the model's own logits for steps padded up to a
captured size; on a GPU the captured graphs must replay exactly what the pieces compute."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from msa.model import MiniMaxM3ForCausalLM, PagedKVCache, build_batch, cache_free_batch
from msa.model.graphs import PiecewiseForward, capture_sizes, uncapturable_reason
from msa.platform.config import tiny
from tests.model.test_model import SEQS, full_logits, run_incremental


def test_capture_sizes_pad_like_vllm():
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(0) == []
    # Past 256 tokens (prefill steps), every multiple of 16.
    assert capture_sizes(512) == [1, 2, 4, *range(8, 257, 8), *range(272, 513, 16)]
    assert capture_sizes(300)[-4:] == [256, 272, 288, 300]


@pytest.mark.parametrize("mode", ["prefill_then_decode", "chunked_prefill"])
def test_pieces_padded_to_a_captured_size_give_the_models_logits(model, mode):
    """Steps of 43, 18 and 3 tokens run on 48, 24 and 4 rows; the padding rows hold whatever the
    buffers had, and the real rows must not see them."""
    steps = {
        "prefill_then_decode": lambda i, d: [20, 9, 14][i] if d == 0 else 1,
        "chunked_prefill": lambda i, d: 6 if d < 30 else 1,
    }[mode]
    pieces = PiecewiseForward(model, capture_sizes(48))
    pieces.x.normal_()  # stale rows: garbage the padding must keep to itself
    want = full_logits(model, SEQS)
    got = run_incremental(model, SEQS, steps, forward=pieces)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_pieces_take_rows_and_the_dense_attention_flag(model):
    config = model.config
    bs = config.sparse.block_size
    cache = PagedKVCache(config, 40, dtype=torch.float32, device="cpu", num_mtp=0)
    tables = [list(range(0, 15)), list(range(15, 30))]
    ids = torch.tensor(list(range(50)) + list(range(100, 130)))
    pieces = PiecewiseForward(model, [8, 96])
    for dense in (False, True):
        batch = dataclasses.replace(
            build_batch(tables, [0, 0], [50, 30], bs, cache=cache), dense_attention=dense
        )
        rows = batch.last_token_rows()
        with torch.no_grad():
            want = model(ids, batch, rows=rows)
            got = pieces(ids, batch, rows)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.shape == (2, config.vocab_size)


def test_a_step_larger_than_the_pieces_is_refused(model):
    pieces = PiecewiseForward(model, [1, 2, 4])
    batch = cache_free_batch([5], model.config.sparse.block_size)
    with pytest.raises(ValueError, match="5 tokens"):
        pieces(torch.arange(5), batch)
    with pytest.raises(ValueError, match="positive"):
        PiecewiseForward(model, [0, 4])


def test_a_cpu_model_is_not_captured(model):
    assert uncapturable_reason(model) == "the model is not on a GPU"


def gpu_model(dtype: torch.dtype = torch.bfloat16) -> MiniMaxM3ForCausalLM:
    torch.manual_seed(0)
    m = MiniMaxM3ForCausalLM(tiny()).eval()
    m.to("cuda", dtype)
    for layer in m.model.layers:
        if hasattr(layer, "block_sparse_moe"):
            moe = layer.block_sparse_moe
            moe.gate.float()
            moe.e_score_correction_bias.data = moe.e_score_correction_bias.float()
            moe.stack_experts()
    return m


def gpu_steps(config):
    """A prefill of three sequences, then decode steps: (ids, batch) per step."""
    bs = config.sparse.block_size
    cache = PagedKVCache(config, 64, dtype=torch.bfloat16, device="cuda", num_mtp=0)
    tables = [list(range(i * 20, i * 20 + 20)) for i in range(3)]
    lengths, steps, gen = [0, 0, 0], [], torch.Generator().manual_seed(0)
    for new in ([21, 9, 14], [1, 1, 1], [1, 1, 1], [3, 1, 2]):
        ids = torch.randint(0, config.vocab_size, (sum(new),), generator=gen).cuda()
        steps.append((ids, build_batch(tables, list(lengths), new, bs, device="cuda", cache=cache)))
        lengths = [a + b for a, b in zip(lengths, new, strict=True)]
    return steps


@pytest.mark.gpu
def test_captured_graphs_replay_the_pieces_exactly_and_follow_weight_updates():
    net = gpu_model()
    assert uncapturable_reason(net) is None
    eager, graphed = PiecewiseForward(net, capture_sizes(48)), PiecewiseForward(net, capture_sizes(48))
    graphed.capture()
    assert graphed.captured and not eager.captured

    def run(forward):  # the same steps into the same cache: the second pass rewrites what the first wrote
        return [forward(ids, batch) for ids, batch in gpu_steps(net.config)]

    want, got = run(eager), run(graphed)
    with torch.no_grad():
        reference = [net(ids, batch) for ids, batch in gpu_steps(net.config)]
    for g, w, r in zip(got, want, reference, strict=True):
        assert torch.equal(g, w)
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2)
    with torch.no_grad():  # an in-place weight update (what the engine's weight sync does)
        net.model.layers[2].self_attn.q_proj.weight.mul_(-1.5)
        net.model.layers[3].block_sparse_moe.experts[0].w2.weight.mul_(2.0)
    updated, updated_want = run(graphed), run(eager)
    for u, w, old in zip(updated, updated_want, got, strict=True):
        assert torch.equal(u, w)
        assert not torch.equal(u, old)


@pytest.mark.gpu
def test_an_fp32_moe_model_is_left_eager():
    net = gpu_model(torch.float32)
    assert "grouped matmuls" in uncapturable_reason(net)
