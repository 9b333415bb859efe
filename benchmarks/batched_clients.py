"""Round throughput of client batching vs sequential clients on digits-swin (CPU, DP on).

    PYTHONPATH=kernels/src:. .venv/bin/python benchmarks/batched_clients.py [--reps 5] [--rounds 3]

Setup: digits-swin (the offline Swin backbone), 480 private images, 8 clients (iid), 4 per round,
10 local steps, batch 16 (q = 16/60), dp-lora at epsilon 3 (and la-lora with --method). Each
measurement is a fresh subprocess (so peak RSS is its own) that builds the simulator, runs one
warm-up round, then `--rounds` rounds; it reports process CPU time per round (time.process_time,
setup and warm-up excluded) and the growth of peak RSS (ru_maxrss) during those rounds. Modes are
interleaved (seq, batched, batched, seq, ...) and the medians reported. 1 torch thread.
Also reported: the upper bound batching can reach here, a plain non-private forward+backward of the
same backbone on 4 batches of 16 vs one batch of 64 (`--bound-only` runs just that).
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
method, batching, rounds = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
cfg = RunConfig(task="digits-swin", method=method, epsilon=3.0, seed=0, rounds=rounds + 1, local_steps=10,
                batch_size=16, clients=8, clients_per_round=4, partition="iid", eval_batch_size=256,
                client_batching=batching, task_overrides={"max_train_samples": 480})
sim = Simulator(cfg, task=get_task("digits-swin", max_train_samples=480))
state = sim.initial_global_state()
def round_(t):
    global state
    state = sim.server_aggregate(sim.clients_update(sim.sampled_clients(t), t, state), t, state)
round_(1)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.process_time()
for t in range(2, rounds + 2):
    round_(t)
cpu = (time.process_time() - t0) / rounds
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps({"cpu_s_per_round": cpu, "peak_rss_growth_kb": rss1 - rss0, "peak_rss_kb": rss1}))
"""


BOUND = r"""
import json, statistics, time, torch
torch.set_num_threads(1)
from lalora.tasks import get_task
task = get_task("digits-swin", max_train_samples=480)
model = task.build_model(); model.train()
x = task.train.batch(list(range(64)))
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
        t = time.process_time(); f(); ts[name].append(time.process_time() - t)
print("RESULT " + json.dumps({k: statistics.median(v) for k, v in ts.items()}))
"""


def bound() -> dict:
    """Upper bound of batching on this CPU: a plain (non-private) forward+backward of the same
    backbone, 4 batches of 16 vs one of 64, interleaved, medians of process CPU time."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", BOUND], env=env, capture_output=True, text=True, check=True).stdout
    r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return {**r, "ratio_4x16_over_1x64": r["4x16"] / r["1x64"]}


def measure(method: str, batching: bool, rounds: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", LALORA_PROGRESS="0")
    out = subprocess.run([sys.executable, "-c", CHILD, method, "1" if batching else "0", str(rounds)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="dp-lora")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bound-only", action="store_true")
    args = ap.parse_args()
    if args.bound_only:
        print(json.dumps(bound(), indent=1))
        return
    res = {"sequential": [], "batched": []}
    for i in range(args.reps):
        order = (False, True) if i % 2 == 0 else (True, False)
        for b in order:
            r = measure(args.method, b, args.rounds)
            res["batched" if b else "sequential"].append(r)
            print(("batched   " if b else "sequential"), r, flush=True)
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in res.items()}
    summary = {
        "method": args.method, "load_average": os.getloadavg(), "medians": med,
        "throughput_ratio_batched_over_sequential": med["sequential"]["cpu_s_per_round"] / med["batched"]["cpu_s_per_round"],
        "peak_rss_ratio_batched_over_sequential": med["batched"]["peak_rss_kb"] / med["sequential"]["peak_rss_kb"],
    }
    summary["plain_forward_backward_bound"] = bound()
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
