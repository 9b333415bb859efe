"""Privacy accounting through Opacus' accountants (PRV by default, RDP as an option).

Why PRV: for the same (ε, δ) it needs less noise than RDP's conversion (issue 20, measured with
this module: ε = 3, δ = 1e-5, q = 0.1, 70 steps: σ 1.494 with PRV vs 1.602 with RDP), and Opacus
itself defaults to it. RDP stays available (``accountant="rdp"``): its ε is a valid but looser
upper bound. Every result records which accountant produced its σ and ε.

Nothing here re-implements an accountant: σ comes from `opacus.accountants.utils.get_noise_multiplier`
and ε from an Opacus accountant whose `history` is set to [(σ, q, steps), ...]. Both assume the
Poisson-subsampled Gaussian mechanism with add/remove-one adjacency, i.e. batches drawn by
`lalora.privacy.sampling.poisson_sample` (SPEC §3).

    calibrate_sigma(epsilon, delta, [(q_i, steps_i), ...], accountant="prv") -> the ONE σ of a run:
        every (q_i, steps_i) meets ε (the Simulator, Flower, the paper σ table all reach it through
        lalora.privacy.plan.RunPlan; audits call it for their one mechanism)
    noise_multiplier_for(epsilon, delta, sample_rate, steps, accountant="prv") -> σ for one (q, steps):
        the bisection calibrate_sigma is built on
    epsilon_for(noise_multiplier, delta, sample_rate, steps, accountant="prv") -> ε
    PrivacyLedger  -- per-client spent ε in a federated run (API in its docstring)

Edge cases: epsilon=inf -> σ=0 (the non-DP reference); σ=0 with steps>0 -> ε=inf; steps=0 -> σ=0, ε=0.
`get_noise_multiplier` returns the upper end of its bisection, so epsilon_for(σ) ≤ target
(within its 0.01 tolerance below it).
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Hashable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lalora.announce import announce, calibration_eta
from lalora.provenance import library_versions, source_hash

# opacus is imported inside the functions that use it (heavy, and lalora.config imports this module
# for ACCOUNTANTS); lalora.results likewise (it imports torch) where the σ cache is written.

ACCOUNTANTS = ("rdp", "prv")
DEFAULT_ACCOUNTANT = "prv"
# Opacus' PRV discretisation breaks down far in the tail: calibrating ε = 1000 (q = 1, 30 steps)
# overflowed and did not finish in 200 s, while ε = 8, 20, 50 took 6-9 s. Above this, PRV refuses
# by name (RDP, a valid bound there, or epsilon=inf for no DP).
PRV_MAX_EPSILON = 50.0


# --------------------------------------------------------------------------- validation helpers
def _num(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r} is not one of {', '.join(map(repr, ACCOUNTANTS))}")
    return accountant


def _check_delta(delta: float) -> float:
    delta = _num("delta", delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    return delta


def _check_sample_rate(sample_rate: float) -> float:
    q = _num("sample_rate", sample_rate)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
    return q


def _check_steps(steps: int, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"{name} must be an int >= 0, got {steps!r}")
    return int(steps)


def _check_epsilon(epsilon: float) -> float:
    epsilon = _num("epsilon", epsilon)
    if math.isnan(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon must be > 0 (inf means no noise), got {epsilon}")
    return epsilon


def _check_noise_multiplier(noise_multiplier: float) -> float:
    sigma = _num("noise_multiplier", noise_multiplier)
    if math.isnan(sigma) or sigma < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    return sigma


@contextmanager
def _quiet_rdp_order_warnings():
    # Opacus' RDP warns when the optimal order is at the edge of its alpha grid; the bound is then
    # looser (still valid, conservative). During a bisection this fires for every probe.
    # Opacus' PRV takes log(1 - q) = log(0) at q = 1 (a full batch) and warns; the limit it then
    # uses is the right one, so the warning is noise in every notebook that audits one step.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
        yield


# --------------------------------------------------------------------------- the two directions
def epsilon_for_history(history: Iterable[tuple[float, float, int]], delta: float,
                        accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """ε after composing every (noise_multiplier, sample_rate, steps) entry of `history`."""
    from opacus.accountants import create_accountant

    _check_accountant(accountant)
    delta = _check_delta(delta)
    entries = []
    for sigma, q, steps in history:
        sigma, q, steps = _check_noise_multiplier(sigma), _check_sample_rate(q), _check_steps(steps)
        if steps == 0:
            continue
        if sigma == 0.0:
            return math.inf  # no noise: no finite guarantee
        if math.isinf(sigma):
            continue  # infinite noise releases nothing
        entries.append((sigma, q, steps))
    if not entries:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(tuple(entries), delta)
    acc = create_accountant(mechanism=accountant)
    acc.history = entries
    with _quiet_rdp_order_warnings():
        return float(acc.get_epsilon(delta=delta))


def _rdp_epsilon(entries: tuple, delta: float) -> float:
    """What Opacus' RDPAccountant.get_epsilon computes, Σ_entries compute_rdp(q, σ, steps) then
    get_privacy_spent over the same orders, with the one-step RDP curve of each (q, σ) memoized.

    compute_rdp is linear in steps, and its fractional orders cost seconds at small σ; a ledger
    asks for the same (q, σ) after every round, so this turns O(rounds × clients) slow calls into
    one per client. tests/test_accountant.py checks equality with Opacus' accountant.
    """
    from opacus.accountants.analysis import rdp as privacy_analysis
    from opacus.accountants.rdp import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    with _quiet_rdp_order_warnings():
        rdp = sum(steps * _one_step_rdp(q, sigma) for sigma, q, steps in entries)
        eps, _ = privacy_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=4096)
def _one_step_rdp(q: float, sigma: float):
    from opacus.accountants.analysis import rdp as privacy_analysis
    from opacus.accountants.rdp import RDPAccountant

    return privacy_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                        orders=RDPAccountant.DEFAULT_ALPHAS)


def epsilon_for(noise_multiplier: float, delta: float, sample_rate: float, steps: int,
                accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """ε spent by `steps` Poisson-sampled Gaussian steps with this σ and q (Opacus accountant)."""
    return epsilon_for_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = DEFAULT_ACCOUNTANT, *, epsilon_tolerance: float = 0.01) -> float:
    """Smallest σ (to Opacus' bisection tolerance) with ε(σ, q, steps) ≤ `epsilon`."""
    from opacus.accountants.utils import get_noise_multiplier

    epsilon = _check_epsilon(epsilon)
    delta = _check_delta(delta)
    q = _check_sample_rate(sample_rate)
    steps = _check_steps(steps)
    _check_accountant(accountant)
    if math.isinf(epsilon) or steps == 0:
        return 0.0
    if accountant == "prv" and epsilon > PRV_MAX_EPSILON:
        raise ValueError(f"epsilon={epsilon} is above the PRV accountant's numerically sound range "
                         f"(<= {PRV_MAX_EPSILON}); use accountant='rdp' or epsilon=inf (no DP)")
    key = (epsilon, delta, q, steps, accountant, float(epsilon_tolerance))
    cached = _SIGMA_CACHE.get(key)
    if cached is None:
        cached = _load_cached_sigma(key)
    if cached is not None:
        _SIGMA_CACHE[key] = cached
        return cached
    announce(f"calibrating the noise multiplier for epsilon={epsilon}, delta={delta}, q={q:.4g}, "
             f"{steps} steps", why=f"first use of this budget: a bisection over the {accountant} "
             "accountant", eta=calibration_eta(steps, q, accountant), cached_in=str(_sigma_cache_file(key)))
    try:
        with _quiet_rdp_order_warnings():
            sigma = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                               sample_rate=q, steps=steps, accountant=accountant,
                                               epsilon_tolerance=epsilon_tolerance))
    except ValueError as err:  # Opacus: "The privacy budget is too low." (σ would exceed 1e6)
        raise ValueError(f"epsilon={epsilon} is unreachable for delta={delta}, sample_rate={q}, "
                         f"steps={steps} ({accountant}): {err}") from err
    except RuntimeError as err:  # Opacus' PRV: "Cannot compute epsilon" (e.g. delta near 1)
        raise ValueError(f"the {accountant} accountant cannot calibrate epsilon={epsilon} for "
                         f"delta={delta}, sample_rate={q}, steps={steps} ({err}); try accountant='rdp'") from err
    _SIGMA_CACHE[key] = sigma
    _store_cached_sigma(key, sigma)
    return sigma


