"""The session's private caches and the audit hook that records any touch of ~/.cache/lalora.

A module of its own (imported by conftest.py and by tests/test_cache_isolation.py) rather than
names in conftest.py: with two conftest.py files in the suite (tests/, kernels/tests/), `import
conftest` may resolve to the other one.
"""
import os
import sys
import tempfile
from pathlib import Path

USER_CACHE = Path.home() / ".cache" / "lalora"
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="lalora-test-cache-"))
os.environ["LALORA_CACHE"] = str(SESSION_CACHE / "lalora")
for _var, _sub in (("HF_HOME", "huggingface"), ("TORCH_HOME", "torch")):
    os.environ[_var] = str(SESSION_CACHE / _sub)


WATCHED = [str(USER_CACHE)]   # tests of the guard append a folder of their own
TOUCHED: list[tuple[str, str]] = []
_EVENTS = {"open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree"}


def _audit(event, args):
    if event in _EVENTS and args:
        path = args[0]
        if isinstance(path, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(path))
            if any(path == w or path.startswith(w + os.sep) for w in WATCHED):
                TOUCHED.append((event, path))


sys.addaudithook(_audit)
