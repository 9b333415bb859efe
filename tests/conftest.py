"""Suite-wide settings: offline, one intra-op thread per test process, and a private cache.

The tests use tiny shapes, where torch's thread pool costs more than it saves, and on a loaded
2-core machine two threads per process oversubscribe the cores (measured: a tiny Swin step took
3.3 s with 2 threads vs 0.10 s with 1 under load). Set LALORA_TEST_THREADS to override.

Caches: tests never read or write the user's ``~/.cache`` (issue 19: a warm user cache hid what a
fresh clone computes). ``LALORA_CACHE`` and the Hugging Face/torch caches point at one temporary
folder for the whole session (inherited by subprocesses); a test may still point them at its own
``tmp_path``. An audit hook records every open/mkdir/rename/remove of a path under the real
``~/.cache/lalora`` by the test process, and the session fails if there was one
(``pytest_sessionfinish``). (A snapshot of the folder would not do: other processes of the same
user may legitimately write there while the tests run.)
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _cache_guard import TOUCHED, USER_CACHE  # noqa: E402  (sets the cache env vars, installs the hook)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("LALORA_TEST_THREADS", "1")))


@pytest.fixture
def one_thread():
    """One intra-op thread for this test even when LALORA_TEST_THREADS asks for more (bitwise
    comparisons between runs), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_sessionfinish(session, exitstatus):
    touched = [t for t in TOUCHED if t[1].startswith(str(USER_CACHE))]
    if touched:
        print(f"\nFAILED: the tests touched the user's cache {USER_CACHE}: {touched[:5]} "
              "(tests must use LALORA_CACHE / tmp_path)")
        session.exitstatus = 1