# σ calibration is a bisection over the accountant (seconds of CPU for short, high-q schedules) and
# every run of a notebook grid asks for the same few σ. Results are cached in memory and on disk
# (LALORA_CACHE, default ~/.cache/lalora) under a key that includes the opacus version and a hash of
# this module's source (a code change can never serve an old σ). A disk hit is never trusted
# blindly: its ε is recomputed with the accountant (milliseconds) and must meet the target, so a
# stale or edited cache file can cost time but never privacy.
_SIGMA_CACHE: dict[tuple, float] = {}


def _sigma_cache_file(key: tuple):
    import hashlib
    import os
    from pathlib import Path

    code = (library_versions()["opacus"], source_hash(__name__))
    root = Path(os.environ.get("LALORA_CACHE") or Path.home() / ".cache" / "lalora") / "sigma"
    digest = hashlib.sha256(repr((key, code)).encode()).hexdigest()[:20]
    return root / f"{digest}.json"


def _load_cached_sigma(key: tuple) -> float | None:
    import json

    path = _sigma_cache_file(key)
    try:
        record = json.loads(path.read_text())
        sigma = float(record["sigma"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    epsilon, delta, q, steps, accountant, _ = key
    if not (sigma > 0 and epsilon_for(sigma, delta, q, steps, accountant) <= epsilon):
        return None
    return sigma


def _store_cached_sigma(key: tuple, sigma: float) -> None:
    from lalora.results import atomic_write_json

    try:
        atomic_write_json(_sigma_cache_file(key), {"key": list(key), "sigma": sigma})
    except OSError:  # a read-only or full cache dir only costs time
        pass


# --------------------------------------------------------------------------- the ledger
@dataclass
class _ClientRecord:
    sample_rate: float | None = None
    noise_multiplier: float | None = None
    history: list[list] = field(default_factory=list)  # [[σ, q, steps], ...], consecutive merged
    rounds: dict[Any, tuple[int, float, float]] = field(default_factory=dict)  # key -> (n, σ, q)
    epsilon: float | None = None  # cache; None = stale

    @property
    def steps(self) -> int:
        return sum(entry[2] for entry in self.history)


class PrivacyLedger:
    """Per-client record of DP steps and the ε they spent, computed by an Opacus accountant.

    API (what the federated simulation uses)::

        ledger = PrivacyLedger(delta=1e-5, accountant="prv")
        ledger.set_client(client, sample_rate=q, noise_multiplier=sigma)  # before its first steps
        ledger.record_steps(client, n, round=t)  # n local DP steps in round t -> True if new
        ledger.record_steps(client, n, round=t)  # same key again -> False, nothing added
        ledger.steps(client) -> int ; ledger.epsilon(client) -> float
        ledger.epsilons() -> {client: ε} ; ledger.max_epsilon() -> float ; ledger.clients -> list
        ledger.summary(client) -> {"steps", "sample_rate", "noise_multiplier", "epsilon", "history"}
        d = ledger.to_dict()  (JSON-serialisable; ε=inf is written as Infinity)
        ledger = PrivacyLedger.from_dict(d)

    Rules that keep the count honest:
    - `n` counts every DP step taken, INCLUDING steps whose Poisson batch was empty (the noise
      was still released and the accountant assumes the step happened).
    - `(client, round)` is an idempotency key: recording it again with the same (n, σ, q) is a
      no-op (so a resumed run never double counts); with different values it raises ValueError.
      `round=None` means "no key": the steps are always added.
    - `record_steps(..., sample_rate=, noise_multiplier=)` may override the client's current
      values (they become the client's new current values); heterogeneous histories compose.
    Client ids may be any hashable that JSON can hold (int or str) -- kept as-is in to_dict.
    """

    def __init__(self, delta: float = 1e-5, accountant: str = DEFAULT_ACCOUNTANT) -> None:
        self.delta = _check_delta(delta)
        self.accountant = _check_accountant(accountant)
        self._clients: dict[Hashable, _ClientRecord] = {}

    # -- recording
    def set_client(self, client: Hashable, *, sample_rate: float, noise_multiplier: float) -> None:
        rec = self._clients.setdefault(client, _ClientRecord())
        rec.sample_rate = _check_sample_rate(sample_rate)
        rec.noise_multiplier = _check_noise_multiplier(noise_multiplier)

    def record_steps(self, client: Hashable, n: int, *, round: Hashable | None = None,
                     sample_rate: float | None = None,
                     noise_multiplier: float | None = None) -> bool:
        n = _check_steps(n, "n")
        rec = self._clients.setdefault(client, _ClientRecord())
        q = _check_sample_rate(sample_rate) if sample_rate is not None else rec.sample_rate
        sigma = (_check_noise_multiplier(noise_multiplier) if noise_multiplier is not None
                 else rec.noise_multiplier)
        if q is None or sigma is None:
            raise ValueError(f"client {client!r}: sample_rate and noise_multiplier unknown; call "
                             "set_client() first or pass them to record_steps()")
        if round is not None:
            if round in rec.rounds:
                if rec.rounds[round] != (n, sigma, q):
                    raise ValueError(
                        f"client {client!r}, round {round!r} already recorded as "
                        f"(n, sigma, q)={rec.rounds[round]}, now {(n, sigma, q)}")
                return False
            rec.rounds[round] = (n, sigma, q)
        rec.sample_rate, rec.noise_multiplier = q, sigma
        if n:
            if rec.history and rec.history[-1][0] == sigma and rec.history[-1][1] == q:
                rec.history[-1][2] += n
            else:
                rec.history.append([sigma, q, n])
            rec.epsilon = None
        return True

    # -- reading
    @property
    def clients(self) -> list:
        return list(self._clients)

    def _get(self, client: Hashable) -> _ClientRecord:
        try:
            return self._clients[client]
        except KeyError:
            raise KeyError(f"client {client!r} has no record in this ledger") from None

    def steps(self, client: Hashable) -> int:
        return self._get(client).steps

    def rounds(self, client: Hashable) -> list:
        """The round keys recorded for ``client`` (in recording order)."""
        return list(self._get(client).rounds)

    def epsilon(self, client: Hashable) -> float:
        rec = self._get(client)
        if rec.epsilon is None:
            rec.epsilon = epsilon_for_history(rec.history, self.delta, self.accountant)
        return rec.epsilon

    def epsilons(self) -> dict:
        return {c: self.epsilon(c) for c in self._clients}

    def max_epsilon(self) -> float:
        return max(self.epsilons().values(), default=0.0)

    def summary(self, client: Hashable) -> dict[str, Any]:
        rec = self._get(client)
        return {"steps": rec.steps, "sample_rate": rec.sample_rate,
                "noise_multiplier": rec.noise_multiplier, "epsilon": self.epsilon(client),
                "history": [list(e) for e in rec.history]}

    # -- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "accountant": self.accountant,
            "clients": [
                {"client": c, **self.summary(c),
                 "rounds": [[k, *v] for k, v in rec.rounds.items()]}
                for c, rec in self._clients.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrivacyLedger":
        ledger = cls(delta=data["delta"], accountant=data["accountant"])
        for entry in data["clients"]:
            client = entry["client"]
            rec = ledger._clients.setdefault(client, _ClientRecord())
            rec.sample_rate = entry["sample_rate"]
            rec.noise_multiplier = entry["noise_multiplier"]
            rec.history = [[float(s), float(q), int(n)] for s, q, n in entry["history"]]
            # JSON turns tuples into lists; round keys must be hashable again
            rec.rounds = {(tuple(k) if isinstance(k, list) else k): (int(n), float(s), float(q))
                          for k, n, s, q in entry["rounds"]}
        return ledger

    def __repr__(self) -> str:
        return (f"PrivacyLedger(delta={self.delta}, accountant={self.accountant!r}, "
                f"clients={len(self._clients)})")


# --------------------------------------------------------------------------- the one σ of a run
def calibrate_sigma(epsilon: float, delta: float, clients: Iterable[tuple[float, int]],
                    accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """The one σ with which every client's (sample_rate, steps) meets ``epsilon`` (SPEC §3: the
    client with the most steps -- or the largest q -- binds), up to the bisection tolerance.

    The only place a run's σ is calibrated (lalora.privacy.plan.RunPlan calls it; so do the audits
    for their single mechanism). Pairs with 0 steps release nothing and are ignored; with none
    left, σ = 0."""
    epsilon, delta, accountant = _check_epsilon(epsilon), _check_delta(delta), _check_accountant(accountant)
    checked = ((_check_sample_rate(q), _check_steps(s)) for q, s in clients)
    pairs = _binding_pairs(p for p in checked if p[1] > 0)
    if not pairs:
        return 0.0
    return _sigma_for_binding_pairs(epsilon, delta, pairs, accountant)


def _binding_pairs(pairs: Iterable[tuple[float, int]]) -> tuple:
    """(q, steps) pairs not dominated by another (larger-or-equal q and steps needs at least as much
    noise), sorted: the only ones that can set σ for a federated run."""
    pairs = sorted(set(pairs))
    return tuple(p for p in pairs
                 if not any(o != p and o[0] >= p[0] and o[1] >= p[1] for o in pairs))


@functools.lru_cache(maxsize=256)
def _sigma_for_binding_pairs(epsilon: float, delta: float, pairs: tuple, accountant: str) -> float:
    """The largest per-pair σ, cheaply: the accountant's bisection costs seconds, so bisect only for
    the pair most likely to bind (largest q·√steps) and merely check the others, re-bisecting for any
    that still exceeds ε (σ only grows, so earlier checks stay valid). Memoised per run."""
    ordered = sorted(pairs, key=lambda p: p[0] * math.sqrt(p[1]), reverse=True)
    sigma = noise_multiplier_for(epsilon, delta, ordered[0][0], ordered[0][1], accountant)
    for q, steps in ordered[1:]:
        if cached_epsilon_for(sigma, delta, q, steps, accountant) > epsilon:
            sigma = noise_multiplier_for(epsilon, delta, q, steps, accountant)
    return sigma


@functools.lru_cache(maxsize=65536)
def cached_epsilon_for(sigma: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """``epsilon_for`` memoised per (σ, δ, q, steps, accountant): a run asks for every client's ε after
    every round. Equal to the ledger's value for a client whose history is this one (σ, q) entry
    (the RDP path scales the memoised one-step RDP curve, exactly as the ledger does)."""
    if steps == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    return epsilon_for(sigma, delta, q, steps, accountant)
