"""LLaDA's Monte-Carlo likelihood (dllm_decode.harness.likelihood) against independent
computations: a direct per-sample loop over the same masks, the exact log-probability when the
continuation is one token, and the exact ELBO by enumerating every mask set."""

import itertools
import math

import pytest
import torch

from dllm_decode.harness.likelihood import (is_greedy, mc_loglikelihood, random_masks, stratified_counts,
                                            weighted_masked_nll)
from dllm_decode.models import build_random_model


@pytest.fixture(scope="module")
def model():
    return build_random_model("llada", vocab_size=40, d_model=32, n_layers=2, n_heads=4, seed=3)


MASK = 39          # build_random_model: mask id = V - 1


def _logp(model, x, pos, token):
    """log p(token at pos | x), from a single-row forward and an explicit softmax."""
    logits = model(torch.tensor([x]))[0, pos].double()
    return float(logits[token] - torch.logsumexp(logits, 0))


def test_stratified_counts_cover_the_cycle():
    g = torch.Generator().manual_seed(0)
    for T, n in [(7, 7), (10, 5), (3, 12), (1, 4)]:
        for _ in range(20):
            c = stratified_counts(T, n, g)
            assert c.shape == (n,) and int(c.min()) >= 1 and int(c.max()) <= T
            if n == T:
                assert sorted(c.tolist()) == list(range(1, T + 1))      # one of each ratio


def test_random_masks_have_the_counts_and_are_uniform():
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([1, 2, 3, 4] * 500)
    masks = random_masks(counts, 6, g)
    assert masks.sum(1).tolist() == counts.tolist()
    # each position is masked with probability l / T, whatever its index
    for l in (1, 2, 3, 4):
        freq = masks[counts == l].float().mean(0)
        assert torch.allclose(freq, torch.full((6,), l / 6), atol=0.07), (l, freq)


def test_batched_estimate_equals_a_per_sample_loop(model):
    ctx, cont = [5, 6, 7, 8], [9, 10, 11, 12, 13]
    T = len(cont)
    got = mc_loglikelihood(model, ctx, cont, mask_id=MASK, mc_num=12, mc_batch=4,
                           generator=torch.Generator().manual_seed(7))
    # the same draws, replayed, scored one sample and one position at a time
    g = torch.Generator().manual_seed(7)
    total = 0.0
    for _ in range(3):
        masks = random_masks(stratified_counts(T, 4, g), T, g)
        for row in masks.tolist():
            x = ctx + [MASK if m else t for t, m in zip(cont, row)]
            nll = -sum(_logp(model, x, len(ctx) + i, cont[i]) for i in range(T) if row[i])
            total += nll * T / sum(row)
    assert got == pytest.approx(-total / 12, rel=1e-5)


def test_one_token_continuation_is_exact(model):
    ctx = [5, 17, 22]
    for tok in (3, 30):
        got = mc_loglikelihood(model, ctx, [tok], mask_id=MASK, mc_num=8, mc_batch=4,
                               generator=torch.Generator().manual_seed(0))
        assert got == pytest.approx(_logp(model, ctx + [MASK], 3, tok), rel=1e-5)


def test_estimate_converges_to_the_enumerated_elbo(model):
    ctx, cont = [5, 6], [20, 21, 22]
    T = len(cont)
    elbo = 0.0
    for l in range(1, T + 1):                   # l uniform on 1..T, then a uniform l-subset
        subsets = list(itertools.combinations(range(T), l))
        for s in subsets:
            x = ctx + [MASK if i in s else t for i, t in enumerate(cont)]
            ll = sum(_logp(model, x, len(ctx) + i, cont[i]) for i in s)
            elbo += (T / l) * ll / len(subsets) / T
    est = mc_loglikelihood(model, ctx, cont, mask_id=MASK, mc_num=600, mc_batch=3,
                           generator=torch.Generator().manual_seed(11))
    assert est == pytest.approx(elbo, rel=0.03)
    assert est < 0


def test_weighted_nll_weights_by_the_inverse_ratio(model):
    seq = torch.tensor([5, 6, 20, 21])
    masks = torch.tensor([[True, False], [True, True]])
    w = weighted_masked_nll(model, seq, 2, masks, MASK)
    assert w[0] == pytest.approx(-2 * _logp(model, [5, 6, MASK, 21], 2, 20), rel=1e-5)
    both = _logp(model, [5, 6, MASK, MASK], 2, 20) + _logp(model, [5, 6, MASK, MASK], 3, 21)
    assert w[1] == pytest.approx(-both, rel=1e-5)


def _greedy_parallel(model, ctx, T):
    logits = model(torch.tensor([ctx + [MASK] * T]))[0, len(ctx):]
    logits[:, MASK] = -math.inf
    return logits.argmax(-1).tolist()


def _greedy_iterative(model, ctx, T):
    x = ctx + [MASK] * T
    for _ in range(T):
        probs = torch.softmax(model(torch.tensor([x]))[0].double(), -1)
        probs[:, MASK] = 0
        best = max((float(probs[p].max()), p) for p in range(len(ctx), len(x)) if x[p] == MASK)[1]
        x[best] = int(probs[best].argmax())
    return x[len(ctx):]


@pytest.mark.parametrize("mode, decode", [("parallel", _greedy_parallel), ("iterative", _greedy_iterative)])
def test_is_greedy(model, mode, decode):
    ctx = [7, 8, 9]
    answer = decode(model, ctx, 4)
    assert is_greedy(model, ctx, answer, mask_id=MASK, mode=mode)
    other = answer[:-1] + [(answer[-1] + 1) % MASK]
    assert not is_greedy(model, ctx, other, mask_id=MASK, mode=mode)
    assert not is_greedy(model, ctx, answer, mask_id=MASK, mode="off")
