"""Round throughput of client batching vs sequential clients (DP on): issue 14's benchmark.

    PYTHONPATH=kernels/src:. .venv/bin/python benchmarks/batched_clients.py [--reps 5] [--rounds 3]
    ... --task smoke-swin-t --device cuda --local-steps 5 --reps 1 --rounds 2   (make gpu-check, stage 4)

Setup: digits-swin (the offline Swin backbone), 480 private images (or smoke-swin-t: the paper's Swin-T
at 224² on generated images, 64 per client), 8 clients (iid), 4 per round, --local-steps local steps,
batch 16, dp-lora at epsilon 3 (--method for another). Each measurement is a fresh subprocess (so peak
memory is its own) that builds the simulator, runs one warm-up round (Triton compiles there), then
`--rounds` rounds; it reports seconds per round -- process CPU time on the CPU, wall time after
torch.cuda.synchronize on a GPU (setup and warm-up excluded) -- and peak memory (ru_maxrss; on a GPU
also torch.cuda.max_memory_allocated). Modes are interleaved (seq, batched, batched, seq, ...) and the
medians reported. 1 torch thread.
Also reported, the bound: a plain non-private forward+backward of the same backbone on 4 batches of 16
vs one of 64, measured once per repetition between the rounds (medians), and `fraction_of_merged_bound` =
throughput ratio / that bound's ratio (issue 30's goal: >= 0.9). Since a batched round cannot cost less than local_steps forward+backward passes of 64,
`max_ratio_any_batching` = sequential s/round / (local_steps x 1x64) is the most any batching can reach
on that machine. `--bound-only` runs just the bound.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from lalora.config import RunConfig
from lalora.federated.simulation import Simulator
from lalora.tasks import get_task
a = json.loads(sys.argv[1])
cfg = RunConfig(task=a["task"], method=a["method"], epsilon=3.0, seed=0, rounds=a["rounds"] + 1,
                local_steps=a["local_steps"], batch_size=16, clients=8, clients_per_round=4, partition="iid",
                eval_batch_size=256, client_batching=a["batching"], task_overrides=a["task_kwargs"],
                device=a["device"], precision=a["precision"])
sim = Simulator(cfg, task=get_task(a["task"], **a["task_kwargs"]))
cuda = sim.device.type == "cuda"
clock = time.perf_counter if cuda else time.process_time   # GPU: wall time after a sync; CPU: process CPU time
state = sim.initial_global_state()
def round_(t):
    global state
    state = sim.server_aggregate(sim.clients_update(sim.sampled_clients(t), t, state), t, state)
    if cuda:
        torch.cuda.synchronize(sim.device)
round_(1)   # warm-up: first launches compile the Triton kernels
if cuda:
    torch.cuda.reset_peak_memory_stats(sim.device)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = clock()
for t in range(2, a["rounds"] + 2):
    round_(t)
sec = (clock() - t0) / a["rounds"]
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"s_per_round": sec, "clock": "wall (cuda synchronised)" if cuda else "process CPU", "device": str(sim.device),
       "peak_rss_growth_kb": rss1 - rss0, "peak_rss_kb": rss1}
if cuda:
    out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(sim.device) / 2**20
    out["gpu"] = torch.cuda.get_device_name(sim.device)
print("RESULT " + json.dumps(out))
"""


BOUND = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(1)
from lalora.tasks import get_task
a = json.loads(sys.argv[1])
dev = torch.device("cuda" if a["device"] == "cuda" else "cpu")
task = get_task(a["task"], **a["task_kwargs"])
model = task.build_model().to(dev); model.train()
x = {k: v.to(dev) for k, v in task.train.batch(list(range(64))).items()}
def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
clock = time.perf_counter if dev.type == "cuda" else time.process_time
def fb(b):
    task.forward(model, b).sum().backward()
def four():
    for j in range(4):
        fb({k: v[16 * j:16 * j + 16] for k, v in x.items()})
def one():
    fb(x)
