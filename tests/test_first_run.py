"""A newcomer's first hour (issue 20): long first-time work announces itself on a non-terminal
stderr, and settings that do not fit the task's model are refused before any of it."""
import time

import pytest
import torch

from lalora.config import RunConfig, check_against_task


@pytest.fixture
def cold_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LALORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_pretraining_announces_itself_once_on_a_non_terminal_stderr(cold_cache, capsys):
    from lalora.tasks import get_task

    task = get_task("digits-swin", pretrain_epochs=1)
    task.build_model()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lalora:")]
    assert len(lines) == 1, err
    (line,) = lines
    assert "pretraining the digits-swin backbone" in line and "first use" in line
    assert " s of CPU" in line and str(cold_cache) in line
    assert "\r" not in err   # no progress bar: stderr is not a terminal
    get_task("digits-swin", pretrain_epochs=1).build_model()   # cached now: silent
    assert "lalora:" not in capsys.readouterr().err


def test_sigma_calibration_announces_itself_once(cold_cache, capsys):
    from lalora.privacy import accountant

    accountant._SIGMA_CACHE.clear()
    sigma = accountant.noise_multiplier_for(3.0, 1e-5, 0.25, 7, "rdp")
    err = capsys.readouterr().err
    assert err.count("lalora: calibrating the noise multiplier") == 1 and "rdp" in err
    assert str(cold_cache) in err
    accountant._SIGMA_CACHE.clear()   # the disk cache answers now: no notice
    assert accountant.noise_multiplier_for(3.0, 1e-5, 0.25, 7, "rdp") == sigma
    assert "lalora:" not in capsys.readouterr().err


def test_invalid_rank_is_refused_in_under_two_seconds_on_a_cold_cache(cold_cache, capsys):
    """`lalora run --task digits-swin --method la-lora --r 1000`: exit 2, one line naming r,
    nothing pretrained. Timed as process CPU after the libraries are imported (import time is
    the interpreter's, not lalora's work, and wall time on a shared machine measures the load)."""
    import sklearn.datasets  # noqa: F401
    import timm.models.swin_transformer  # noqa: F401

    from lalora.cli import main

    t0 = time.process_time()
    rc = main(["run", "--task", "digits-swin", "--method", "la-lora", "--r", "1000", "--quiet",
               "--runs-dir", str(cold_cache.parent / "runs")])
    cpu = time.process_time() - t0
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("lalora run: error: r must be") and "1000" in err
    assert cpu < 2.0, cpu
    assert not list(cold_cache.glob("*backbone*"))   # refused before any pretraining


def _digits(**kw):
    from lalora.tasks import get_task

    return get_task("digits-swin", pretrain_epochs=0, **kw)


def test_check_against_task_names_targets_batch_size_and_passes_a_good_config(cold_cache):
    task = _digits()
    good = RunConfig(task="digits-swin", method="la-lora").resolve(task.defaults)
    rng = torch.random.get_rng_state()
    check_against_task(good, task)
    assert torch.equal(torch.random.get_rng_state(), rng)   # the check draws no random numbers
    task.lora_targets = ["no_such_layer"]
    with pytest.raises(ValueError, match="targets=.*no_such_layer"):
        check_against_task(good, task)
    task = _digits(max_train_samples=40)
    check_against_task(good.replace(batch_size=40, clients=2, clients_per_round=1, partition="iid"), task)
    with pytest.raises(ValueError, match=r"batch_size must be <= the task's private training examples \(40\)"):
        check_against_task(good.replace(batch_size=41, clients=2, clients_per_round=1,
                                        partition="iid"), task)
    assert not list(cold_cache.glob("*backbone*"))
