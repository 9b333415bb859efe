"""``run_flower``: one lalora experiment through Flower (``lalora run --engine flower``).

Backends:
- ``"ray"`` (default): Flower's Simulation Runtime (``flwr.simulation.run_simulation``), one
  virtual SuperNode per client, ClientApps executed by Ray worker processes
  (``num_cpus`` per client, ``num_gpus`` likewise; see docs/FLOWER.md for clusters);
- ``"inprocess"``: the same ServerApp/ClientApp code over :class:`InProcessGrid`, no Ray.

The run is written to ``<runs_dir>/<task>/<method>/<hash>-flower/`` (config.json, metrics.jsonl with
message sizes per round, final.json -- the in-process run's fields plus ``engine``). Unlike the
in-process engine there is no checkpoint/resume yet: an interrupted Flower run starts over.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

import lalora
from lalora.config import RunConfig

__all__ = ["FlowerRunResult", "run_flower"]


@dataclass
class FlowerRunResult:
    config: RunConfig
    metrics: list[dict]
    final: dict
    run_dir: str | None
    global_state: dict = field(repr=False, default_factory=dict)
    wall_s: float = 0.0
    cached: bool = False      # a Flower run is always computed (same field as RunResult)


def _final_summary(strategy, wall_s: float) -> dict:
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
        # as in the in-process final.json: the rounds only; total_wall_s adds Ray start-up,
        # worker task builds and node discovery
        "wall_time_s": strategy.records[-1]["elapsed_s"] if strategy.records else 0.0,
        "total_wall_s": wall_s,
        "uplink_payload_bytes_per_round": [r["uplink_payload_bytes"] for r in strategy.records],
        "downlink_payload_bytes_per_round": [r["downlink_payload_bytes"] for r in strategy.records],
    }
    if "test_per_client_accuracy" in last_eval:
        final["per_client_accuracy"] = last_eval["test_per_client_accuracy"]
    return final


def _write(runs_dir, strategy, final: dict) -> str:
    from lalora.results import RunDir, config_hash

    cfg = strategy.sim.cfg
    extra = {}
    try:    # the in-process engine hashes the task's data/model fingerprint too; mirror it
        from lalora.federated.simulation import task_fingerprint
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
    return str(run_dir.path)


def run_flower(cfg: RunConfig, *, runs_dir: str | os.PathLike | None = "runs", backend: str = "ray",
               num_cpus: float = 1.0, num_gpus: float = 0.0, ray_init_args: dict | None = None,
               progress: bool = True, verbose: bool = False, task=None, partitions=None,
               timeout: float = 3600.0) -> FlowerRunResult:
    """Run ``cfg`` through Flower; see the module docstring. ``num_cpus``/``num_gpus``: resources of
    one ClientApp (Ray runs ⌊available/requested⌋ of them at once). ``runs_dir=None``: write nothing.
    ``task``/``partitions`` override the registry (``backend="inprocess"`` only: Ray workers build
    the task from the registry by name)."""
    if backend not in ("ray", "inprocess"):
        raise ValueError(f"backend must be 'ray' or 'inprocess', got {backend!r}")
    if backend == "ray" and (task is not None or partitions is not None):
        raise ValueError("task/partitions overrides need backend='inprocess' (Ray workers build the "
                         "task from the registry)")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")   # no phoning home from a research run
    from lalora.flower.client_app import make_client_app
    from lalora.flower.server_app import make_server_app

    def show(record: dict) -> None:
        acc = record.get("test_accuracy")
        print(f"[flower] round {record['round']}/{cfg.rounds if cfg.rounds else '?'}: "
              f"loss {record['train_loss']:.4f} | eps {record['epsilon_spent']:.3f} | "
              f"acc {'-' if acc is None else f'{acc:.4f}'} | up {record['uplink_payload_bytes']} B | "
              f"{record['round_s']:.1f}s", file=sys.stderr, flush=True)

    if not verbose:   # Flower logs every round at INFO; our progress line is enough
        import logging

        logging.getLogger("flwr").setLevel(logging.WARNING)
    holder: dict = {}
    server_app = make_server_app(cfg, holder=holder, task=task, partitions=partitions,
                                 timeout=timeout, progress=show if progress else None)
    client_app = make_client_app(task=task, partitions=partitions)
    t0 = time.perf_counter()
    if backend == "inprocess":
        from flwr.app import Context, RecordDict

        from lalora.flower.inprocess import InProcessGrid, task_identity

        grid = InProcessGrid(client_app, _resolved_clients(cfg, task))
        with task_identity():
            server_app(grid, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                     run_config={}))
    else:
        from flwr.simulation import run_simulation

        backend_config = {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
                          "init_args": dict(ray_init_args or {})}
        try:
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=_resolved_clients(cfg, task), backend_name="ray",
                           backend_config=backend_config, verbose_logging=verbose)
        except BaseException:
            holder["stop"].set()    # let the ServerApp thread exit instead of waiting for replies
            raise
    wall_s = time.perf_counter() - t0
    strategy = holder.get("strategy")
    if strategy is None:
        raise RuntimeError("the Flower ServerApp did not finish (see the Flower log above)")
    final = _final_summary(strategy, wall_s)
    run_dir = _write(runs_dir, strategy, final) if runs_dir is not None else None
    return FlowerRunResult(strategy.sim.cfg, strategy.records, final, run_dir,
                           global_state=strategy.global_state, wall_s=wall_s)


def _resolved_clients(cfg: RunConfig, task) -> int:
    """Number of SuperNodes = resolved ``clients`` (the task default when unset)."""
    if cfg.clients is not None:
        return cfg.clients
    from lalora.federated.simulation import resolve_config

    return resolve_config(cfg, task).clients
