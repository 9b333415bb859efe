"""Suite-wide settings: offline, and one intra-op thread per test process.

The tests use tiny shapes, where torch's thread pool costs more than it saves, and on a loaded
2-core machine two threads per process oversubscribe the cores (measured: a tiny Swin step took
3.3 s with 2 threads vs 0.10 s with 1 under load). Set LALORA_TEST_THREADS to override.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("LALORA_TEST_THREADS", "1")))
