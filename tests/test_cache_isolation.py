"""Tests never use the user's ~/.cache/lalora (conftest points every cache at a session temp
folder and fails the session if the real one changed)."""
import os
from pathlib import Path

import _cache_guard as guard
from _cache_guard import SESSION_CACHE, USER_CACHE


def test_every_lalora_cache_path_is_inside_the_session_temp_folder():
    from lalora.privacy.accountant import _sigma_cache_file
    from lalora.tasks.pretrain import cache_dir

    for path in (cache_dir(), _sigma_cache_file((3.0, 1e-5, 0.1, 10, "prv", 0.01))):
        assert Path(path).resolve().is_relative_to(SESSION_CACHE.resolve()), path
        assert not Path(path).resolve().is_relative_to(USER_CACHE.resolve())
    assert Path(os.environ["HF_HOME"]).is_relative_to(SESSION_CACHE)


def test_the_guard_records_a_write_under_a_watched_folder(tmp_path):
    watched = str(tmp_path / "cache")
    guard.WATCHED.append(watched)
    try:
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "x.json").write_text("{}")
        (tmp_path / "elsewhere.json").write_text("{}")
    finally:
        guard.WATCHED.remove(watched)
        hits = [t for t in guard.TOUCHED if t[1].startswith(watched)]
        guard.TOUCHED[:] = [t for t in guard.TOUCHED if not t[1].startswith(watched)]
    assert ("os.mkdir", watched) in hits
    assert any(e == "open" and p.endswith("x.json") for e, p in hits)
    assert not any(p.endswith("elsewhere.json") for _, p in hits)
