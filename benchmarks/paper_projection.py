"""Price the paper grids: seconds per round of each method (and precision) on the smoke tasks,
projected to the wall time of the full paper vision and language grids on this device.

    python benchmarks/paper_projection.py --device cuda --precisions fp32,bf16 --out benchmarks/paper_projection_h100.md
    LALORA_SMOKE_SIZE=cpu python benchmarks/paper_projection.py --rounds 2 --out /tmp/proj.md   # machinery check

What is measured: the smoke tasks (lalora.tasks.smoke: the paper's models, random weights,
generated inputs at the paper's shapes unless LALORA_SMOKE_SIZE=cpu) run through the real
Simulator (client DP steps, aggregation, evaluation) for ``--rounds`` rounds. Per method: the
median over timed rounds (the first is a warm-up when there are two or more) of the training
wall time per local DP step, and the evaluation wall time per test item.

What is projected: each grid as the paper profile defines it (notebooks/params/paper/01 and 02:
tasks × methods × ε × seeds, plus the non-private reference runs), each run costing
``rounds × K × clients_per_round × s/step + evaluations × test items × s/item`` with the profile's
rounds, K, clients per round, evaluation cadence and the real test-set sizes. ε does not change
the work of a step (σ only scales the noise), so one ε is timed. Time per step does not depend on
the data set (same shapes), so CIFAR-100 and Tiny-ImageNet share the smoke-swin timing; GLUE
tasks share smoke-roberta-base at max_len 128 (SST-2 runs at 64: an upper bound there).

On a CPU at LALORA_SMOKE_SIZE=cpu the shapes are reduced: the table then checks the machinery
and is labelled as such; it is not a GPU number.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "notebooks" / "params" / "paper"
GRIDS = {"vision": "01_main_vision.yaml", "language": "02_main_language.yaml"}
SMOKE_OF = {"cifar100-swin-t": "smoke-swin-t", "tinyimagenet-swin-t": "smoke-swin-t",
            "cifar100-swin-b": "smoke-swin-b", "tinyimagenet-swin-b": "smoke-swin-b",
            "sst2-roberta": "smoke-roberta-base", "qnli-roberta": "smoke-roberta-base",
            "mnli-roberta": "smoke-roberta-base", "qqp-roberta": "smoke-roberta-base"}
# Test items evaluated per evaluation: CIFAR-100 test set, Tiny-ImageNet val set, GLUE dev sets
# (MNLI: dev_matched), as released.
TEST_ITEMS = {"cifar100-swin-t": 10_000, "cifar100-swin-b": 10_000, "tinyimagenet-swin-t": 10_000,
              "tinyimagenet-swin-b": 10_000, "sst2-roberta": 872, "qnli-roberta": 5_463,
              "mnli-roberta": 9_815, "qqp-roberta": 40_430}


def grid_runs(params: dict) -> list[dict]:
    """Every run of a main-table notebook's grid: one dict per (task, method, ε, seed)."""
    runs = []
    for task in params["tasks"]:
        seeds = params["seeds"][task] if isinstance(params["seeds"], dict) else params["seeds"]
        points = [(m, e) for e in params["epsilons"] for m in params["methods"]]
        if params.get("reference_method"):
            points.append((params["reference_method"], "inf"))
        runs += [{"task": task, "method": m, "epsilon": e, "seed": s} for m, e in points for s in seeds]
    return runs


def project(runs: list[dict], timing: dict, *, rounds: int, local_steps: int, clients_per_round: int,
            eval_every: int, precision: str) -> dict:
    """Projected seconds of ``runs`` from ``timing[(smoke task, method, precision)]`` =
    {"step_s", "eval_item_s"}; also the training and evaluation shares."""
    evaluations = len(range(eval_every, rounds + 1, eval_every)) + (rounds % eval_every != 0)
    train = evaluate = 0.0
    for run in runs:
        t = timing[(SMOKE_OF[run["task"]], run["method"], precision)]
        train += rounds * local_steps * clients_per_round * t["step_s"]
        evaluate += evaluations * TEST_ITEMS[run["task"]] * t["eval_item_s"]
    return {"runs": len(runs), "train_s": train, "eval_s": evaluate, "total_s": train + evaluate,
            "evaluations_per_run": evaluations}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_method(task: str, method: str, precision: str, *, device: str, rounds: int, epsilon: float,
                seed: int) -> dict:
    """Median training seconds per local step and evaluation seconds per test item, measured."""
    from lalora.config import RunConfig
    from lalora.federated.simulation import Simulator
    from lalora.tasks.data import use_device

    extra = {}
    names = {f.name for f in dataclasses.fields(RunConfig)}
    if "device" in names:
        extra["device"] = device
    elif device != "cpu":
        raise SystemExit("paper_projection: error: --device needs RunConfig.device (the one-engine branch)")
    if "precision" in names:
        extra["precision"] = precision
    elif precision != "fp32":
        raise SystemExit("paper_projection: error: --precisions other than fp32 need RunConfig.precision")
    cfg = RunConfig(task=task, method=method, epsilon=epsilon, seed=seed, rounds=rounds, **extra)
    sim = Simulator(cfg)
    use_device(sim.task.train, device)
    use_device(sim.task.test, device)
    state = sim.initial_global_state()
    step_s, eval_s = [], []
    for t in range(1, rounds + 1):
        _sync(device)
        start = time.perf_counter()
        updates = [sim.client_update(cid, t, state) for cid in sim.sampled_clients(t)]
        state = sim.server_aggregate(updates, t, state)
        _sync(device)
        mid = time.perf_counter()
        sim.evaluate(state)
        _sync(device)
        end = time.perf_counter()
        step_s.append((mid - start) / (len(updates) * sim.cfg.local_steps))
        eval_s.append((end - mid) / len(sim.task.test))
    timed = slice(1, None) if rounds >= 2 else slice(None)   # round 1 warms up kernels and caches
    return {"step_s": statistics.median(step_s[timed]), "eval_item_s": statistics.median(eval_s[timed]),
            "rounds_timed": len(step_s[timed]), "local_steps_measured": sim.cfg.local_steps,
            "test_items_measured": len(sim.task.test), "task_info": {k: v for k, v in sim.task.info.items()
                                                                     if k != "sizes"}}


