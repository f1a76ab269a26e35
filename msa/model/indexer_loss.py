"""The MSA indexer's training signal (sparse KL, spec section 4).

For index head g (one per KV group) and query t, over the tokens S_g(t) that the query attends to
(its selected blocks, causal):

- teacher p_T: the mean over the group's query heads of the main attention probabilities over
  S_g(t), with no gradient;
- student p_S: softmax over S_g(t) of ``iq_g(t) . ik(j) / sqrt(index_dim)``.

The loss of a layer is the mean over index heads and queries of KL(p_T || p_S). Only the index
projections and norms receive its gradient: the model computes the index branch from a detached
copy of the layer input, and the teacher is computed without grad. This runs per sequence with
``[heads, L, L]`` score matrices, a cache-free (training) forward's cost.
"""

from __future__ import annotations

import math

import torch

from msa.model.kv_cache import host_bounds


def selected_token_mask(
    block_ids: torch.Tensor | None, length: int, block_size: int, device: torch.device
) -> torch.Tensor:
    """``[G, L, L]`` bool on ``device``: query t of index head g may attend to key j.
    ``block_ids [L, G, K]`` holds each query's selected blocks of this sequence (-1 unused);
    None means every block (then the mask is ``[1, L, L]``)."""
    pos = torch.arange(length, device=device)
    causal = pos[None, :] <= pos[:, None]  # [t, j]
    if block_ids is None:
        return causal[None]
    num_blocks = (length + block_size - 1) // block_size
    slots = torch.where(block_ids >= 0, block_ids, num_blocks).long().to(device)  # -1 -> a spare column
    chosen = torch.zeros(length, block_ids.shape[1], num_blocks + 1, dtype=torch.bool, device=device)
    chosen.scatter_(2, slots, True)
    by_token = chosen[:, :, :num_blocks][:, :, pos // block_size]  # [t, G, j]
    return by_token.permute(1, 0, 2) & causal[None]


def indexer_kl(
    q: torch.Tensor,
    k: torch.Tensor,
    index_q: torch.Tensor,
    index_k: torch.Tensor,
    cu_seqlens: torch.Tensor | list[int],
    block_ids: torch.Tensor | None,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """One layer's loss: the mean of KL(p_T || p_S) over index heads and queries of every sequence.

    q ``[T, H, d]`` and k ``[T, G, d]``: the main queries and keys after norm and RoPE (only read);
    index_q ``[T, G, di]``, index_k ``[T, di]``; cu_seqlens ``[B+1]`` (host ints spare a device
    read); block_ids ``[T, G, K]`` (sequence-relative block ids, -1 unused) or None when every query
    attends to all it sees; scale: the main attention's softmax scale.
    """
    num_groups, per_group = k.shape[1], q.shape[1] // k.shape[1]
    if index_q.shape[1] != num_groups:
        raise ValueError(
            f"index_q has {index_q.shape[1]} index heads, but the layer has {num_groups} KV groups"
        )
    index_scale = 1.0 / math.sqrt(index_q.shape[-1])
    total = index_q.new_zeros((), dtype=torch.float32)
    count = 0
    bounds = host_bounds(cu_seqlens)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        length = end - start
        if length == 0:
            continue
        ids = block_ids[start:end] if block_ids is not None else None
        allowed = selected_token_mask(ids, length, block_size, q.device)  # [G or 1, t, j]
        with torch.no_grad():
            qs = q[start:end].float().view(length, num_groups, per_group, -1)
            logits = torch.einsum("tgpd,jgd->gptj", qs, k[start:end].float()) * scale
            logits = logits.masked_fill(~allowed[:, None], float("-inf"))
            teacher = torch.softmax(logits, dim=-1).mean(dim=1)  # [G, t, j]
            log_teacher = torch.log(teacher.clamp_min(torch.finfo(torch.float32).tiny))
        student = torch.einsum("tgd,jd->gtj", index_q[start:end].float(), index_k[start:end].float())
        log_student = torch.log_softmax(student.mul(index_scale).masked_fill(~allowed, float("-inf")), -1)
        log_student = log_student.masked_fill(~allowed, 0.0)  # outside S: no term, no gradient
        total = total + (teacher * (log_teacher - log_student)).sum()
        count += num_groups * length
    return total / max(count, 1)
