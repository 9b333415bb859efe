"""Issue 29: every bad input reaches the user as ONE line on stderr and exit 2 (130 for Ctrl-C),
through the real `lalora` command in its own process, and leaves nothing half-written.

Each case runs `python -m lalora.cli ...` (what the `lalora` script calls). Ctrl-C is a real
SIGINT sent to a run that is training (the tests' tiny task, registered by tests/_tiny_cli.py);
running the same command again says it resumes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CLI = Path(__file__).resolve().parent / "_tiny_cli.py"


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels" / "src"),
                                                       os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", LALORA_PROGRESS="0")
    env.update(extra)
    return env


def lalora(*argv: str, cli=None, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(cli)] if cli else [sys.executable, "-m", "lalora.cli"]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, env=_env(**env), cwd=ROOT,
                          timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The error is one line; notices of long work (``lalora: calibrating ...``) may precede it."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback (most recent call last)" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not (line.startswith("lalora: ") and " error: " not in line)]
    assert len(lines) == 1, proc.stderr
    err = lines[0]
    for needle in needles:
        assert needle in err, err
    return err


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: chmod 0555 for a normal user; as root (which
    ignores permission bits) a path on sysfs, which refuses new files even to root."""
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        return ro / "inside"
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pass
    except OSError:
        return Path("/sys/lalora-not-writable")
    pytest.skip("running as root with no read-only filesystem to test against")


RUN = ["run", "--task", "digits-swin", "--method", "la-lora", "--quiet"]


@pytest.mark.parametrize("extra,needles", [
    (["--task-option", "max_train_samples={bad"], ["--task-option max_train_samples", "expected a whole number"]),
    (["--task-option", "no_such_option=1"], ["no_such_option", "it takes:"]),
    (["--threads", "0"], ["--threads", "must be >= 1"]),
    (["--rounds", "100000"], ["rounds x local_steps", "at most 100,000"]),
    (["--epsilon", "three"], ["--epsilon", "not a number"]),
])
def test_bad_run_option_is_one_line_exit_2_and_writes_nothing(tmp_path, extra, needles):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    proc = lalora(*RUN, "--runs-dir", str(runs), *extra, LALORA_CACHE=str(cache))
    assert_one_line(proc, 2, *needles)
    assert files_under(runs) == [] and files_under(cache) == []


def test_runs_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    for runs in (tmp_path / "afile", tmp_path / "afile" / "below"):
        proc = lalora(*RUN, "--runs-dir", str(runs), LALORA_CACHE=str(tmp_path / "cache"))
        assert_one_line(proc, 2, "--runs-dir", "is not a folder")
    assert (tmp_path / "afile").read_text() == "x" and not (tmp_path / "cache").exists()


def test_unwritable_runs_dir_and_cache_are_refused_before_any_work(tmp_path):
    bad = unwritable_folder(tmp_path)
    t0 = time.perf_counter()
    proc = lalora(*RUN, "--runs-dir", str(bad), LALORA_CACHE=str(tmp_path / "cache"))
    assert_one_line(proc, 2, "--runs-dir", "not writable")
    proc = lalora(*RUN, "--runs-dir", str(tmp_path / "runs"), LALORA_CACHE=str(bad))
    assert_one_line(proc, 2, "LALORA_CACHE", "not writable")
    # refused before pretraining (a cold digits backbone takes ~30 s) or calibration
    assert time.perf_counter() - t0 < 60
    assert files_under(tmp_path) == []


def test_os_error_inside_a_command_is_one_line(tmp_path):
    """An OSError no command foresaw (here: --json into a folder that is a file) meets the top-level
    boundary: one line naming the path, exit 2; --debug shows the traceback."""
    (tmp_path / "afile").write_text("x")
    target = str(tmp_path / "afile" / "out.json")
    argv = ["audit", "--trials", "8", "--json", target]
    assert_one_line(lalora(*argv), 2, "afile", "not a folder")
    proc = lalora("--debug", *argv)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("argv,needles", [
    (["accountant", "--sample-rate", "0.1", "--steps", "10"], ["give --epsilon, --sigma, or both"]),
    (["accountant", "--sample-rate", "2", "--steps", "10", "--epsilon", "1"], ["sample_rate"]),
    (["audit", "--trials", "1"], ["--trials must be >= 4"]),
    (["no-such-command"], ["invalid choice"]),
    (["run", "--task", "digits-swin"], ["--method"]),
])
def test_every_command_uses_exit_2_for_bad_input(argv, needles):
    assert_one_line(lalora(*argv), 2, *needles)


def _wait_for_rounds(metrics: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.1)
    raise AssertionError("no round finished in time")


def test_ctrl_c_is_one_line_exit_130_and_the_same_command_resumes(tmp_path):
    runs = tmp_path / "runs"
    argv = ["run", "--task", "tiny", "--method", "la-lora", "--epsilon", "3", "--accountant", "rdp",
            "--rounds", "2000", "--runs-dir", str(runs), "--quiet"]
    proc = subprocess.Popen([sys.executable, str(TINY_CLI), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(LALORA_CACHE=str(tmp_path / "c")), cwd=ROOT)
    try:
        (run_dir,) = _wait_for_folder(runs / "tiny" / "la-lora", proc)
        _wait_for_rounds(run_dir / "metrics.jsonl", 3, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    errors = [line for line in err.strip().splitlines() if not line.startswith("lalora: ")]
    assert len(errors) == 1, err
    err = errors[0]
    assert "interrupted at round" in err and "of 2000" in err and "run the same command again to resume" in err
    # nothing half-written: no temporary file left, every metrics line whole, no final.json
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not (run_dir / "final.json").exists() and records
    finished = int(err.split("(")[1].split(" finished")[0])
    assert finished >= records[-1]["round"] - 1
    # the same command again resumes and says so (killed one round later to keep the test short)
    again = subprocess.run([sys.executable, str(TINY_CLI), *argv], capture_output=True, text=True, cwd=ROOT,
                           env=_env(LALORA_CACHE=str(tmp_path / "c"),
                                    LALORA_KILL_AFTER_ROUND=str(records[-1]["round"] + 1)), timeout=240)
    assert again.returncode == -signal.SIGKILL, again.stderr
    assert f"resuming {run_dir} at round " in again.stderr, again.stderr


def _wait_for_folder(parent: Path, proc: subprocess.Popen, timeout: float = 240) -> list[Path]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if parent.exists() and (found := [p for p in parent.iterdir() if (p / "config.json").exists()]):
            return found
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.1)
    raise AssertionError("the run folder never appeared")


def test_disk_full_and_other_os_errors_read_as_one_line():
    import errno

    from lalora.cli import describe_os_error

    full = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "runs/x/final.json"))
    assert "no space left" in full and "runs/x/final.json" in full and "run the same command again" in full
    denied = describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/data/runs"))
    assert "cannot write /data/runs" in denied and "LALORA_CACHE" in denied
    assert "\n" not in full + denied