def _hours(s: float) -> str:
    return f"{s / 3600:.2f} h"


def render(meta: dict, timing: dict, projections: dict) -> str:
    lines = [f"# Paper-grid projection ({meta['label']})", "",
             f"Device: {meta['device']} ({meta['device_name']}); smoke size `{meta['smoke_size']}`; "
             f"{meta['rounds']} round(s) timed per method, median after warm-up; load average "
             f"{meta['loadavg']}; {meta['date']}.", "",
             "| smoke task | method | precision | s per local DP step | ms per test item |",
             "|---|---|---|---|---|"]
    for (task, method, precision), t in sorted(timing.items()):
        lines.append(f"| {task} | {method} | {precision} | {t['step_s']:.4f} | {1000 * t['eval_item_s']:.3f} |")
    lines += ["", "| grid (paper profile) | precision | runs | training | evaluation | projected wall time |",
              "|---|---|---|---|---|---|"]
    for (grid, precision), p in sorted(projections.items()):
        lines.append(f"| {grid} | {precision} | {p['runs']} | {_hours(p['train_s'])} | {_hours(p['eval_s'])} "
                     f"({p['evaluations_per_run']} evaluations per run) | **{_hours(p['total_s'])}** |")
    if meta["smoke_size"] != "paper":
        lines += ["", "Reduced shapes (LALORA_SMOKE_SIZE=cpu): a check of the machinery, not a projection "
                  "of the paper's cost on any device."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default="fp32", help="comma list (needs RunConfig.precision beyond fp32)")
    p.add_argument("--grids", default="vision,language", help="comma list of: vision, language")
    p.add_argument("--rounds", type=int, default=3, help="rounds timed per method (first is warm-up if >= 2)")
    p.add_argument("--epsilon", type=float, default=3.0, help="ε of the timed runs (does not change the work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the markdown table here (atomically)")
    p.add_argument("--json", help="write the raw timings and projections here (atomically)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    grids = [g.strip() for g in args.grids.split(",") if g.strip()]
    if not grids or any(g not in GRIDS for g in grids):
        p.error(f"--grids must be a comma list of: {', '.join(GRIDS)}")
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]

    import torch

    from lalora.results import atomic_write_bytes, atomic_write_json
    from lalora.tasks.smoke import smoke_size

    grid_params = {g: yaml.safe_load((PROFILE / GRIDS[g]).read_text()) for g in grids}
    needed = sorted({(SMOKE_OF[r["task"]], r["method"]) for g in grids for r in grid_runs(grid_params[g])})
    timing = {}
    for precision in precisions:
        for task, method in needed:
            t = time_method(task, method, precision, device=args.device, rounds=args.rounds,
                            epsilon=args.epsilon, seed=args.seed)
            timing[(task, method, precision)] = t
            print(f"{task} {method} {precision}: {t['step_s']:.4f} s/step, {1000 * t['eval_item_s']:.3f} ms/item",
                  file=sys.stderr)
    from lalora.tasks.paper import paper_task_defaults

    projections = {}
    for g in grids:
        gp = grid_params[g]
        d = paper_task_defaults(gp["tasks"][0])
        for precision in precisions:
            projections[(g, precision)] = project(
                grid_runs(gp), timing, rounds=gp.get("rounds", d["rounds"]),
                local_steps=gp.get("local_steps", d["local_steps"]),
                clients_per_round=gp.get("clients_per_round", d["clients_per_round"]),
                eval_every=gp.get("eval_every", 1), precision=precision)
    size = smoke_size()["name"]
    meta = {"device": args.device,
            "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU",
            "smoke_size": size, "rounds": args.rounds, "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "label": "paper shapes" if size == "paper" else "reduced CPU shapes, machinery check only"}
    text = render(meta, timing, projections)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, text.encode())
    if args.json:
        atomic_write_json(args.json, {"meta": meta,
                                      "timing": [dict(task=k[0], method=k[1], precision=k[2], **v) for k, v in timing.items()],
                                      "projections": [dict(grid=k[0], precision=k[1], **v) for k, v in projections.items()]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
