"""DPConfig validates itself: bad values raise ValueError naming the field; round-trips."""
import json
import math

import pytest

from lalora.privacy.accountant import noise_multiplier_for
from lalora.privacy.config import DPConfig


def test_defaults_match_the_contract():
    cfg = DPConfig()
    assert (cfg.epsilon, cfg.delta, cfg.clip_norm, cfg.clipping, cfg.accountant, cfg.mode,
            cfg.noise_multiplier) == (3.0, 1e-5, 1.0, "flat", "prv", "dp", None)
    assert cfg.is_private


@pytest.mark.parametrize("kwargs, field", [
    (dict(epsilon=0), "epsilon"), (dict(epsilon=-1.0), "epsilon"), (dict(epsilon=math.nan), "epsilon"),
    (dict(epsilon="three"), "epsilon"), (dict(epsilon=True), "epsilon"),
    (dict(delta=0.0), "delta"), (dict(delta=1.0), "delta"), (dict(delta=-1e-5), "delta"),
    (dict(delta=math.nan), "delta"),
    (dict(clip_norm=0.0), "clip_norm"), (dict(clip_norm=-1.0), "clip_norm"),
    (dict(clip_norm=math.nan), "clip_norm"),
    (dict(noise_multiplier=-0.5), "noise_multiplier"), (dict(noise_multiplier=math.inf), "noise_multiplier"),
])
def test_bad_numbers_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DPConfig(**kwargs)


@pytest.mark.parametrize("field, bad, choices", [
    ("clipping", "per_sample", ["flat", "per_layer"]),
    ("accountant", "gdp", ["rdp", "prv"]),
    ("mode", "fake", ["dp", "as-released", "off"]),
])
def test_unknown_choice_names_field_and_lists_choices(field, bad, choices):
    with pytest.raises(ValueError) as err:
        DPConfig(**{field: bad})
    message = str(err.value)
    assert field in message and all(repr(c) in message for c in choices)


def test_infinite_epsilon_is_the_non_private_reference():
    cfg = DPConfig(epsilon=math.inf, clip_norm=math.inf)
    assert not cfg.is_private
    assert cfg.resolve_noise_multiplier(0.032, 100) == 0.0
    assert not DPConfig(mode="as-released").is_private


def test_noise_multiplier_resolution():
    assert DPConfig(epsilon=3.0).resolve_noise_multiplier(0.032, 100) == \
        noise_multiplier_for(3.0, 1e-5, 0.032, 100)
    assert DPConfig(noise_multiplier=1.25).resolve_noise_multiplier(0.032, 100) == 1.25


def test_round_trip_through_json():
    cfg = DPConfig(epsilon=math.inf, clip_norm=0.5, clipping="per_layer", accountant="prv",
                   mode="off", noise_multiplier=0.0)
    assert DPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="eps"):
        DPConfig.from_dict({"eps": 1.0})
