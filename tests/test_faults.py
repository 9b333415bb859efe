"""Fault injection against lalora.results (run folders, checkpoints): what a crash, a corrupted
file or a full disk leaves behind.

Faults tried and what must happen:
- SIGKILL while a checkpoint is being written (child process saving in a loop; killed inside the
  write, deterministically, and at random moments): the previous checkpoint still loads.
- Flipped / truncated bytes in a checkpoint: refused with CheckpointCorruptedError naming the file;
  a run resuming from it stops with that error instead of training from garbage.
- ENOSPC (full disk) while writing a results file: OSError(ENOSPC) propagates, no partial target file
  and no temporary file remain, an existing target keeps its old content; a full disk while writing
  final.json leaves the run unfinished (and it completes on the next call).
- ENOSPC while appending a metrics line: the torn line is ignored on read and removed on resume.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lalora import results
from lalora.results import (CheckpointCorruptedError, RunDir, atomic_write_json, load_checkpoint,
                            read_json, save_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from lalora import results
    path, mode = sys.argv[1], sys.argv[2]
    real_fsync = os.fsync
    state = {"i": 0}
    def announcing_fsync(fd):
        # inside atomic_write_bytes: the new bytes are in the temp file, the rename has not happened
        if mode == "hang" and state["i"] >= 2:
            print("IN-WRITE", state["i"], flush=True)
            time.sleep(60)
        return real_fsync(fd)
    os.fsync = announcing_fsync
    w = torch.arange(300_000, dtype=torch.float32)       # ~1.2 MB per checkpoint
    for i in range(1, 10_000):
        state["i"] = i
        results.save_checkpoint(path, {"i": i, "w": w + i})
        print("SAVED", i, flush=True)
""")


def _spawn(path, mode):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), mode], stdout=subprocess.PIPE,
                            text=True, env=env)


def _check_ckpt(path, at_least=1):
    payload = load_checkpoint(path)
    i = int(payload["i"])
    assert i >= at_least
    torch.testing.assert_close(payload["w"], torch.arange(300_000, dtype=torch.float32) + i)
    return i


def test_sigkill_inside_checkpoint_write_keeps_previous(tmp_path):
    path = tmp_path / "checkpoint.pt"
    proc = _spawn(path, "hang")
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.split())
            if line.startswith("IN-WRITE"):
                break
        assert lines[-1] == ["IN-WRITE", "2"], lines
        os.kill(proc.pid, signal.SIGKILL)       # killed with checkpoint 2 half done
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _check_ckpt(path) == 1               # the previous checkpoint, intact
    # the killed write left only a hidden temp file, never a partial checkpoint.pt
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert all(n.startswith(".checkpoint.pt.") and n.endswith(".tmp") for n in leftovers)


def test_sigkill_at_a_random_moment_never_breaks_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    delay = float(torch.rand(1, generator=torch.Generator().manual_seed(0))) * 0.3
    proc = _spawn(path, "loop")
    try:
        for line in proc.stdout:          # wait for its first save, then kill at a seeded random time
            if line.startswith("SAVED"):
                break
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _check_ckpt(path)


def test_corrupted_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"i": 3, "w": torch.ones(1000)})
    raw = bytearray(path.read_bytes())
    for where in (len(raw) - 10, len(raw) // 2, len(results.CHECKPOINT_MAGIC) + 70):
        bad = bytearray(raw)
        bad[where] ^= 0xFF
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointCorruptedError, match="corrupted|not a lalora checkpoint") as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)
    path.write_bytes(bytes(raw[: len(raw) // 3]))                      # truncated
    with pytest.raises(CheckpointCorruptedError):
        load_checkpoint(path)
    path.write_bytes(b"")                                              # empty
    with pytest.raises(CheckpointCorruptedError, match="bad header"):
        load_checkpoint(path)
    path.write_bytes(bytes(raw))
    assert load_checkpoint(path)["i"] == 3


class _DiskFull:
    """A file object whose write stores half the bytes, then fails like a full disk."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _full_disk(monkeypatch):
    real_fdopen, real_open = os.fdopen, open
    monkeypatch.setattr(results.os, "fdopen", lambda *a, **k: _DiskFull(real_fdopen(*a, **k)))
    monkeypatch.setattr("builtins.open", lambda f, mode="r", *a, **k:
                        _DiskFull(real_open(f, mode, *a, **k)) if ("a" in mode or "w" in mode)
                        else real_open(f, mode, *a, **k))


def test_full_disk_leaves_no_partial_results_file(tmp_path, monkeypatch):
    target, old = tmp_path / "final.json", tmp_path / "old.json"
    atomic_write_json(old, {"v": 1})
    _full_disk(monkeypatch)
    for path in (target, old):
        with pytest.raises(OSError) as err:
            atomic_write_json(path, {"v": 2, "big": list(range(1000))})
        assert err.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "checkpoint.pt", {"w": torch.ones(100)})
    monkeypatch.undo()
    assert not target.exists() and not (tmp_path / "checkpoint.pt").exists()
    assert read_json(old) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]     # no temp files left


def test_full_disk_during_metrics_append_is_repaired_on_resume(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.append_metrics({"round": 1, "x": 1.0})
    _full_disk(monkeypatch)
    with pytest.raises(OSError):
        run.append_metrics({"round": 2, "x": 2.0})
    monkeypatch.undo()
    assert run.read_metrics() == [{"round": 1, "x": 1.0}]               # torn line ignored
    run.truncate_metrics(1)                                             # what resume does
    run.append_metrics({"round": 2, "x": 2.0})
    assert [r["round"] for r in run.read_metrics()] == [1, 2]


# ----------------------------------------------------------------------------- through run_experiment
@pytest.fixture
def tiny():
    from test_federated import tiny_config, tiny_task

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_task(), tiny_config
    torch.set_num_threads(n)


def test_full_disk_at_final_json_leaves_run_unfinished(tmp_path, monkeypatch, tiny):
    from lalora.federated.runs import run_experiment

    task, cfg_of = tiny
    cfg = cfg_of("la-lora", rounds=2, local_steps=2)
    real = results.atomic_write_json

    def failing(path, obj):
        if os.path.basename(path) == results.FINAL_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(results, "atomic_write_json", failing)
    with pytest.raises(OSError, match="No space"):
        run_experiment(cfg, runs_dir=tmp_path, task=task, progress=False)
    monkeypatch.undo()
    finals = list(tmp_path.rglob(results.FINAL_FILE))
    assert finals == []                                   # not mistaken for a finished run
    res = run_experiment(cfg, runs_dir=tmp_path, task=task, progress=False)   # disk freed: completes
    assert not res.cached and len(list(tmp_path.rglob(results.FINAL_FILE))) == 1
    assert res.final["epsilon_spent"] <= cfg.epsilon + 1e-6


def test_resume_from_corrupted_checkpoint_stops_with_clear_error(tmp_path, tiny):
    from lalora.federated.runs import run_experiment

    task, cfg_of = tiny
    cfg = cfg_of("dp-lora", rounds=2, local_steps=2)
    res = run_experiment(cfg, runs_dir=tmp_path, task=task, progress=False)
    run = RunDir(res.run_dir)
    run.final_path.unlink()                               # pretend it was killed before the end
    raw = bytearray(run.checkpoint_path.read_bytes())
    raw[-5] ^= 0xFF
    run.checkpoint_path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptedError, match="corrupted"):
        run_experiment(cfg, runs_dir=tmp_path, task=task, progress=False)
