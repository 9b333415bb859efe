"""Method schedules as data (SPEC §2 table): what trains at step k of round t, what the server
averages, what stays local. Pure functions, no model."""
from __future__ import annotations

import pytest

from lalora.methods import METHODS, get_method

K = 6


def _table(name, rounds=4, period=1):
    m = METHODS[name]
    return {(k, t): set(m.trains(k, t, period)) for t in range(1, rounds + 1) for k in range(1, K + 1)}


def test_the_six_methods_exist():
    assert set(METHODS) == {"fedavg-lora", "dp-lora", "ffa-lora", "rolora", "la-lora", "fedsa-lora"}


@pytest.mark.parametrize("name", ["fedavg-lora", "dp-lora", "fedsa-lora"])
def test_both_factors_every_step(name):
    assert all(v == {"A", "B"} for v in _table(name).values())


def test_ffa_never_trains_A():
    assert all(v == {"B"} for v in _table("ffa-lora").values())
    assert METHODS["ffa-lora"].aggregated(1, K) == {"B", "head"}
    assert METHODS["ffa-lora"].aggregated(2, K) == {"B", "head"}


def test_rolora_alternates_by_round_B_first():
    tab = _table("rolora")
    for (k, t), v in tab.items():
        assert v == ({"B"} if t % 2 == 1 else {"A"}), (k, t)
    assert METHODS["rolora"].aggregated(1, K) == {"B", "head"}
    assert METHODS["rolora"].aggregated(2, K) == {"A", "head"}
    # period 2: B, B, A, A over rounds
    assert [set(METHODS["rolora"].trains(1, t, 2)) for t in (1, 2, 3, 4)] == [{"B"}, {"B"}, {"A"}, {"A"}]


def test_la_lora_alternates_by_step_B_first_every_round():
    tab = _table("la-lora")
    for (k, t), v in tab.items():
        assert v == ({"B"} if k % 2 == 1 else {"A"}), (k, t)
    assert METHODS["la-lora"].aggregated(1, K) == {"A", "B", "head"}
    # a single local step trains (and sends) only B
    assert METHODS["la-lora"].aggregated(1, 1) == {"B", "head"}


@pytest.mark.parametrize("period", [2, 3])
def test_alternation_period_stretches_the_blocks(period):
    seq = [set(METHODS["la-lora"].trains(k, 1, period)) for k in range(1, 2 * period + 2)]
    assert seq == [{"B"}] * period + [{"A"}] * period + [{"B"}]


def test_fedsa_keeps_B_and_head_local():
    m = METHODS["fedsa-lora"]
    assert m.local_only == {"B", "head"}
    assert m.aggregated(1, K) == {"A"} and m.aggregated(1, K, head=False) == {"A"}


def test_head_aggregated_unless_frozen_or_local():
    for name in ("fedavg-lora", "dp-lora", "ffa-lora", "rolora", "la-lora"):
        assert "head" in METHODS[name].aggregated(1, K)
        assert "head" not in METHODS[name].aggregated(1, K, head=False)


def test_defaults_filter_and_privacy():
    assert [n for n, m in METHODS.items() if m.filter_default] == ["la-lora"]
    assert [n for n, m in METHODS.items() if not m.private] == ["fedavg-lora"]


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="choices: fedavg-lora"):
        get_method("lalora")
    with pytest.raises(ValueError, match="count from 1"):
        METHODS["la-lora"].trains(0, 1)
