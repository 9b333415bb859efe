"""Poisson sampling: Binomial batch sizes (mean qN, variance Nq(1-q)), empty batches,
per-example inclusion frequency q, and errors naming the field."""
import math

import pytest
import torch

from lalora.privacy.sampling import ACCOUNTED, poisson_sample, shuffled_fixed_batches

DRAWS = 4000


def _draws(n, q, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [poisson_sample(n, q, g) for _ in range(DRAWS)]


def test_batch_size_is_binomial_and_inclusion_is_uniform():
    n, q = 200, 0.05
    batches = _draws(n, q)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)  # 10, 9.5
    # 5 standard errors: SE(mean) = sqrt(var/D); SE(sample var) ≈ var*sqrt(2/D) (near-normal).
    assert abs(sizes.mean().item() - mean) < 5 * math.sqrt(var / DRAWS)
    assert abs(sizes.var().item() - var) < 5 * var * math.sqrt(2 / DRAWS)
    counts = torch.zeros(n)
    for b in batches:
        assert b.dtype == torch.long
        assert torch.all(b[1:] > b[:-1])  # no duplicates, ascending
        assert len(b) == 0 or (b.min() >= 0 and b.max() < n)
        counts[b] += 1
    # every example's inclusion count ~ Binomial(D, q): all within 5 sd of D*q
    sd = math.sqrt(DRAWS * q * (1 - q))
    assert (counts - DRAWS * q).abs().max() < 5 * sd


def test_empty_batches_happen_at_small_rate():
    n, q = 20, 0.01
    batches = _draws(n, q, seed=1)
    empty = sum(len(b) == 0 for b in batches) / DRAWS
    p_empty = (1 - q) ** n  # 0.818
    assert abs(empty - p_empty) < 5 * math.sqrt(p_empty * (1 - p_empty) / DRAWS)
    e = next(b for b in batches if len(b) == 0)
    assert e.shape == (0,) and e.dtype == torch.long


def test_rate_one_takes_everything_and_seed_reproduces():
    assert torch.equal(poisson_sample(7, 1.0, torch.Generator().manual_seed(0)), torch.arange(7))
    a = poisson_sample(100, 0.3, torch.Generator().manual_seed(5))
    b = poisson_sample(100, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("n, q, field", [
    (10, 0.0, "sample_rate"), (10, -0.1, "sample_rate"), (10, 1.01, "sample_rate"),
    (10, math.nan, "sample_rate"), (10, "x", "sample_rate"),
    (0, 0.5, "num_examples"), (-3, 0.5, "num_examples"), (2.5, 0.5, "num_examples"),
])
def test_bad_input_names_the_field(n, q, field):
    with pytest.raises(ValueError, match=field):
        poisson_sample(n, q, torch.Generator())


def test_shuffled_fixed_batches_is_a_labelled_epoch_partition():
    assert ACCOUNTED == {"poisson": True, "shuffled_fixed": False}
    batches = list(shuffled_fixed_batches(10, 4, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [len(b) for b in shuffled_fixed_batches(10, 4, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError, match="batch_size"):
        list(shuffled_fixed_batches(10, 0))
    with pytest.raises(ValueError, match="num_examples"):
        list(shuffled_fixed_batches(0, 4))
