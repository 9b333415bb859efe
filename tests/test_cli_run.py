"""`lalora run`: runs a (tiny, registered-for-the-test) task, prints one summary line with accuracy,
ε spent and the run folder, serves a finished run from its folder, shows progress when asked, and
rejects an unknown method or task with the list of choices."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_federated import tiny_task  # noqa: E402

from lalora.cli import main  # noqa: E402
from lalora.tasks import TASKS  # noqa: E402


@pytest.fixture(autouse=True)
def tiny_registered(monkeypatch):
    monkeypatch.setitem(TASKS, "tiny", lambda: tiny_task())
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_run_prints_summary_then_serves_cached(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LALORA_PROGRESS", "1")
    argv = ["run", "--task", "tiny", "--method", "la-lora", "--epsilon", "3", "--rounds", "2",
            "--runs-dir", str(tmp_path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1]
    assert "accuracy" in last and "epsilon spent" in last and str(tmp_path) in last
    assert "la-lora rounds" in err          # the tqdm bar over rounds
    run_dirs = list((tmp_path / "tiny" / "la-lora").iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "final.json").exists()
    assert main(argv + ["--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "(cached)" in out and "rounds" not in err


def test_non_private_run_says_so(tmp_path, capsys):
    assert main(["run", "--task", "tiny", "--method", "dp-lora", "--epsilon", "inf", "--rounds", "1",
                 "--runs-dir", str(tmp_path), "--quiet", "--no-filter"]) == 0
    assert "epsilon spent inf (no DP)" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value,expected", [
    ("--method", "lora", "unknown method 'lora'; choices: fedavg-lora, dp-lora"),
    ("--task", "nope", "unknown task 'nope'; choices:"),
])
def test_unknown_choice_lists_choices(tmp_path, capsys, flag, value, expected):
    argv = {"--task": "tiny", "--method": "la-lora"}
    argv[flag] = value
    code = main(["run", "--task", argv["--task"], "--method", argv["--method"],
                 "--runs-dir", str(tmp_path), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err
    if flag == "--task":
        assert "digits-swin" in err and "tiny" in err


def test_bad_value_names_the_field(tmp_path, capsys):
    assert main(["run", "--task", "tiny", "--method", "la-lora", "--clients", "2",
                 "--clients-per-round", "3", "--runs-dir", str(tmp_path), "--quiet"]) == 2
    assert "clients_per_round" in capsys.readouterr().err


def test_client_batching_flag_reaches_the_config_and_matches(tmp_path, capsys):
    """--client-batching (default) and --no-client-batching: separate run folders (the flag is part of
    the config), same accuracy and ε on the tiny task."""
    import json

    base = ["run", "--task", "tiny", "--method", "dp-lora", "--epsilon", "3", "--rounds", "2",
            "--runs-dir", str(tmp_path), "--quiet"]
    assert main(base) == 0 and main(base + ["--no-client-batching"]) == 0
    finals = {}
    for d in (tmp_path / "tiny" / "dp-lora").iterdir():
        cfg = json.loads((d / "config.json").read_text())
        finals[cfg["client_batching"]] = json.loads((d / "final.json").read_text())
    assert set(finals) == {True, False}
    assert finals[True]["accuracy"] == finals[False]["accuracy"]
    assert finals[True]["per_client_epsilon"] == finals[False]["per_client_epsilon"]
