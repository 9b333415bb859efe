"""Accountant: σ and ε through Opacus, edge cases, and the per-client PrivacyLedger."""
import json
import math

import pytest
from opacus.accountants.utils import get_noise_multiplier

from lalora.privacy.accountant import (PrivacyLedger, epsilon_for, epsilon_for_history,
                                       noise_multiplier_for, calibrate_sigma)

DELTA = 1e-5
Q = 16 / 500  # the paper's vision setting: batch 16 of 500 examples per client


@pytest.mark.filterwarnings("ignore:Optimal order is the")  # Opacus' own call, unfiltered
@pytest.mark.parametrize("accountant, table_sigma", [("rdp", 4.219), ("prv", 3.945)])
def test_sigma_matches_opacus_and_its_epsilon_meets_target(accountant, table_sigma):
    sigma = noise_multiplier_for(1.0, DELTA, Q, 1000, accountant)
    # the value measured independently in /work/shared/research/ecosystem.md §3.3(b)
    assert sigma == pytest.approx(table_sigma, abs=2e-3)
    expected = get_noise_multiplier(target_epsilon=1.0, target_delta=DELTA, sample_rate=Q,
                                    steps=1000, accountant=accountant)
    assert sigma == expected
    eps = epsilon_for(sigma, DELTA, Q, 1000, accountant)
    assert eps <= 1.0
    assert eps >= 1.0 - 0.05  # not wastefully conservative


def test_prv_epsilon_agrees_with_microsoft_prv_accountant():
    # An independent PRV implementation (prv-accountant 0.2) as the reference; ~2e-2 agreement.
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant
    sigma, steps = 2.0, 200
    ref = PRVAccountant(prvs=PoissonSubsampledGaussianMechanism(noise_multiplier=sigma,
                                                                sampling_probability=Q),
                        max_self_compositions=steps, eps_error=0.01, delta_error=DELTA / 1000)
    _, _, upper = ref.compute_epsilon(delta=DELTA, num_self_compositions=steps)
    assert epsilon_for(sigma, DELTA, Q, steps, "prv") == pytest.approx(upper, rel=2e-2)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_monotone_in_steps_sigma_and_rate(accountant):
    eps_steps = [epsilon_for(1.5, DELTA, Q, s, accountant) for s in (10, 50, 200)]
    assert eps_steps[0] < eps_steps[1] < eps_steps[2]
    eps_sigma = [epsilon_for(s, DELTA, Q, 50, accountant) for s in (0.8, 1.5, 3.0)]
    assert eps_sigma[0] > eps_sigma[1] > eps_sigma[2]
    assert epsilon_for(1.5, DELTA, 0.01, 50, accountant) < epsilon_for(1.5, DELTA, 0.1, 50, accountant)


def test_more_steps_need_more_noise():
    assert noise_multiplier_for(1.0, DELTA, Q, 2000) > noise_multiplier_for(1.0, DELTA, Q, 1000)


def test_edge_cases():
    assert noise_multiplier_for(math.inf, DELTA, Q, 1000) == 0.0
    assert epsilon_for(0.0, DELTA, Q, 10) == math.inf
    assert epsilon_for(1.0, DELTA, Q, 0) == 0.0
    assert noise_multiplier_for(1.0, DELTA, Q, 0) == 0.0
    # RDP named: Opacus' PRV did not return within minutes on this far-out input (see PRV_MAX_EPSILON)
    with pytest.raises(ValueError, match="epsilon=1e-09 is unreachable"):
        noise_multiplier_for(1e-9, DELTA, 1.0, 10**6, "rdp")


@pytest.mark.parametrize("kwargs, field", [
    (dict(epsilon=0.0), "epsilon"), (dict(epsilon=-1.0), "epsilon"), (dict(epsilon=math.nan), "epsilon"),
    (dict(delta=0.0), "delta"), (dict(delta=1.0), "delta"), (dict(sample_rate=0.0), "sample_rate"),
    (dict(sample_rate=1.5), "sample_rate"), (dict(steps=-1), "steps"), (dict(steps=2.5), "steps"),
    (dict(accountant="gdp"), "accountant"),
])
def test_bad_input_names_the_field(kwargs, field):
    args = dict(epsilon=1.0, delta=DELTA, sample_rate=Q, steps=10, accountant="rdp") | kwargs
    with pytest.raises(ValueError, match=field):
        noise_multiplier_for(**args)


def test_epsilon_for_rejects_negative_sigma():
    with pytest.raises(ValueError, match="noise_multiplier"):
        epsilon_for(-1.0, DELTA, Q, 10)


def test_one_sigma_for_all_clients_is_the_largest_needed():
    clients = [(0.064, 50), (Q, 150), (Q, 0)]   # a client with no steps releases nothing
    sigma = calibrate_sigma(1.0, DELTA, clients)
    assert sigma == max(noise_multiplier_for(1.0, DELTA, q, s) for q, s in clients)
    assert all(epsilon_for(sigma, DELTA, q, s) <= 1.0 for q, s in clients)
    assert calibrate_sigma(1.0, DELTA, [(Q, 0)]) == 0.0
    with pytest.raises(ValueError, match="epsilon"):   # validated even when no client takes a step
        calibrate_sigma(-1.0, DELTA, [(Q, 0)])
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_sigma(1.0, DELTA, [(1.5, 10)])


