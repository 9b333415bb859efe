"""Before/after benchmark of the DP step's engine: one process, three interleaved variants.

    git -C . archive <older-commit> kernels/src | tar -x -C /tmp/before
    PYTHONPATH=kernels/src:. .venv/bin/python benchmarks/engine_ab.py --before-src /tmp/before/kernels/src \
        [--rounds 41] [--model swin|minilm] [--json out.json]

Variants on the models of benchmarks/dp_step.py (each its own copy, same batch, SGD step included):
  nondp       our LoRA layers, ordinary mean-loss backward
  dp_before   dp_gradient of the dplora_kernels found under --before-src (imported under another
              package name; its LoRA layer is replaced by the current one so both engines hook the
              same modules -- lora.py is the same in both unless the LoRA layer itself changed)
  dp_after    dp_gradient of the current dplora_kernels
Rounds in a rotating order (load drift hits all alike); process CPU time per step; medians and the
median of the per-round paired ratio dp_after / dp_before. torch.set_num_threads(--threads).
Separate runs of dp_step.py scatter by several percent on a shared machine, more than an engine
change of a millisecond moves them; pairing in one process is what resolves such a change.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_step as B  # noqa: E402


def load_before(src: str):
    """Import <src>/dplora_kernels as the package `dplora_kernels_before` (with the current LoRA layer)."""
    tmp = tempfile.mkdtemp(prefix="engine_ab_")
    shutil.copytree(os.path.join(src, "dplora_kernels"), os.path.join(tmp, "dplora_kernels_before"))
    with open(os.path.join(tmp, "dplora_kernels_before", "lora.py"), "w") as f:
        f.write("from dplora_kernels.lora import *  # noqa\nfrom dplora_kernels.lora import LoRALinear, check_rank  # noqa\n")
    sys.path.insert(0, tmp)
    import dplora_kernels_before.dp as before_dp
    return before_dp


def dp_step(dp_module, bench):
    model = bench.build("ours")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=B.LR)
    gen = torch.Generator().manual_seed(2)
    n = bench.labels.shape[0]

    def loss_fn(m, batch):
        *xs, y = batch
        return F.cross_entropy(m(*xs), y, reduction="none")

    def step():
        opt.zero_grad(set_to_none=True)
        dp_module.dp_gradient(model, loss_fn, (*bench.inputs, bench.labels), clip_norm=B.CLIP_NORM,
                              noise_multiplier=B.NOISE_MULTIPLIER, expected_batch_size=float(n), generator=gen,
                              num_samples=n)
        opt.step()
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before-src", required=True, help="a kernels/src folder of the older code")
    ap.add_argument("--model", choices=("swin", "minilm"), default="swin")
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here (atomically)")
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.before_src, "dplora_kernels")):
        ap.error(f"--before-src: no dplora_kernels package in {args.before_src!r}")
    torch.set_num_threads(args.threads)
    import dplora_kernels.dp as after_dp
    before_dp = load_before(args.before_src)
    bench = B.swin_bench(32, 8) if args.model == "swin" else B.minilm_bench(32, 128, 8)
    steps = {"nondp": B.make_step("nondp", bench), "dp_before": dp_step(before_dp, bench),
             "dp_after": dp_step(after_dp, bench)}
    for s in steps.values():
        for _ in range(args.warmup):
            s()
    times = {v: [] for v in steps}
    order = list(steps)
    load0 = os.getloadavg()
    for rep in range(args.rounds):
        for v in order[rep % 3:] + order[:rep % 3]:
            c0 = time.process_time()
            steps[v]()
            times[v].append((time.process_time() - c0) * 1e3)
    med = {v: statistics.median(t) for v, t in times.items()}
    out = {"model": args.model, "rounds": args.rounds, "threads": args.threads,
           "cpu_ms_median": {v: round(x, 2) for v, x in med.items()},
           "before_over_nondp": round(med["dp_before"] / med["nondp"], 3),
           "after_over_nondp": round(med["dp_after"] / med["nondp"], 3),
           "after_over_before_paired": round(statistics.median(
               a / b for a, b in zip(times["dp_after"], times["dp_before"])), 3),
           "loadavg_start_end": [list(load0), list(os.getloadavg())],
           "cpu_times_ms": {v: [round(x, 2) for x in t] for v, t in times.items()}}
    print({k: v for k, v in out.items() if k != "cpu_times_ms"})
    if args.json:
        from lalora.results import atomic_write_json
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
