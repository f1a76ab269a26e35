"""Advantage and loss math against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from msa.rl.algorithms import grpo_advantages, kl_k3, policy_loss_sums, reinforce_pp_advantages
from msa.rl.batch import TrainSample, pack, split_for_trainers


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv = grpo_advantages(rewards)
    # group 0: mean 0.5, unbiased std sqrt(((0.5^2) * 4) / 3) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6))
    assert torch.equal(adv[1], torch.zeros(4))  # equal rewards teach nothing
    torch.testing.assert_close(
        grpo_advantages(rewards, normalize_std=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5])
    )


def brute_force_grpo(group: list[float], normalize_std: bool) -> list[float]:
    mean = sum(group) / len(group)
    std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
    return [(r - mean) / (std + 1e-6) if normalize_std else r - mean for r in group]


@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_gives_exactly_zero_to_groups_of_equal_rewards(normalize_std):
    groups = [[1 / 3] * 8, [0.7] * 8, [0.1] * 8, [1.0, 0.0, 1 / 3, 0.7, 0.1, 0.25, 0.9, 0.5]]
    # the brute force takes the fp32 rewards the rollout hands over
    rewards = torch.tensor(groups, dtype=torch.float32)
    adv = grpo_advantages(rewards, normalize_std=normalize_std)
    assert adv.dtype == torch.float32
    assert torch.equal(adv[:3], torch.zeros(3, 8))
    expected = brute_force_grpo(rewards[3].tolist(), normalize_std)
    torch.testing.assert_close(adv[3], torch.tensor(expected), rtol=0, atol=1e-6)


def test_reinforce_pp_gives_zero_to_a_batch_of_equal_rewards():
    assert torch.equal(reinforce_pp_advantages(torch.full((2, 8), 1 / 3)), torch.zeros(2, 8))


def test_reinforce_pp_whitens_over_the_batch():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    adv = reinforce_pp_advantages(rewards)
    std = math.sqrt(((0.75**2) + 3 * (0.25**2)) / 3)
    torch.testing.assert_close(adv, torch.tensor([[0.75, -0.25], [-0.25, -0.25]]) / (std + 1e-6))


def test_k3_by_hand():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    d = -0.5
    torch.testing.assert_close(kl_k3(lp, ref), torch.tensor([math.exp(d) - d - 1, 0.0]))


def test_clipped_loss_by_hand():
    old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.8, 0.3, 0.8, 0.55]))  # ratios 1.6, 0.6, 1.6, 1.1
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    mask = torch.tensor([1, 1, 1, 0])
    new.requires_grad_(True)
    terms = policy_loss_sums(new, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # token 0: A>0, ratio 1.6 -> clipped at 1.2: -1.2 (no gradient)
    # token 1: A<0, ratio 0.6 -> min(-0.6, -0.8) = -0.8 clipped: +0.8 (no gradient)
    # token 2: A<0, ratio 1.6 -> min(-1.6, -1.2) = -1.6 unclipped: +1.6 (gradient ratio * -A = 1.6)
    # token 3: masked out
    assert float(terms.loss.detach()) == pytest.approx(-1.2 + 0.8 + 1.6, abs=1e-6)
    assert float(terms.clipped) == 2.0
    assert float(terms.ratio) == pytest.approx(1.6 + 0.6 + 1.6, abs=1e-6)
    terms.loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([0.0, 0.0, 1.6, 0.0]))


def test_kl_term_adds_to_the_loss_with_its_coefficient():
    lp = torch.tensor([-1.0, -1.0])
    ref = torch.tensor([-1.5, -0.5])
    base = policy_loss_sums(lp, lp, torch.zeros(2), torch.ones(2), clip_low=0.2, clip_high=0.2)
    with_kl = policy_loss_sums(
        lp, lp, torch.zeros(2), torch.ones(2), clip_low=0.2, clip_high=0.2, kl_coef=0.1, ref_logprobs=ref
    )
    want = 0.1 * float(kl_k3(lp, ref).sum())
    assert float(with_kl.loss - base.loss) == pytest.approx(want, rel=1e-6)


def test_pack_predicts_only_masked_tokens_from_the_previous_row():
    a = TrainSample(
        input_ids=[5, 6, 7, 8], loss_mask=[0, 0, 1, 1], old_logprobs=[0, 0, -1.0, -2.0], advantage=0.5
    )
    b = TrainSample(input_ids=[9, 10, 11], loss_mask=[0, 1, 0], old_logprobs=[0, -3.0, 0], advantage=-1.0)
    batch = pack([a, b], "cpu")
    assert batch.lengths == [4, 3]
    assert batch.pred_rows.tolist() == [1, 2, 4]  # row t predicts token t + 1
    assert batch.targets.tolist() == [7, 8, 10]
    assert batch.old_logprobs.tolist() == [-1.0, -2.0, -3.0]
    assert batch.advantages.tolist() == [0.5, 0.5, -1.0]


def test_split_gives_every_trainer_its_micro_batches():
    samples = [
        TrainSample(input_ids=[i, i], loss_mask=[0, 1], old_logprobs=[0, 0], advantage=0.0) for i in range(8)
    ]
    shards = split_for_trainers(samples, num_trainers=2, grad_accum=2)
    assert [[len(m) for m in t] for t in shards] == [[2, 2], [2, 2]]
    seen = sorted(s.input_ids[0] for t in shards for m in t for s in m)
    assert seen == list(range(8))
