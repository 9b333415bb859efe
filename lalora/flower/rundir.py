"""The run folder of a Flower run (``<runs_dir>/<task>/<method>/<hash>-flower/``): final.json's
summary and the files. Its own module so that ``run.py`` (simulation) and ``server_app.py``
(deployment) both use it without importing each other.
"""
from __future__ import annotations

import math

import lalora

__all__ = ["final_summary", "write_run_folder", "GLOBAL_STATE_FILE"]

GLOBAL_STATE_FILE = "global_state.pt"


def final_summary(strategy, wall_s: float) -> dict:
    from lalora.provenance import run_provenance

    sim, cfg = strategy.sim, strategy.sim.cfg
    last_eval = next((r for r in reversed(strategy.records) if "test_accuracy" in r), {})
    privacy = sim.privacy_summary()
    final = {
        "task": cfg.task, "method": cfg.method, "engine": "flower",
        "lalora_version": lalora.__version__,
        "accuracy": last_eval.get("test_accuracy"), "loss": last_eval.get("test_loss"),
        "evaluated_round": last_eval.get("round"), **privacy,
        "target_epsilon": cfg.epsilon if sim.private else math.inf, "delta": cfg.delta,
        "noise_multiplier": sim.noise_multiplier, "private": sim.private,
        "clip_norm": cfg.clip_norm if sim.private else math.inf, "sample_rates": sim.sample_rates,
        "rounds": cfg.rounds, "filter": bool(cfg.filter), "accountant": cfg.accountant,
        "provenance": run_provenance(sim.task, accountant=cfg.accountant),
        # where each client's noise and Poisson batches came from (seeded = simulation only)
        "noise_sources": sorted(set(strategy.noise_sources.values())),
        # as in the in-process final.json: the rounds only; total_wall_s adds Ray start-up,
        # worker task builds and node discovery
        "wall_time_s": strategy.records[-1]["elapsed_s"] if strategy.records else 0.0,
        "total_wall_s": wall_s,
        "uplink_payload_bytes_per_round": [r["uplink_payload_bytes"] for r in strategy.records],
        "downlink_payload_bytes_per_round": [r["downlink_payload_bytes"] for r in strategy.records],
    }
    if "test_per_client_accuracy" in last_eval:
        final["per_client_accuracy"] = last_eval["test_per_client_accuracy"]
        final["scored_clients"] = last_eval["test_scored_clients"]
        final["fedsa_scoring"] = last_eval["test_fedsa_scoring"]
    return final


def write_run_folder(runs_dir, strategy, final: dict) -> str:
    from lalora.results import RunDir, config_hash

    cfg = strategy.sim.cfg
    extra = {}
    try:    # the in-process engine hashes the task's data/model fingerprint too; mirror it
        from lalora.federated.runs import task_fingerprint
    except ImportError:
        task_fingerprint = None
    if task_fingerprint is not None:
        extra["task_fingerprint"] = task_fingerprint(strategy.sim.task)
    digest = config_hash({**cfg.to_dict(), **extra}, lalora.__version__)
    run_dir = RunDir.for_config(runs_dir, cfg.task, cfg.method, f"{digest}-flower")
    run_dir.reset()
    run_dir.write_config({**cfg.to_dict(), **extra, "hash": digest,
                          "lalora_version": lalora.__version__, "engine": "flower"})
    for record in strategy.records:
        run_dir.append_metrics(record)
    run_dir.write_final({**final, "hash": digest})
    # the final global LoRA/head state (checksummed), so a deployment can be compared with a rerun
    from lalora.results import save_checkpoint

    save_checkpoint(run_dir.path / GLOBAL_STATE_FILE, {k: v.detach().cpu() for k, v in
                                                        strategy.global_state.items()})
    return str(run_dir.path)
