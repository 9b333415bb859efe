"""One process trains a run folder at a time (lalora.results.RunDir.exclusive): two runner processes
sharing runs/ once trained the same run at once and interleaved its metrics.jsonl (issue 15's
offline-full production). A second caller waits for the lock, then reads the finished run."""
import threading
import time

import pytest

from lalora.federated.runs import run_experiment
from lalora.results import RunDir, read_jsonl
from test_federated import tiny_config, tiny_task

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_lock_excludes_a_second_holder(tmp_path):
    run_dir = RunDir(tmp_path / "t" / "m" / "abc")
    entered = threading.Event()

    def second():
        with run_dir.exclusive():
            entered.set()

    with run_dir.exclusive():
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.5)          # blocked while the first holds it
    assert entered.wait(5)                    # and enters once it is released
    t.join(5)
    run_dir.reset()                           # forgetting an attempt keeps the lock file
    assert (run_dir.path / ".lock").exists()


def test_a_second_run_of_the_same_config_waits_for_the_first(tmp_path):
    cfg = tiny_config("la-lora", rounds=2)
    first = run_experiment(cfg, runs_dir=tmp_path, task=tiny_task(), progress=False)
    run_dir = RunDir(first.run_dir)
    before = run_dir.metrics_path.read_bytes()
    out = {}

    def rerun():   # force: recompute the finished run, so it must take the lock
        out["r"] = run_experiment(cfg, runs_dir=tmp_path, task=tiny_task(), progress=False, force=True)

    with run_dir.exclusive():
        t = threading.Thread(target=rerun)
        t.start()
        time.sleep(1.0)
        assert t.is_alive() and run_dir.metrics_path.read_bytes() == before   # waiting, nothing written
    t.join(60)
    assert not t.is_alive()
    assert [m["round"] for m in read_jsonl(run_dir.metrics_path)] == [1, 2]
    assert out["r"].final["accuracy"] == first.final["accuracy"]
