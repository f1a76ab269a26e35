"""The batched sampler against a per-row reference: greedy, temperature, top-k, top-p, seeds,
log-probabilities; its uniform numbers and its draws' distribution."""

from __future__ import annotations

import pytest
import torch

from msa.cluster.sampler import SampleRequest, sample


def request(row: int, **kw) -> SampleRequest:
    base = dict(temperature=1.0, top_p=1.0, top_k=0, seed=11, index=0, position=0, num_top_logprobs=None)
    return SampleRequest(row=row, **{**base, **kw})


def reference_token(logits: torch.Tensor, req: SampleRequest) -> int:
    """One row, step by step: scale, cut to the top-k, cut to the top-p nucleus, then walk the
    cumulative probabilities up to the request's uniform number; allowed_token_ids first."""
    if req.allowed_token_ids:
        allowed = torch.full_like(logits, float("-inf"))
        allowed[list(req.allowed_token_ids)] = logits[list(req.allowed_token_ids)]
        logits = allowed
    if req.temperature <= 0:
        return int(torch.argmax(logits))
    scaled = logits.float() / req.temperature
    vocab = scaled.shape[0]
    if 0 < req.top_k < vocab:
        kth = torch.topk(scaled, req.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if req.top_p < 1.0:
        probs, order = torch.sort(torch.softmax(scaled, -1), descending=True)
        before = torch.cumsum(probs, 0) - probs
        scaled = scaled.clone()
        scaled[order[before >= req.top_p]] = float("-inf")
    probs = torch.softmax(scaled, -1).double().tolist()
    target, total = req.uniform() * sum(probs), 0.0
    for token, p in enumerate(probs):
        total += p
        if total > target:
            return token
    return vocab - 1


MIXES = {
    "greedy": [request(0, temperature=0.0)],
    "temperature": [request(0, temperature=0.7, seed=3), request(1, temperature=1.3, seed=4)],
    "top_k": [request(0, top_k=5, seed=5), request(1, top_k=1, seed=6), request(2, top_k=1000, seed=7)],
    "top_p": [request(0, top_p=0.5, seed=8), request(1, top_p=0.9, temperature=0.5, seed=9)],
    "mixed": [
        request(0, temperature=0.0, num_top_logprobs=3),
        request(1, top_k=7, top_p=0.8, seed=10, index=2, position=5, num_top_logprobs=0),
        request(2, seed=12, position=9),
        request(3, temperature=0.0),
        request(4, top_p=0.3, seed=13, num_top_logprobs=5),
    ],
    "allowed": [
        request(0, temperature=0.0, allowed_token_ids=(7, 250, 31), num_top_logprobs=2),
        request(1, seed=14, allowed_token_ids=(4, 5, 6, 200, 201)),
        request(2, seed=15),  # unrestricted beside restricted rows
        request(3, top_k=2, seed=16, allowed_token_ids=(9, 99, 199, 299)),
        request(4, seed=17, allowed_token_ids=(42,)),
    ],
}


@pytest.mark.parametrize("mix", list(MIXES), ids=list(MIXES))
def test_batched_sampler_equals_the_per_row_reference(mix):
    requests = MIXES[mix]
    torch.manual_seed(len(mix))
    logits = torch.randn(len(requests), 300) * 3
    result = sample(logits, requests)
    logprobs = torch.log_softmax(logits, -1)
    for i, req in enumerate(requests):
        token = reference_token(logits[i], req)
        assert result.token_ids[i] == token
        assert result.logprobs[i] == pytest.approx(float(logprobs[i, token]), abs=1e-6)
        if req.num_top_logprobs:
            values, ids = torch.topk(logprobs[i], req.num_top_logprobs)
            assert list(result.top_logprobs[i]) == ids.tolist()
            assert list(result.top_logprobs[i].values()) == pytest.approx(values.tolist(), abs=1e-6)
        else:
            assert result.top_logprobs[i] == ({} if req.num_top_logprobs == 0 else None)


def test_a_draw_depends_on_its_seed_index_and_position_not_on_the_batch():
    torch.manual_seed(0)
    row = torch.randn(1, 500)
    alone = sample(row, [request(0, seed=21, index=1, position=4)]).token_ids[0]
    others = [request(i, seed=100 + i, top_k=3) for i in range(5)]
    batch = torch.cat([torch.randn(2, 500), row, torch.randn(3, 500)])
    mixed = others[:2] + [request(2, seed=21, index=1, position=4)] + others[2:]
    assert sample(batch, mixed).token_ids[2] == alone
    draws = {sample(row, [request(0, seed=21, index=1, position=p)]).token_ids[0] for p in range(40)}
    assert len(draws) > 10  # flat-ish logits: later positions draw other tokens


def test_greedy_ties_go_to_the_lowest_id_and_an_empty_step_samples_nothing():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]])
    assert sample(logits, [request(0, temperature=0.0)]).token_ids == [1]
    empty = sample(torch.zeros(0, 4), [])
    assert empty.token_ids == [] and empty.logprobs == [] and empty.top_logprobs == []


def test_uniform_numbers_are_uniform_and_a_function_of_seed_index_and_position():
    draws = [
        request(0, seed=s, index=i, position=p).uniform()
        for s in range(20)
        for i in range(5)
        for p in range(50)
    ]
    assert all(0.0 < u < 1.0 for u in draws) and len(set(draws)) == len(draws)
    counts = torch.histc(torch.tensor(draws), bins=10, min=0.0, max=1.0)
    assert counts.min() > 400 and counts.max() < 600  # 5000 draws, 500 expected per tenth
    assert (
        request(0, seed=3, index=1, position=2).uniform() == request(5, seed=3, index=1, position=2).uniform()
    )


def test_allowed_token_ids_restrict_the_draw_not_the_reported_logprobs():
    logits = torch.log(torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05]))
    n = 20_000
    requests = [request(i, seed=i, allowed_token_ids=(1, 3)) for i in range(n)]
    result = sample(logits.expand(n, -1), requests)
    freq = torch.bincount(torch.tensor(result.token_ids), minlength=5).float() / n
    torch.testing.assert_close(freq, torch.tensor([0, 0.25 / 0.35, 0, 0.1 / 0.35, 0]), atol=0.015, rtol=0)
    chosen = {t: lp for t, lp in zip(result.token_ids, result.logprobs, strict=True)}
    assert chosen[1] == pytest.approx(float(torch.log(torch.tensor(0.25))), abs=1e-6)  # the model's


def test_draws_follow_the_truncated_distribution():
    logits = torch.log(torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05]))
    n = 20_000
    cases = {
        (1.0, 0): [0.4, 0.25, 0.2, 0.1, 0.05],
        (0.6, 0): [0.4 / 0.65, 0.25 / 0.65, 0, 0, 0],  # 0.4 < 0.6: the nucleus needs two tokens
        (1.0, 3): [0.4 / 0.85, 0.25 / 0.85, 0.2 / 0.85, 0, 0],
    }
    for (top_p, top_k), want in cases.items():
        requests = [request(i, top_p=top_p, top_k=top_k, seed=i) for i in range(n)]
        tokens = torch.tensor(sample(logits.expand(n, -1), requests).token_ids)
        freq = torch.bincount(tokens, minlength=5).float() / n
        torch.testing.assert_close(freq, torch.tensor(want), atol=0.015, rtol=0)