# --------------------------------------------------------------------------- PrivacyLedger
def test_ledger_is_idempotent_per_client_round():
    ledger = PrivacyLedger(delta=DELTA)
    ledger.set_client(0, sample_rate=Q, noise_multiplier=2.0)
    assert ledger.record_steps(0, 20, round=1) is True
    assert ledger.record_steps(0, 20, round=1) is False  # a replay after resume: not counted
    assert ledger.record_steps(0, 20, round=2) is True
    assert ledger.steps(0) == 40
    assert ledger.epsilon(0) == epsilon_for(2.0, DELTA, Q, 40)
    with pytest.raises(ValueError, match="already recorded"):
        ledger.record_steps(0, 19, round=2)  # same key, different content: a bug upstream
    assert ledger.steps(0) == 40


def test_ledger_without_key_always_counts_and_needs_rates():
    ledger = PrivacyLedger()
    with pytest.raises(ValueError, match="set_client"):
        ledger.record_steps("a", 5)
    ledger.record_steps("a", 5, sample_rate=Q, noise_multiplier=1.0)
    ledger.record_steps("a", 5)
    assert ledger.steps("a") == 10


def test_ledger_composes_heterogeneous_history_and_roundtrips_json():
    ledger = PrivacyLedger(delta=DELTA, accountant="rdp")
    ledger.set_client(3, sample_rate=Q, noise_multiplier=2.0)
    ledger.record_steps(3, 20, round=1)
    ledger.record_steps(3, 20, round=2, noise_multiplier=3.0)
    ledger.set_client("b", sample_rate=0.1, noise_multiplier=0.0)  # noiseless: ε = inf
    ledger.record_steps("b", 1, round=("r", 1))
    expected = epsilon_for_history([(2.0, Q, 20), (3.0, Q, 20)], DELTA, "rdp")
    assert ledger.epsilon(3) == pytest.approx(expected)
    assert epsilon_for(2.0, DELTA, Q, 20, "rdp") < ledger.epsilon(3) < epsilon_for(2.0, DELTA, Q, 40, "rdp")
    assert ledger.epsilon("b") == math.inf and ledger.max_epsilon() == math.inf

    restored = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert restored.clients == [3, "b"]
    assert restored.epsilons() == ledger.epsilons()
    assert restored.record_steps(3, 20, round=2, noise_multiplier=3.0) is False
    assert restored.record_steps("b", 1, round=("r", 1)) is False
    assert restored.steps(3) == 40


def test_ledger_unknown_client():
    with pytest.raises(KeyError, match="client 7"):
        PrivacyLedger().epsilon(7)


def test_prv_refuses_an_epsilon_beyond_its_sound_range_by_name():
    with pytest.raises(ValueError, match="epsilon=1000.0 is above the PRV accountant"):
        noise_multiplier_for(1000.0, DELTA, 1.0, 30, "prv")
    assert noise_multiplier_for(1000.0, DELTA, 1.0, 30, "rdp") > 0


def test_default_accountant_is_prv_everywhere():
    import inspect

    from lalora.config import RunConfig

    assert RunConfig(task="t", method="la-lora").accountant == "prv"
    for fn in (epsilon_for, noise_multiplier_for, epsilon_for_history, calibrate_sigma):
        assert inspect.signature(fn).parameters["accountant"].default == "prv"
    assert PrivacyLedger().accountant == "prv"


def test_memoized_rdp_epsilon_equals_opacus_accountant():
    """The ledger's fast path (one-step RDP curve memoized, times steps) must equal Opacus' own
    RDPAccountant on mixed histories, to float rounding."""
    from opacus.accountants import RDPAccountant

    from lalora.privacy.accountant import epsilon_for_history

    histories = [[(1.1, 0.05, 37)], [(0.9, 0.2, 5), (2.5, 0.01, 400)], [(4.0, 1.0, 3), (1.3, 0.11, 12)]]
    for history in histories:
        acc = RDPAccountant()
        acc.history = list(history)
        expected = acc.get_epsilon(delta=1e-5)
        assert abs(epsilon_for_history(history, 1e-5, "rdp") - expected) <= 1e-9 * max(1.0, expected)


def test_sigma_disk_cache_never_serves_a_sigma_that_misses_the_target(tmp_path, monkeypatch):
    """A cached σ is re-checked with the accountant: a tampered (too small) σ on disk is ignored."""
    import json

    from lalora.privacy import accountant as acc

    monkeypatch.setenv("LALORA_CACHE", str(tmp_path))
    monkeypatch.setattr(acc, "_SIGMA_CACHE", {})
    args = (2.0, 1e-5, 0.05, 100)
    sigma = acc.noise_multiplier_for(*args, "rdp")
    key = (*args, "rdp", 0.01)
    path = acc._sigma_cache_file(key)
    assert json.loads(path.read_text())["sigma"] == sigma      # stored on disk
    path.write_text(json.dumps({"key": list(key), "sigma": sigma / 3}))   # tamper: far too little noise
    monkeypatch.setattr(acc, "_SIGMA_CACHE", {})
    again = acc.noise_multiplier_for(*args, "rdp")
    assert again == sigma
    assert acc.epsilon_for(again, 1e-5, 0.05, 100, "rdp") <= 2.0