ts = {"4x16": [], "1x64": []}
four(); one()
for i in range(10):
    for name, f in ((("4x16", four), ("1x64", one)) if i % 2 == 0 else (("1x64", one), ("4x16", four))):
        sync(); t = clock(); f(); sync(); ts[name].append(clock() - t)
print("RESULT " + json.dumps({k: statistics.median(v) for k, v in ts.items()}))
"""


def _child(script: str, args: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", LALORA_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"benchmark child failed ({args}):\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def bound(args: dict) -> dict:
    """Upper bound of batching here: a plain (non-private) forward+backward of the same backbone, 4
    batches of 16 vs one of 64, interleaved, medians. A batched round can cost no less than
    local_steps plain forward+backward passes of 64, so sequential s/round / (local_steps x 1x64) bounds
    the throughput ratio any batching can reach on this machine."""
    r = _child(BOUND, args)
    return {**r, "ratio_4x16_over_1x64": r["4x16"] / r["1x64"]}


TASK_KWARGS = {"digits-swin": {"max_train_samples": 480},
               # 8 clients x 64 generated 224^2 images; the paper's Swin-T, LoRA and K (local steps from --local-steps)
               "smoke-swin-t": {"samples_per_client": 64, "test_size": 8}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="dp-lora")
    ap.add_argument("--task", default="digits-swin", choices=sorted(TASK_KWARGS))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bound-only", action="store_true")
    ap.add_argument("--json", help="also write the summary here")
    a = ap.parse_args(argv)
    load_start = os.getloadavg()   # before the children run (the summary's own reading is the end's)
    base = {"task": a.task, "method": a.method, "device": a.device, "precision": a.precision,
            "local_steps": a.local_steps, "rounds": a.rounds, "task_kwargs": TASK_KWARGS[a.task]}
    if a.bound_only:
        out = bound(base)
        print(json.dumps(out, indent=1))
        return out
    res = {"sequential": [], "batched": []}
    bounds = []
    for i in range(a.reps):
        for b in ((False, True) if i % 2 == 0 else (True, False)):
            r = _child(CHILD, {**base, "batching": b})
            res["batched" if b else "sequential"].append(r)
            print(("batched   " if b else "sequential"), r, flush=True)
        # the bound in every repetition, between the rounds it bounds: on a shared machine the load
        # changes within minutes, and a bound measured once at the end compared other conditions
        bounds.append(bound(base))
        print("bound     ", bounds[-1], flush=True)
    num = [f for f, v in res["sequential"][0].items() if isinstance(v, (int, float))]
    med = {k: {f: statistics.median(r[f] for r in v) for f in num} for k, v in res.items()}
    seq, bat = med["sequential"], med["batched"]
    summary = {**{k: v for k, v in base.items() if k != "rounds"}, "rounds_timed": a.rounds, "reps": a.reps,
               "clock": res["sequential"][0]["clock"], "gpu": res["sequential"][0].get("gpu"),
               "load_average": load_start, "medians": med,
               "throughput_ratio_batched_over_sequential": seq["s_per_round"] / bat["s_per_round"],
               "peak_rss_ratio_batched_over_sequential": bat["peak_rss_kb"] / seq["peak_rss_kb"]}
    if "peak_cuda_mib" in seq:
        summary["peak_cuda_ratio_batched_over_sequential"] = bat["peak_cuda_mib"] / seq["peak_cuda_mib"]
    bd = {k: statistics.median(r[k] for r in bounds) for k in bounds[0]}
    bd["max_ratio_any_batching"] = seq["s_per_round"] / (a.local_steps * bd["1x64"])
    summary["plain_forward_backward_bound"] = bd
    # issue 30's goal: the batched round shares at least 90% of what merging batches buys a plain
    # forward+backward on this machine (throughput ratio / bound ratio, medians of the same run)
    summary["fraction_of_merged_bound"] = (summary["throughput_ratio_batched_over_sequential"]
                                           / bd["ratio_4x16_over_1x64"])
    summary["load_average_end"] = os.getloadavg()
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
