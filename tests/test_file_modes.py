"""Issue 29: files a user may share (final.json, config.json, checkpoints, site pages: everything
written through lalora.results.atomic_write_bytes) get the permissions of a plainly created file,
0666 less the umask (0644 under umask 022), not mkstemp's 0600; a stricter umask is respected."""
from __future__ import annotations

import os
import stat

import pytest

from lalora.results import atomic_write_bytes, atomic_write_json


@pytest.fixture
def umask():
    def set_(mask: int) -> None:
        os.umask(mask)
    old = os.umask(0o022)
    os.umask(old)
    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, want):
    umask(mask)
    atomic_write_json(tmp_path / "final.json", {"a": 1})
    atomic_write_bytes(tmp_path / "page.html", b"<p>x</p>")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")                                   # what metrics.jsonl gets (open "a")
    for name in ("final.json", "page.html", "plain.txt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == want, name
    assert atomic_write_bytes(tmp_path / "cache.pt", b"x", mode=0o640)   # an explicit mode still wins
    assert stat.S_IMODE(os.stat(tmp_path / "cache.pt").st_mode) == 0o640


def test_a_run_folder_is_all_0644_under_umask_022(tmp_path, umask):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_federated import tiny_config, tiny_task

    from lalora.federated.runs import run_experiment

    umask(0o022)
    res = run_experiment(tiny_config(rounds=1), runs_dir=tmp_path, progress=False, task=tiny_task())
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path(res.run_dir).iterdir() if p.is_file()}
    assert {"final.json", "config.json", "metrics.jsonl", "checkpoint.pt"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes
