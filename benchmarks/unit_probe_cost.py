"""Cost of the clipping-unit probe (issue 16) relative to a federated run, on digits-swin.

Measures, in process CPU time (time.process_time), interleaved, medians over repeats:
  probe   = Simulator.verify_clipping_unit() (run once at the start of every run)
  update  = one Simulator.client_update (K local DP steps of one client)
and reports probe / (update x client updates of the task's default run) and probe / update.

    PYTHONPATH=kernels/src:. LALORA_CACHE=/work/cache python benchmarks/unit_probe_cost.py
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch


def main(repeats: int = 5) -> dict:
    from lalora.config import RunConfig
    from lalora.federated.simulation import Simulator

    torch.set_num_threads(1)
    sim = Simulator(RunConfig(task="digits-swin", method="la-lora", epsilon=3.0, seed=0))
    state = sim.initial_global_state()
    cfg = sim.cfg
    probe, update = [], []
    for i in range(repeats):
        t0 = time.process_time()
        sim.verify_clipping_unit()
        probe.append(time.process_time() - t0)
        t0 = time.process_time()
        sim.client_update(sim.sampled_clients(1)[0], 1, state)
        update.append(time.process_time() - t0)
    p, u = statistics.median(probe), statistics.median(update)
    updates_per_run = cfg.rounds * cfg.clients_per_round
    out = {"task": cfg.task, "rounds": cfg.rounds, "clients_per_round": cfg.clients_per_round,
           "local_steps": cfg.local_steps, "batch_size": cfg.batch_size, "repeats": repeats,
           "probe_cpu_s_median": p, "client_update_cpu_s_median": u,
           "client_updates_per_run": updates_per_run,
           "probe_over_run": p / (u * updates_per_run), "probe_over_one_update": p / u,
           "loadavg": os.getloadavg()}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
