"""Where the DP step's overhead goes: section timers around the engine's and dp.py's phases.

    PYTHONPATH=kernels/src:. .venv/bin/python benchmarks/dp_step_phases.py [--rounds 80]

The small Swin of dp_step.py (N = 32), one torch thread. Each round runs the non-private forward and
backward (timed separately) and dp_gradient (timed whole and by phase: engine build, enter, the
autograd.grad of the engine's backward, the arena fill, the finiteness check, clip + sum + noise,
writing p.grad), in alternating order. Process CPU time; medians and minima. The optimizer step is
left out of both (it is the same in both). Wrapping the phases costs a few microseconds each.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_step as B  # noqa: E402
import dplora_kernels.dp as D  # noqa: E402
import dplora_kernels.engine as E  # noqa: E402

TIMES: dict[str, list[float]] = {}


def _timed(label, f):
    @functools.wraps(f)
    def g(*a, **k):
        c = time.process_time()
        try:
            return f(*a, **k)
        finally:
            TIMES.setdefault(label, []).append(time.process_time() - c)
    return g


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=80)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for obj, name, label in [(E.PerSampleGradEngine, "__post_init__", "engine build"),
                             (E.PerSampleGradEngine, "__enter__", "engine enter"),
                             (E.PerSampleGradEngine, "_fill", "arena fill"),
                             (D, "_check_finite", "finiteness check + total norm"),
                             (D, "_privatize", "clip + sum + noise"), (D, "_write", "write p.grad")]:
        setattr(obj, name, _timed(label, getattr(obj, name)))
    torch.autograd.grad = _timed("autograd.grad (DP backward)", torch.autograd.grad)
    bench = B.swin_bench(32, 8)
    inputs, labels = bench.inputs, bench.labels
    plain, private = bench.build("ours"), bench.build("ours")
    gen = torch.Generator().manual_seed(2)

    def loss_fn(m, batch):
        *xs, y = batch
        return F.cross_entropy(m(*xs), y, reduction="none")

    def nondp():
        c = time.process_time()
        loss = F.cross_entropy(plain(*inputs), labels)
        TIMES.setdefault("non-DP forward", []).append(time.process_time() - c)
        c = time.process_time()
        loss.backward()
        TIMES.setdefault("non-DP backward", []).append(time.process_time() - c)
        for p in plain.parameters():
            p.grad = None

    def dp():
        c = time.process_time()
        D.dp_gradient(private, loss_fn, (*inputs, labels), clip_norm=1.0, noise_multiplier=1.0,
                      expected_batch_size=32.0, generator=gen, num_samples=32)
        TIMES.setdefault("DP step (no optimizer)", []).append(time.process_time() - c)
        for p in private.parameters():
            p.grad = None

    for _ in range(5):
        nondp()
        dp()
    TIMES.clear()
    load0 = os.getloadavg()
    for r in range(args.rounds):
        for f in ((nondp, dp) if r % 2 else (dp, nondp)):
            f()
    med = {k: statistics.median(v) * 1e3 for k, v in TIMES.items()}
    for k, v in TIMES.items():
        print(f"{k:32s} median {med[k]:7.3f} ms   min {min(v) * 1e3:7.3f} ms")
    base = med["non-DP forward"] + med["non-DP backward"]
    print(f"DP step - non-DP (forward + backward) = {med['DP step (no optimizer)'] - base:.3f} ms "
          f"({med['DP step (no optimizer)'] / base:.3f}x); load average {load0} -> {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
