"""The privacy audit (lalora.audit): its statistics, and that it passes the real mechanism and
catches each planted bug.

Trial counts (fixed seeds): block LoRA audits 2000 trials per world (4000 DP trials per audit),
Swin audits 150 per world, one-run audits 300 canaries / 60 guesses. Why the outcomes are not luck
is argued beside each test.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sst

from lalora.audit import (audit_dp_step, audit_one_run, audit_swin_step, mechanism_epsilons, plant,
                          sensitivity_probe, sensitivity_probe_swin)
from lalora.audit import stats
from lalora.audit.canary import _block_setup, single_thread

DELTA = 1e-5


# ----------------------------------------------------------------------------- statistics
def test_clopper_pearson_matches_beta_quantiles_and_covers():
    assert stats.cp_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert stats.cp_lower(100, 100, 0.05) == pytest.approx(0.05 ** (1 / 100), rel=1e-9)
    assert stats.cp_upper(100, 100, 0.05) == 1.0 and stats.cp_lower(0, 100, 0.05) == 0.0
    # coverage: the 95% upper bound is below the true rate in at most ~5% of 2000 binomial draws
    rng = np.random.default_rng(0)
    ks = rng.binomial(200, 0.1, size=2000)
    misses = np.mean([stats.cp_upper(int(k), 200, 0.05) < 0.1 for k in ks])
    assert misses <= 0.05


def test_epsilon_from_rates():
    assert stats.epsilon_from_rates(0.01, 0.5, 0.0) == pytest.approx(math.log(50))
    assert stats.epsilon_from_rates(0.5, 0.01, 0.0) == pytest.approx(math.log(50))   # symmetric rule
    assert stats.epsilon_from_rates(0.5, 0.5, 0.0) == 0.0
    assert stats.epsilon_from_rates(0.0, 0.5, 1e-5) == math.inf


def test_gdp_epsilon_inverts_gdp_delta_and_is_below_rdp():
    for mu in (0.1, 0.5, 1.0, 3.0):
        eps = stats.gdp_epsilon(mu, DELTA)
        assert stats.gdp_delta(eps, mu) == pytest.approx(DELTA, rel=1e-6)
    assert stats.gdp_epsilon(0.0, DELTA) == 0.0
    # the exact ε of one Gaussian step is below the RDP accountant's (RDP is an upper bound)
    for target in (1.0, 3.0, 8.0):
        m = mechanism_epsilons(target, DELTA)
        assert m["exact_epsilon"] < m["accountant_epsilon"] <= target + 1e-9


def test_threshold_bound_is_valid_on_synthetic_gaussians():
    """Scores from an exactly μ-GDP pair: the 95% bound must stay below the true ε in (nearly) all
    of 40 repetitions, while the point estimate is close to it."""
    mu, n = 2.0, 2000
    true_eps = stats.gdp_epsilon(mu, DELTA)
    rng = np.random.default_rng(1)
    above = 0
    for rep in range(40):
        out, inn = rng.normal(0, 1, n), rng.normal(mu, 1, n)
        for method in ("split", "bonferroni"):
            res = stats.threshold_epsilon_lb(out, inn, delta=DELTA, method=method, seed=rep)
            above += res.epsilon_lb > true_eps
    assert above <= 4


def test_gaussian_bound_coverage_and_diagnostics():
    rng = np.random.default_rng(2)
    mu = 1.0
    lows = [stats.gdp_mu_lower_bound(rng.normal(0, 1, 1000), rng.normal(mu, 1, 1000))[1] for _ in range(200)]
    assert np.mean(np.array(lows) > mu) <= 0.09     # nominal 5%
    # the assumption check rejects non-Gaussian or unequal-variance scores
    d = stats.score_diagnostics(rng.uniform(-1, 1, 3000), rng.uniform(-1, 1, 3000) + 0.1)
    assert d["normal_p_out"] < 1e-3
    d = stats.score_diagnostics(rng.normal(0, 1, 3000), rng.normal(0, 2, 3000))
    assert d["equal_var_p"] < 1e-3


def test_one_run_bound_matches_binomial_for_delta_zero():
    # δ = 0: p-value is the Binomial tail; all 100 of 100 guesses correct at 95% -> p^100 = 0.05
    assert stats.one_run_p_value(1000, 50, 40, 1.0, 0.0) == pytest.approx(
        sst.binom.sf(39, 50, 1 / (1 + math.exp(-1.0))))
    p = 0.05 ** (1 / 100)
    assert stats.one_run_epsilon_lb(1000, 100, 100, delta=0.0) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert stats.one_run_epsilon_lb(1000, 100, 50, delta=0.0) == 0.0
    # δ > 0 only loosens (lowers) the bound
    loose = stats.one_run_epsilon_lb(1000, 100, 90, delta=1e-5)
    assert loose <= stats.one_run_epsilon_lb(1000, 100, 90, delta=0.0)


# ----------------------------------------------------------------------------- the block model is honest
@single_thread()
def test_block_model_copies_are_independent_tiny_models():
    """The engine's per-sample norms for the block model equal float64 autograd norms of the tiny
    model (so one dp_gradient call really is T independent DP steps), and the canary is worst case."""
    from lalora.privacy.dp_step import dp_gradient

    model, b_out, b_in, u, raw = _block_setup(5, 4, 3, 2, 3, "both", 10.0, 0)
    res = dp_gradient(model, model.loss_fn, b_in, clip_norm=1.0, noise_multiplier=0.0,
                      expected_batch_size=4, generator=None)
    x_tiny = b_in["x"].reshape(-1, 5, 4)[torch.arange(20), b_in["slot"]]
    ref = torch.stack([model.tiny_grad(x_tiny[i], int(b_in["labels"][i]), "both").norm() for i in range(20)])
    torch.testing.assert_close(res.per_sample_norms.double(), ref, rtol=1e-4, atol=1e-6)
    assert raw == pytest.approx(10.0, rel=1e-3)
    # each copy's block of the released gradient is identical (same data, no noise)
    blocks = model.block_grads(res.grads, "both")
    torch.testing.assert_close(blocks, blocks[:1].expand_as(blocks))


def test_sensitivity_probe_correct_and_planted():
    """The canary's clipped contribution in units of C: 1 for the real step, 10 (its raw norm)
    with clipping off; noise does not enter the probe."""
    assert sensitivity_probe() == pytest.approx(1.0, abs=1e-4)
    assert sensitivity_probe(which="A") == pytest.approx(1.0, abs=1e-4)
    assert sensitivity_probe(which="B") == pytest.approx(1.0, abs=1e-4)
    assert sensitivity_probe(clipping="per_layer") <= 1.0 + 1e-4   # C/sqrt(K) per tensor: total <= C
    with plant("clipping_off"):
        assert sensitivity_probe() == pytest.approx(10.0, rel=1e-3)


def test_swin_per_window_clipping_caught_by_sensitivity():
    """Per-window clipping names itself: the canary image (4 identical windows) contributes 4·C
    instead of ≤ C."""
    assert sensitivity_probe_swin() <= 1.0 + 1e-3
    with plant("per_window_clipping", windows_per_sample=4):
        assert sensitivity_probe_swin() > 3.5


# ----------------------------------------------------------------------------- audits
TRIALS = 2000


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_correct_mechanism_bound_stays_below_accountant(epsilon):
    """Real dp_gradient: both lower bounds ≤ the accountant's ε. Not luck: the true μ = 1/σ gives the
    exact ε (0.91 / 2.77 / 7.44 for ε = 1 / 3 / 8) below the accountant's; the 95% lower bound
    exceeds the truth with probability ≤ 5%, and reaching the accountant's ε would need μ̂ > 3.5
    standard errors above 1/σ (probability < 3e-4)."""
    res = audit_dp_step(epsilon, trials=TRIALS, seed=0)
    assert res.gaussian["diagnostics_pass"], res.gaussian["diagnostics"]
    assert res.threshold["epsilon_lb"] <= res.accountant_epsilon
    assert res.gaussian["epsilon_estimate"] <= res.accountant_epsilon
    assert not res.violates and not res.estimate_exceeds
    assert res.mean_shift == pytest.approx(1.0, abs=5 * res.noise_multiplier * math.sqrt(2 / TRIALS))


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_noise_halved_shows_in_the_estimate(epsilon):
    """σ/2: true μ doubles (exact ε 1.96 / 6.16 / 17.7). The Gaussian-score *estimate* exceeds the
    accountant's ε and is flagged; it decides nothing (the verdict is the assumption-free bound's,
    which tops out near log(trials) and cannot prove σ/2 at ε = 8)."""
    with plant("noise_halved"):
        res = audit_dp_step(epsilon, trials=TRIALS, seed=0, planted="noise_halved")
    assert res.gaussian["diagnostics_pass"]
    assert res.gaussian["epsilon_estimate"] > res.accountant_epsilon
    assert res.estimate_exceeds
    assert res.violates == (res.threshold["epsilon_lb"] > res.accountant_epsilon)
    if epsilon == 8.0:
        assert not res.violates


def test_gaussian_estimate_is_never_a_verdict():
    """Student-t scores (heavy tails) whose normality diagnostics can pass: the Gaussian figure may
    exceed anything, the result's bound and verdict are the Clopper–Pearson ones alone."""
    from dataclasses import replace

    res = audit_dp_step(3.0, trials=200, seed=0)
    fake = replace(res, gaussian={**res.gaussian, "epsilon_estimate": 1e9, "diagnostics_pass": True})
    assert fake.estimate_exceeds and not fake.violates
    assert fake.epsilon_lb == res.threshold["epsilon_lb"] and fake.to_dict()["confidence"] == 0.95
    assert stats.joint_confidence(0.975, 0.975) == pytest.approx(0.95)


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_clipping_off_is_caught(epsilon):
    """No clipping: the canary (norm 10·C) shifts the score by 10 instead of 1. At ε = 1 and 3 the
    assumption-free Clopper–Pearson bound exceeds the accountant's ε (a verdict); at ε = 8 it cannot
    (2000 trials top out near log(trials)), so only the estimate flags it -- and the noise-free
    sensitivity probe (test_sensitivity_probe_correct_and_planted) catches it at any ε."""
    with plant("clipping_off"):
        res = audit_dp_step(epsilon, trials=TRIALS, seed=0, planted="clipping_off")
    assert res.mean_shift > 5
    assert res.estimate_exceeds
    if epsilon < 5:
        assert res.violates and res.threshold["epsilon_lb"] > res.accountant_epsilon


