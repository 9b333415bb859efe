"""`lalora accountant` prints both directions; run in-process through lalora.cli.main."""
import json
import re

import pytest

from lalora.cli import main
from lalora.privacy.accountant import epsilon_for, noise_multiplier_for

ARGS = ["accountant", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.032", "--steps", "1000"]


def test_prints_sigma_and_the_epsilon_it_gives(capsys):
    assert main(ARGS + ["--sigma", "3"]) == 0
    out = capsys.readouterr().out
    sigma = float(re.search(r"sigma = ([0-9.]+)\n", out).group(1))
    assert sigma == pytest.approx(noise_multiplier_for(1.0, 1e-5, 0.032, 1000), abs=1e-4)
    achieved = float(re.search(rf"epsilon given by sigma = {sigma:.4f}: ([0-9.]+)", out).group(1))
    assert achieved <= 1.0
    eps3 = float(re.search(r"epsilon given by sigma = 3: ([0-9.]+)", out).group(1))
    assert eps3 == pytest.approx(epsilon_for(3.0, 1e-5, 0.032, 1000), abs=1e-4) and eps3 > 1.0


def test_json_output(capsys):
    args = ["accountant", "--epsilon", "2", "--sample-rate", "0.032", "--steps", "100", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accountant"] == "prv" and out["steps"] == 100   # the default accountant
    assert out["noise_multiplier"] == noise_multiplier_for(2.0, 1e-5, 0.032, 100)
    assert out["epsilon"] <= 2.0


def test_sigma_only_with_prv(capsys):
    # PRV calibration is slow; one PRV evaluation keeps the test quick.
    args = ["accountant", "--sigma", "1.5", "--sample-rate", "0.032", "--steps", "100",
            "--accountant", "prv", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert "noise_multiplier" not in out
    assert out["epsilon_for_sigma"] == epsilon_for(1.5, 1e-5, 0.032, 100, "prv")


def test_bad_input_exits_with_the_field_name(capsys):
    assert main(["accountant", "--epsilon", "-1", "--sample-rate", "0.032", "--steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "epsilon" in err and len(err.strip().splitlines()) == 1
    assert main(["accountant", "--sample-rate", "0.032", "--steps", "10"]) == 2
    assert "give --epsilon, --sigma, or both" in capsys.readouterr().err
