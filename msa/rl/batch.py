"""Episodes -> training samples -> packed micro-batches for the trainers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msa.rl.algorithms import compute_advantages
from msa.rl.rollout import GroupResult


@dataclass(kw_only=True, slots=True)
class TrainSample:
    """One episode as the trainer sees it: ``input_ids`` = prompt + response; ``loss_mask`` and
    ``old_logprobs`` aligned with it (prompt and observation positions 0); one advantage per episode."""

    input_ids: list[int]
    loss_mask: list[int]
    old_logprobs: list[float]
    advantage: float

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


def to_samples(
    groups: list[GroupResult], algorithm: str, *, normalize_std: bool
) -> tuple[list[TrainSample], torch.Tensor]:
    """Samples in group order and the advantages ``[num_groups, G]`` they got."""
    rewards = torch.tensor([[e.reward for e in g.episodes] for g in groups], dtype=torch.float32)
    advantages = compute_advantages(algorithm, rewards, normalize_std=normalize_std)
    samples = []
    for g, group in enumerate(groups):
        for i, ep in enumerate(group.episodes):
            pad = len(ep.prompt_ids)
            samples.append(
                TrainSample(
                    input_ids=ep.prompt_ids + ep.response_ids,
                    loss_mask=[0] * pad + ep.loss_mask,
                    old_logprobs=[0.0] * pad + ep.logprobs,
                    advantage=float(advantages[g, i]),
                )
            )
    return samples, advantages


def split_for_trainers(
    samples: list[TrainSample], num_trainers: int, grad_accum: int
) -> list[list[list[TrainSample]]]:
    """``[trainer][micro-batch] -> samples``: round-robin, so each trainer and micro-batch gets a
    similar mix of lengths; every trainer gets exactly ``grad_accum`` micro-batches."""
    shards: list[list[list[TrainSample]]] = [[[] for _ in range(grad_accum)] for _ in range(num_trainers)]
    for i, sample in enumerate(samples):
        slot = i % (num_trainers * grad_accum)
        shards[slot % num_trainers][slot // num_trainers].append(sample)
    return shards


@dataclass(slots=True)
class PackedBatch:
    """Samples packed into one row of tokens. ``pred_rows`` ``[N]``: rows whose logits predict a
    trained token; ``targets``/``old_logprobs``/``advantages`` ``[N]`` for those tokens."""

    input_ids: torch.Tensor
    lengths: list[int]
    pred_rows: torch.Tensor
    targets: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor


def pack(samples: list[TrainSample], device: torch.device | str) -> PackedBatch:
    ids, rows, targets, old, adv, lengths = [], [], [], [], [], []
    offset = 0
    for s in samples:
        n = len(s.input_ids)
        for t in range(1, n):
            if s.loss_mask[t]:
                rows.append(offset + t - 1)
                targets.append(s.input_ids[t])
                old.append(s.old_logprobs[t])
                adv.append(s.advantage)
        ids += s.input_ids
        lengths.append(n)
        offset += n
    as_tensor = lambda x, dt: torch.tensor(x, dtype=dt, device=device)
    return PackedBatch(
        as_tensor(ids, torch.long),
        lengths,
        as_tensor(rows, torch.long),
        as_tensor(targets, torch.long),
        as_tensor(old, torch.float32),
        as_tensor(adv, torch.float32),
    )
