"""Shared set-up of the gpu_check scripts: device, DRYRUN=1 (CPU, Triton interpreter, tiny shapes,
timings meaningless), result files under $OUT."""

import json
import os
import statistics
import time

DRY = os.environ.get("DRYRUN", "0") == "1"
if not DRY and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("gpu_check: run with TRITON_INTERPRET=0 on the GPU (or DRYRUN=1 on a CPU)")
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported
import torch  # noqa: E402

OUT = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gpu_check_out")
os.makedirs(OUT, exist_ok=True)
if not DRY and not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device (use DRYRUN=1 for the CPU dry run)")
dev = torch.device("cpu" if DRY else "cuda")


def gpu_name() -> str:
    return "CPU dry run (timings meaningless)" if DRY else torch.cuda.get_device_name(dev)


def sync():
    if not DRY:
        torch.cuda.synchronize(dev)


def time_ms(fn, reps=20, warmup=3) -> float:
    """Median over reps of one call, CUDA events on the GPU (wall clock in the dry run, 1 rep)."""
    if DRY:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def peak_mib(fn) -> float:
    """Peak allocated memory above the level before the call, MiB (0 in the dry run)."""
    if DRY:
        fn()
        return 0.0
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    sync()
    return (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20


def write_json(name: str, data) -> str:
    path = os.path.join(OUT, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def rel(got, want) -> float:
    """max |got - want| / max |want| (the kernel tests' metric)."""
    got, want = got.detach().double(), want.detach().to(got.device).double()   # on the GPU: big tensors
    s = want.abs().max().item() if want.numel() else 1.0
    return (got - want).abs().max().item() / max(s, 1e-300) if want.numel() else 0.0
