"""Partitions: determinism, coverage, no empty clients, and Dirichlet concentration (statistical)."""
import numpy as np
import pytest

from lalora.tasks import label_histograms, partition

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 10 balanced classes
SCHEMES = ["dirichlet-released", "dirichlet-per-class", "iid"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_split_other_seed_other_split(scheme):
    a = partition(LABELS, 8, scheme, beta=0.5, seed=3)
    b = partition(LABELS, 8, scheme, beta=0.5, seed=3)
    c = partition(LABELS, 8, scheme, beta=0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("scheme", ["dirichlet-per-class", "iid"])
@pytest.mark.parametrize("beta", [0.05, 1.0, 100.0])
def test_every_sample_exactly_once(scheme, beta):
    parts = partition(LABELS, 8, scheme, beta=beta, seed=0)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(LABELS)
    assert np.array_equal(np.sort(allidx), np.arange(len(LABELS)))
    assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize("beta", [0.05, 0.5, 100.0])
def test_released_scheme_disjoint_fixed_size(beta):
    parts = partition(LABELS, 8, "dirichlet-released", beta=beta, seed=1)
    assert [len(p) for p in parts] == [125] * 8
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # renormalize mode: no duplicates
    parts = partition(LABELS, 8, "dirichlet-released", beta=beta, seed=1, samples_per_client=60)
    assert [len(p) for p in parts] == [60] * 8


def test_released_scheme_refill_may_duplicate_and_too_many_raises():
    parts = partition(LABELS, 8, "dirichlet-released", beta=0.1, seed=0, samples_per_client=400,
                      when_pool_empty="refill")
    assert [len(p) for p in parts] == [400] * 8
    assert len(np.unique(np.concatenate(parts))) < 3200  # 3,200 draws from 1,000 samples
    with pytest.raises(ValueError, match="samples_per_client"):
        partition(LABELS, 8, "dirichlet-released", beta=0.1, seed=0, samples_per_client=400)


def _mean_entropy(hist):
    p = hist / hist.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return h.mean()


@pytest.mark.parametrize("scheme", ["dirichlet-released", "dirichlet-per-class"])
def test_beta_controls_concentration(scheme):
    """beta=100: per-client label entropy close to log(10) and max-class share near 1/10;
    beta=0.1: most of each client's mass on few classes. Averaged over 5 seeds."""
    hi, lo, share_hi, share_lo = [], [], [], []
    for seed in range(5):
        for beta, ent, share in ((100.0, hi, share_hi), (0.1, lo, share_lo)):
            parts = partition(LABELS, 8, scheme, beta=beta, seed=seed)
            h = label_histograms(LABELS, parts, 10)
            ent.append(_mean_entropy(h))
            share.append((h.max(1) / h.sum(1)).mean())
    log10 = np.log(10)
    assert np.mean(hi) > 0.95 * log10, np.mean(hi)
    assert np.mean(share_hi) < 0.2, np.mean(share_hi)
    assert np.mean(lo) < 0.6 * log10, np.mean(lo)
    assert np.mean(share_lo) > 0.4, np.mean(share_lo)


def test_label_histograms_counts():
    labels = np.array([0, 1, 1, 2, 2, 2])
    h = label_histograms(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert h.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]
    with pytest.raises(ValueError, match="num_classes"):
        label_histograms(labels, [np.arange(6)], 2)


def test_no_empty_client_per_class_resamples_or_raises():
    # 12 samples, 6 clients, beta 0.5: most single draws leave some client empty; the scheme
    # redraws until none is. With beta 0.01 and 10 clients no draw succeeds: a clear error.
    labels = np.repeat(np.arange(3), 4)
    for seed in range(10):
        parts = partition(labels, 6, "dirichlet-per-class", beta=0.5, seed=seed)
        assert min(len(p) for p in parts) >= 1
        assert sum(len(p) for p in parts) == 12
    with pytest.raises(ValueError, match="min_samples"):
        partition(labels, 10, "dirichlet-per-class", beta=0.01, seed=0, max_redraws=50)


@pytest.mark.parametrize("kw,field", [
    (dict(num_clients=0), "num_clients"), (dict(num_clients=2000), "num_clients"),
    (dict(scheme="nope"), "scheme"), (dict(beta=0.0), "beta"), (dict(beta=float("nan")), "beta"),
])
def test_bad_input_names_field(kw, field):
    args = dict(num_clients=4, scheme="dirichlet-per-class", beta=0.5, seed=0) | kw
    with pytest.raises(ValueError, match=field):
        partition(LABELS, **args)


@pytest.mark.parametrize("scheme", ["dirichlet-per-class", "iid"])
def test_samples_per_client_is_refused_by_the_schemes_that_split_every_sample(scheme):
    # it used to be ignored silently: a run asking for 50 per client got ~125
    with pytest.raises(ValueError, match="samples_per_client applies only to scheme 'dirichlet-released'"):
        partition(LABELS, 8, scheme, beta=0.5, seed=0, samples_per_client=50)


def test_run_config_samples_per_client_only_with_the_released_partition():
    from lalora.config import RunConfig

    with pytest.raises(ValueError, match="samples_per_client applies only to partition 'dirichlet-released'"):
        RunConfig(task="digits", method="dp-lora", partition="iid", samples_per_client=50)
    # a task's default (the released scheme's 500 per client) is dropped for another scheme, not an error
    cfg = RunConfig(task="digits", method="dp-lora", partition="iid").resolve({"samples_per_client": 500})
    assert cfg.samples_per_client is None and cfg.partition == "iid"
    # ... and kept for the released scheme
    assert RunConfig(task="digits", method="dp-lora").resolve({"samples_per_client": 500}).samples_per_client == 500
    # an explicit value with a task whose default scheme is another one: the error, not a silent drop
    with pytest.raises(ValueError, match="samples_per_client applies only"):
        RunConfig(task="digits", method="dp-lora", samples_per_client=50).resolve({"partition": "dirichlet-per-class"})