def test_swin_audit_correct_and_per_window_flagged():
    """Small Swin, ε = 1, 150 trials per world: per-image clipping passes; per-window clipping
    (4 windows) shifts the score by ≈ 4 and the Gaussian estimate flags it. At 150 trials the
    assumption-free bound cannot prove it (no verdict from an estimate); the noise-free sensitivity
    probe catches it deterministically (test_swin_per_window_clipping_caught_by_sensitivity)."""
    ok = audit_swin_step(1.0, trials=150, seed=0)
    assert not ok.violates
    with plant("per_window_clipping", windows_per_sample=4):
        bad = audit_swin_step(1.0, trials=150, seed=0, planted="per_window_clipping")
    assert bad.estimate_exceeds and bad.mean_shift > 2.0


def test_one_run_audit_correct_and_clipping_off():
    """One-run audit (300 canaries, 60 guesses, 10 DP steps at q = 0.25): below the accountant's ε for
    the real mechanism at ε = 1 and 8; with clipping off at ε = 1 the guesses become near perfect and
    the bound exceeds ε."""
    kw = dict(canaries=300, guesses=60, steps=10, real=100)
    for eps in (1.0, 8.0):
        res = audit_one_run(eps, **kw)
        assert res.epsilon_lb <= res.accountant_epsilon
    with plant("clipping_off"):
        bad = audit_one_run(1.0, planted="clipping_off", **kw)
    assert bad.epsilon_lb > bad.accountant_epsilon


def test_one_run_audit_la_lora_runs():
    res = audit_one_run(8.0, canaries=200, guesses=40, steps=6, real=60, method="la-lora")
    assert 0 <= res.correct <= 40 and res.epsilon_lb <= res.accountant_epsilon


def test_cli_audit(tmp_path, capsys):
    from lalora.cli import main

    path = tmp_path / "audit.json"
    assert main(["audit", "--epsilon", "3", "--trials", "200", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["canary"]["trials_per_world"] == 200 and "epsilon_lb" in data["canary"]
    assert data["joint_confidence"] == pytest.approx(0.95)
    assert main(["audit", "--epsilon", "1", "--trials", "300", "--planted", "clipping_off"]) == 1
    # two bounds reported: each at 97.5%, printed joint confidence 95%
    assert main(["audit", "--epsilon", "3", "--trials", "200", "--one-run", "--canaries", "100",
                 "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["canary"]["confidence"] == pytest.approx(0.975)
    assert data["joint_confidence"] == pytest.approx(0.95)
    assert "joint confidence 95.00%" in capsys.readouterr().out
