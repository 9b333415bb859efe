"""Issue 30: a notebook's grid trains its runs in parallel processes (run_grid ``jobs``), with the
records of the one-process loop bit for bit, and the runner's slots cap the runs training at once."""
import json
import multiprocessing
import time

import pytest

from lalora import nbtools
from lalora.nbtools import experiment_base, run_grid

HOW_MADE = ("cached", "wall_time_s", "run_dir")


def _tiny_base():
    return experiment_base("digits-swin", rounds=1, local_steps=2, clients=2, clients_per_round=1,
                           task_overrides={"pretrain_epochs": 1, "max_train_samples": 120})


def _what(records):
    return [{k: v for k, v in r.items() if k not in HOW_MADE} for r in records]


def test_jobs_2_trains_the_grid_in_workers_and_gives_the_records_of_jobs_1(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("LALORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LALORA_RUN_SLOTS", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the workers are given this process's count: 1, as in the runner's kernels
    base = _tiny_base()
    # a duplicated point (two workers ask for one run: the run folder's lock folds them), a DP and a
    # non-private method, two seeds
    grid = [{"method": "la-lora", "epsilon": 3.0}, {"method": "dp-lora", "epsilon": 3.0},
            {"method": "la-lora", "epsilon": 3.0}, {"method": "fedavg-lora", "epsilon": "inf"}]
    lines = []
    serial = run_grid(base, grid, [0, 1], tmp_path / "runs1", jobs=1, echo=None)
    parallel = run_grid(base, grid, [0, 1], tmp_path / "runs2", jobs=2, echo=lines.append)
    assert _what(parallel) == _what(serial)
    assert json.dumps(_what(parallel), sort_keys=True) == json.dumps(_what(serial), sort_keys=True)
    # 6 distinct runs, each trained once by a worker; the duplicates read the finished folder
    assert sum(not r["cached"] for r in parallel) == 6 == sum(not r["cached"] for r in serial)
    assert len({r["run_dir"] for r in parallel}) == 6
    assert sum("trained" in line and "at once" in line for line in lines) == 6
    # asking again serves every record from the folders, identical again
    again = run_grid(base, grid, [0, 1], tmp_path / "runs2", jobs=2, echo=None)
    assert all(r["cached"] for r in again) and _what(again) == _what(serial)
    torch.set_num_threads(threads)


def test_bad_jobs_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("LALORA_JOBS", "two")
    with pytest.raises(ValueError, match="LALORA_JOBS: expected a whole number >= 1, got 'two'"):
        nbtools.grid_jobs()
    monkeypatch.setenv("LALORA_JOBS", "0")
    with pytest.raises(ValueError, match="LALORA_JOBS"):
        nbtools.grid_jobs()
    monkeypatch.setenv("LALORA_JOBS", "3")
    assert nbtools.grid_jobs() == 3
    monkeypatch.delenv("LALORA_JOBS")
    assert nbtools.grid_jobs() == 1


def _hold_slot(spec, log, seconds):
    import os

    os.environ["LALORA_RUN_SLOTS"] = spec
    with nbtools.training_slot():
        log.put(("in", time.monotonic()))
        time.sleep(seconds)
        log.put(("out", time.monotonic()))


def test_slots_cap_the_runs_training_at_once_across_processes(tmp_path):
    """Four processes, two slots: never more than two inside at once (the runner gives every kernel
    and grid worker the same slots, so notebooks side by side never oversubscribe the cores)."""
    ctx = multiprocessing.get_context("spawn")
    log = ctx.Queue()
    spec = f"{tmp_path}:2"
    procs = [ctx.Process(target=_hold_slot, args=(spec, log, 0.6)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    events = sorted(log.get(timeout=5) for _ in range(8))
    events.sort(key=lambda e: (e[1], e[0] == "in"))   # at a tie, count the exit first
    inside = peak = 0
    for kind, _ in events:
        inside += 1 if kind == "in" else -1
        peak = max(peak, inside)
    assert peak == 2


def test_runner_sets_and_restores_the_grid_jobs_and_slots(monkeypatch):
    from lalora import notebooks as nbr

    monkeypatch.delenv("LALORA_RUN_SLOTS", raising=False)
    monkeypatch.setenv("LALORA_JOBS", "7")
    with nbr._run_slots(2):
        import os

        assert os.environ["LALORA_JOBS"] == "2"
        folder, count = os.environ["LALORA_RUN_SLOTS"].rsplit(":", 1)
        assert count == "2" and os.path.isdir(folder)
    assert os.environ["LALORA_JOBS"] == "7" and "LALORA_RUN_SLOTS" not in os.environ


def test_a_task_registered_in_this_process_only_trains_here(tmp_path, monkeypatch):
    """A task a notebook cell registers (a lambda in __main__) cannot be built by a fresh worker: the
    grid says so in one line and trains in this process, instead of failing in the workers."""
    from lalora.tasks import TASKS

    monkeypatch.setitem(TASKS, "cell-task", lambda **kw: None)
    assert nbtools._task_modules({"digits-swin"}) == ("lalora.tasks.vision",)
    assert nbtools._task_modules({"digits-swin", "cell-task"}) == "cell-task"
    lines = []
    cfgs = [nbtools.make_config({"task": "cell-task", "task_overrides": {}}, method="la-lora", seed=s) for s in (0, 1)]
    assert nbtools._train_in_parallel(cfgs, tmp_path, 2, lines.append) == set()
    assert lines == ["run_grid: task 'cell-task' is registered in this process only; its runs train here, "
                     "one at a time"]


def test_an_only_rerun_keeps_the_whole_pass_in_the_runner_summary(tmp_path):
    from lalora import notebooks as nbr

    path = tmp_path / "runner_summary.json"
    whole = {"profile": "evidence", "command": "lalora notebooks --profile evidence", "code": {"commit": "a"},
             "wall_seconds": 5000.0, "jobs": 2, "total_seconds": 9000.0, "notebooks": [{"name": "14_tuned_main"}]}
    assert nbr._with_earlier_pass(path, whole, partial=False) == whole   # nothing earlier: itself
    path.write_text(json.dumps(whole))
    rerun = {"profile": "evidence", "command": "lalora notebooks --profile evidence --only 10_report",
             "code": {"commit": "b"}, "wall_seconds": 20.0, "jobs": 2, "total_seconds": 20.0,
             "notebooks": [{"name": "10_report"}]}
    merged = nbr._with_earlier_pass(path, rerun, partial=True)
    assert merged["wall_seconds"] == 5000.0 and merged["command"] == whole["command"]
    assert merged["reruns"] == [{k: rerun[k] for k in ("command", "code", "wall_seconds", "notebooks")}]
    path.write_text(json.dumps(merged))
    assert len(nbr._with_earlier_pass(path, rerun, partial=True)["reruns"]) == 2
    # a whole pass starts the record again
    assert nbr._with_earlier_pass(path, whole, partial=False) == whole
