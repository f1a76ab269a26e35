"""The indexer's sparse-KL loss against a brute-force computation, and that it trains only the
index branch of the MSA layers."""

from __future__ import annotations

import math

import pytest
import torch

from msa.model import MiniMaxM3ForCausalLM, cache_free_batch
from msa.model.indexer_loss import indexer_kl
from msa.platform.config import tiny


def brute_force_kl(q, k, iq, ik, lengths, block_ids, block_size, scale) -> float:
    """Mean over (sequence, index head, query) of KL(p_T || p_S), one query at a time."""
    heads, groups = q.shape[1], k.shape[1]
    per = heads // groups
    terms, start = [], 0
    for n in lengths:
        for g in range(groups):
            for t in range(n):
                if block_ids is None:
                    blocks = set(range(t // block_size + 1))
                else:
                    blocks = {int(b) for b in block_ids[start + t, g] if b >= 0}
                keys = [j for j in range(t + 1) if j // block_size in blocks]
                teacher = torch.zeros(len(keys), dtype=torch.float64)
                for h in range(g * per, (g + 1) * per):
                    s = torch.stack([q[start + t, h].double() @ k[start + j, g].double() for j in keys])
                    teacher += torch.softmax(s * scale, 0) / per
                s = torch.stack([iq[start + t, g].double() @ ik[start + j].double() for j in keys])
                log_student = torch.log_softmax(s / math.sqrt(iq.shape[-1]), 0)
                terms.append(float((teacher * (teacher.log() - log_student)).sum()))
        start += n
    return sum(terms) / len(terms)


def random_selection(lengths: list[int], groups: int, topk: int, block_size: int, gen) -> torch.Tensor:
    """Per query: the local block, up to topk - 1 random earlier blocks, -1 after."""
    rows = []
    for n in lengths:
        for t in range(n):
            local = t // block_size
            for _ in range(groups):
                earlier = torch.randperm(local, generator=gen)[: topk - 1].tolist() if local else []
                picks = sorted(earlier) + [local]
                rows.append(picks + [-1] * (topk - len(picks)))
    return torch.tensor(rows, dtype=torch.int32).view(sum(lengths), groups, topk)


@pytest.mark.parametrize("selected", [True, False])
def test_indexer_kl_matches_brute_force(selected):
    gen = torch.Generator().manual_seed(0)
    lengths, heads, groups, d, di, block_size, topk = [13, 6], 4, 2, 8, 4, 3, 3
    T = sum(lengths)
    q, k = torch.randn(T, heads, d, generator=gen), torch.randn(T, groups, d, generator=gen)
    iq, ik = torch.randn(T, groups, di, generator=gen), torch.randn(T, di, generator=gen)
    block_ids = random_selection(lengths, groups, topk, block_size, gen) if selected else None
    cu = torch.tensor([0, lengths[0], T], dtype=torch.int32)
    got = indexer_kl(q, k, iq, ik, cu, block_ids, block_size, scale=0.3)
    want = brute_force_kl(q, k, iq, ik, lengths, block_ids, block_size, scale=0.3)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert want > 0.01  # random index scores are far from the attention


def test_indexer_kl_is_zero_when_the_index_scores_equal_the_attention_logits():
    # One query head per group and the index query/key equal to the main ones, scaled alike.
    gen = torch.Generator().manual_seed(1)
    T, groups, d = 10, 2, 4
    q, k = torch.randn(T, groups, d, generator=gen), torch.randn(T, groups, d, generator=gen)
    k[:, 1] = k[:, 0]  # the single index key is shared by the index heads
    cu = torch.tensor([0, T], dtype=torch.int32)
    loss = indexer_kl(q, k, q, k[:, 0], cu, None, block_size=4, scale=1.0 / math.sqrt(d))
    assert abs(loss.item()) < 1e-6


def test_model_collects_one_loss_per_msa_layer_and_it_trains_only_the_index_branch():
    torch.manual_seed(0)
    model = MiniMaxM3ForCausalLM(tiny())
    config = model.config
    lengths = [30, 23]  # longer than top-k x block: the selection is really sparse
    ids = torch.randint(0, config.vocab_size, (sum(lengths),))
    batch = cache_free_batch(lengths, config.sparse.block_size)
    batch.indexer_losses = []
    model(ids, batch)
    assert len(batch.indexer_losses) == sum(config.sparse_attention_freq)
    loss = torch.stack(batch.indexer_losses).sum()
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    index_parts = ("index_q_proj", "index_k_proj", "index_q_norm", "index_k_norm")
    for name, param in model.named_parameters():
        has_grad = param.grad is not None and param.grad.abs().sum().item() > 0
        in_forward = not name.startswith("model.mtp.")  # the MTP module is not part of this forward
        assert has_grad == (in_forward and any(part in name for part in index_parts)), name


def test_training_the_index_branch_lowers_the_loss():
    torch.manual_seed(0)
    model = MiniMaxM3ForCausalLM(tiny())
    lengths = [30, 23]
    ids = torch.randint(0, model.config.vocab_size, (sum(lengths),))
    index_params = [p for n, p in model.named_parameters() if ".index_" in n]
    optimizer = torch.optim.Adam(index_params, lr=1e-2)

    def step() -> float:
        batch = cache_free_batch(lengths, model.config.sparse.block_size)
        batch.indexer_losses = []
        model(ids, batch)
        loss = torch.stack(batch.indexer_losses).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    first = step()
    for _ in range(30):
        last = step()
    assert last < 0.5 * first, (first, last)
