"""Seeded splits of a training set across federated clients (SPEC §4), and label histograms.

Three schemes, all driven by one ``numpy.random.Generator(seed)`` so the same seed gives the
same split:

``dirichlet-released`` -- the authors' released code (``dirichlet_data.py::data_from_dirichlet``):
    client j draws class proportions p_j ~ Dir(β·1_C), then ``samples_per_client`` labels from
    p_j, taking each sample from that class's pool (the class's indices in a seeded random
    order). What happens when a pool runs dry is the ``when_pool_empty`` argument:

    * ``"renormalize"`` (default): the empty class is removed from p_j (p_j is renormalised over
      the classes that still have samples; if p_j has no mass left on them, the client draws
      uniformly over them). Every sample goes to at most one client, so sample-level DP per
      client is sound. Needs ``num_clients * samples_per_client <= len(labels)``.
    * ``"refill"``: the released code's behaviour -- the pool is refilled with a fresh
      permutation of its class, so a sample can land on several clients (and twice on one).
      Only for reproducing the released code; a duplicated sample is exposed on each client.

    ``samples_per_client`` defaults to ``len(labels) // num_clients``. Clients are never empty
    (each gets exactly ``samples_per_client >= 1`` samples). It is this scheme's parameter only: the
    other two split every sample, and passing it to them raises instead of being ignored.

``dirichlet-per-class`` -- each class's samples are split across the clients by proportions
    q_c ~ Dir(β·1_K). Every sample goes to exactly one client. A client with fewer than
    ``min_samples`` (default 1) samples triggers a redraw of the whole split from the same
    generator (deterministic), up to ``max_redraws`` times, after which ValueError is raised.

``iid`` -- a seeded permutation cut into ``num_clients`` near-equal parts.
"""
from __future__ import annotations

import numpy as np

SCHEMES = ("dirichlet-released", "dirichlet-per-class", "iid")


def check_samples_per_client(scheme: str, samples_per_client, scheme_field: str = "scheme") -> None:
    """samples_per_client is dirichlet-released's parameter: the other schemes split every sample, so a
    value given with them would be ignored. Raises naming both fields (RunConfig calls its field
    ``partition``)."""
    if samples_per_client is not None and scheme != "dirichlet-released":
        raise ValueError(f"samples_per_client applies only to {scheme_field} 'dirichlet-released' (the other "
                         f"schemes split every sample); got samples_per_client={samples_per_client!r} with "
                         f"{scheme_field}={scheme!r}")


def _check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("labels must be non-negative integers")
    return labels.astype(np.int64)


def partition(
    labels,
    num_clients: int,
    scheme: str = "dirichlet-released",
    beta: float = 0.1,
    seed: int = 0,
    samples_per_client: int | None = None,
    *,
    when_pool_empty: str = "renormalize",
    min_samples: int = 1,
    max_redraws: int = 1000,
) -> list[np.ndarray]:
    """Indices (into ``labels``) of each client's samples; a list of ``num_clients`` int64 arrays."""
    labels = _check_labels(labels)
    n = len(labels)
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive int, got {num_clients!r}")
    if num_clients > n:
        raise ValueError(f"num_clients={num_clients} exceeds the number of samples {n}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not one of {SCHEMES}")
    check_samples_per_client(scheme, samples_per_client)
    if scheme != "iid" and not (np.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), num_clients)]
    if scheme == "dirichlet-per-class":
        return _dirichlet_per_class(labels, num_clients, beta, rng, min_samples, max_redraws)
    return _dirichlet_released(labels, num_clients, beta, rng, samples_per_client, when_pool_empty)


def _dirichlet_per_class(labels, k, beta, rng, min_samples, max_redraws):
    if min_samples < 0 or min_samples * k > len(labels):
        raise ValueError(f"min_samples={min_samples} is impossible for {len(labels)} samples and {k} clients")
    classes = np.unique(labels)
    for _ in range(max_redraws + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            q = rng.dirichlet(np.full(k, beta))
            cuts = np.round(np.cumsum(q) * len(idx)).astype(int)
            cuts[-1] = len(idx)  # rounding must not drop the tail
            for j, chunk in enumerate(np.split(idx, cuts[:-1])):
                parts[j].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_samples:
            return out
    raise ValueError(
        f"dirichlet-per-class: no split with every client >= min_samples={min_samples} after "
        f"{max_redraws} redraws (beta={beta}, {k} clients, {len(labels)} samples); raise beta "
        "or lower num_clients"
    )


def _dirichlet_released(labels, k, beta, rng, samples_per_client, when_pool_empty):
    if when_pool_empty not in ("renormalize", "refill"):
        raise ValueError(f"when_pool_empty={when_pool_empty!r} is not 'renormalize' or 'refill'")
    n = len(labels)
    m = n // k if samples_per_client is None else int(samples_per_client)
    if m < 1:
        raise ValueError(f"samples_per_client must be >= 1, got {m}")
    if when_pool_empty == "renormalize" and m * k > n:
        raise ValueError(
            f"samples_per_client={m} x num_clients={k} exceeds the {n} samples; lower it or "
            "use when_pool_empty='refill' (duplicates samples across clients)"
        )
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    pools = [rng.permutation(ix) for ix in members]  # consumed from the front
    out = []
    for _ in range(k):
        p = rng.dirichlet(np.full(len(classes), beta))
        mine: list[np.ndarray] = []
        need = m
        # Multinomial draws; in "renormalize" mode the draws that hit an exhausted pool are
        # redrawn over the classes that still have samples (the same law as drawing one by one
        # and renormalising p each time a pool empties).
        while need > 0:
            alive = np.array([len(pool) > 0 for pool in pools], dtype=float)
            if when_pool_empty == "refill":
                alive[:] = 1.0
            w = p * alive
            w = w / w.sum() if w.sum() > 0 else alive / alive.sum()
            counts = rng.multinomial(need, w)
            for c in np.flatnonzero(counts):
                want = int(counts[c])
                while want > 0:
                    if len(pools[c]) == 0:
                        if when_pool_empty != "refill":
                            break
                        pools[c] = rng.permutation(members[c])
                    take = min(want, len(pools[c]))
                    mine.append(pools[c][:take])
                    pools[c] = pools[c][take:]
                    want -= take
                    need -= take
        out.append(np.sort(np.concatenate(mine)))
    return out


def label_histograms(labels, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) int64 counts of each client's labels, for plots and checks."""
    labels = _check_labels(labels)
    if num_classes < 1 or labels.max() >= num_classes:
        raise ValueError(f"num_classes={num_classes} is smaller than the largest label + 1")
    return np.stack([np.bincount(labels[np.asarray(p, np.int64)], minlength=num_classes) for p in parts])
