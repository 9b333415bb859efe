"""Resumable runs on disk: ``run_experiment`` and its run folders (SPEC §2–§3).

The in-memory rounds are ``lalora.federated.simulation.Simulator``; this module adds what a run
needs around them: the run folder, its lock, the per-round metrics and checkpoints, resuming, and
the final summary (with the fingerprint of the task's data and backbone and the majority baseline).

    result = run_experiment(cfg, runs_dir="runs", resume=True, progress=True)
    result.final["accuracy"], result.final["epsilon_spent"], result.final["per_client_epsilon"]
    result.metrics   # one dict per round (as in metrics.jsonl)
    result.run_dir   # runs/<task>/<method>/<hash>/

Run folders (``lalora.results``): ``<runs_dir>/<task>/<method>/<hash>/``, the hash covering the
resolved config, the package version and a fingerprint of ``Task.info`` (data split, backbone key).
A folder with ``final.json`` is served from disk; one with a checkpoint continues from it when
``resume=True`` (metrics of rounds after the checkpoint are dropped and re-run). Every RNG state
(torch, numpy, python, per-client generators) is checkpointed after every round with the global
state, fedsa's client-local state, the ledger and the round index (``Simulator.state_dict``).
Test hook: env ``LALORA_KILL_AFTER_ROUND=N`` makes the process SIGKILL itself right after writing the
checkpoint of round N (used to test crash + resume).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

import lalora
from lalora.announce import note
from lalora.config import NOT_DP, RunConfig, check_against_task
from lalora.federated.simulation import Simulator
from lalora.provenance import run_provenance
from lalora.results import RunDir, config_hash, read_json, to_jsonable
from lalora.tasks import task_for_config

# tqdm is imported where the progress bar is made: it is only needed once a run trains.

__all__ = ["RunResult", "run_experiment", "task_fingerprint", "majority_baseline", "KILL_ENV"]

KILL_ENV = "LALORA_KILL_AFTER_ROUND"


@dataclass
class RunResult:
    config: RunConfig
    metrics: list[dict]
    final: dict
    run_dir: str
    cached: bool = False


def _drop_volatile(obj):
    if isinstance(obj, dict):
        return {k: _drop_volatile(v) for k, v in obj.items()
                if k not in ("cached", "load_seconds", "seconds", "wall_s")}
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


def task_fingerprint(task) -> str:
    """Short hash of what the task says about its data and pretrained backbone (``Task.info``,
    timings dropped), so a changed backbone or split gets a new run folder instead of a stale
    cached result. Builds the model once to make the task record its backbone key."""
    info = getattr(task, "info", None)
    if info is None:
        return "none"
    if isinstance(info, dict) and "pretrain" in info and info["pretrain"] is None:
        task.build_model()   # fills info["pretrain"] (the backbone's content key)
    text = json.dumps(to_jsonable(_drop_volatile(info)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def majority_baseline(task) -> float:
    """Test accuracy of always predicting the most frequent training label: the bar a model must
    beat to count as having trained (the report's "did not train" check)."""
    train = np.asarray(task.train_labels, dtype=np.int64)
    test = getattr(task, "test_labels", None)
    if test is None:   # tasks that do not list their test labels: read them item by item
        test = [int(task.test[i]["labels"]) for i in range(len(task.test))]
    test = np.asarray(test, dtype=np.int64)
    if train.size == 0 or test.size == 0:
        return math.nan
    return float(np.mean(test == np.bincount(train).argmax()))


def _progress_enabled(progress: bool) -> bool:
    env = os.environ.get("LALORA_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(progress) and sys.stderr.isatty()


def run_experiment(cfg: RunConfig, *, runs_dir: str | os.PathLike = "runs", resume: bool = True,
                   progress: bool = True, force: bool = False, task=None,
                   partitions: list | None = None) -> RunResult:
    """Run (or resume, or serve from disk) the experiment ``cfg``; see the module docstring.

    ``resume=False`` discards an unfinished attempt's checkpoint and starts over; ``force=True``
    also recomputes a finished run. ``task``/``partitions`` override the registry (tests)."""
    task = task if task is not None else task_for_config(cfg)
    cfg = cfg.resolve(getattr(task, "defaults", {}))
    if partitions is None:
        check_against_task(cfg, task)   # before the fingerprint, which may pretrain a backbone
    fingerprint = task_fingerprint(task)
    digest = config_hash({**cfg.to_dict(), "task_fingerprint": fingerprint}, lalora.__version__)
    not_dp = cfg.dp_mode == "as-released"   # the folder name says it too
    run_dir = RunDir.for_config(runs_dir, cfg.task, cfg.method, digest + ("-NOT-DP" if not_dp else ""))

    def finished() -> RunResult | None:
        if run_dir.is_finished() and not force:
            return RunResult(cfg, run_dir.read_metrics(), run_dir.read_final(), str(run_dir.path), cached=True)
        return None

    # Checked before the lock too: serving a finished run must not write (a read-only runs folder works).
    if (done := finished()) is not None:
        return done
    with run_dir.exclusive():
        # another process may have finished this run while we waited for the lock
        if (done := finished()) is not None:
            return done
        return _train(cfg, task, partitions, run_dir, digest, fingerprint, resume=resume, force=force,
                      progress=progress)


def _train(cfg: RunConfig, task, partitions, run_dir: RunDir, digest: str, fingerprint: str, *, resume: bool,
           force: bool, progress: bool) -> RunResult:
    """Train (or resume) the run in ``run_dir``; the caller holds its lock."""
    not_dp = cfg.dp_mode == "as-released"
    sim = Simulator(cfg, task=task, partitions=partitions)
    global_state = sim.initial_global_state()
    start, elapsed = 1, 0.0
    if resume and run_dir.has_checkpoint() and not force:
        payload = run_dir.load_checkpoint()
        done, global_state = sim.load_state_dict(payload)
        elapsed = float(payload.get("elapsed_s", 0.0))
        run_dir.truncate_metrics(done)
        start = done + 1
        note(f"resuming {run_dir.path} at round {start} of {cfg.rounds} (rounds 1-{done} from its checkpoint)")
    else:
        run_dir.reset()
    run_dir.write_config({**cfg.to_dict(), "hash": digest, "task_fingerprint": fingerprint,
                          "lalora_version": lalora.__version__, **({"privacy": NOT_DP} if not_dp else {})})

    show = _progress_enabled(progress)
    from tqdm.auto import tqdm

    rounds_bar = tqdm(total=cfg.rounds, initial=start - 1, desc=f"{cfg.method} rounds",
                      disable=not show, dynamic_ncols=True, file=sys.stderr)
    last_eval: dict = {}
    if start > 1:
        last_eval = next((r for r in reversed(run_dir.read_metrics()) if "test_accuracy" in r), {})
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    for t in range(start, cfg.rounds + 1):
        t0 = time.perf_counter()
        clients = sim.sampled_clients(t)
        if sim.client_batching:
            updates = sim.clients_update(clients, t, global_state)
        else:
            updates = [sim.client_update(cid, t, global_state)
                       for cid in tqdm(clients, desc=f"round {t} clients", leave=False, disable=not show,
                                       dynamic_ncols=True, file=sys.stderr)]
        global_state = sim.server_aggregate(updates, t, global_state)
        privacy = sim.privacy_summary()
        record = {
            "round": t, "clients": clients, "lr": sim.local.lr_at(t),
            "train_loss": float(np.mean([u.metrics["train_loss"] for u in updates])),
            "mean_batch_size": float(np.mean([np.mean(u.metrics["batch_sizes"]) for u in updates])),
            "epsilon_spent": privacy["epsilon_spent"],
            **({"privacy": NOT_DP} if not_dp else {}),
        }
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            ev = sim.evaluate(global_state)
            record.update({f"test_{k}": v for k, v in ev.items()})
            last_eval = record
        record["round_s"] = time.perf_counter() - t0
        elapsed += record["round_s"]
        record["elapsed_s"] = elapsed
        run_dir.append_metrics(record)
        run_dir.save_checkpoint({**sim.state_dict(t, global_state), "elapsed_s": elapsed})
        rounds_bar.update(1)
        rounds_bar.set_postfix(acc=f"{last_eval.get('test_accuracy', float('nan')):.3f}",
                               eps=f"{privacy['epsilon_spent']:.2f}")
        if kill_after and t == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    rounds_bar.close()

    privacy = sim.privacy_summary()
    final = {
        "task": cfg.task, "method": cfg.method, "hash": digest, "lalora_version": lalora.__version__,
        "accuracy": last_eval.get("test_accuracy"), "loss": last_eval.get("test_loss"),
        "evaluated_round": last_eval.get("round"),
        **privacy,
        "target_epsilon": cfg.epsilon if sim.private else math.inf,
        "delta": cfg.delta, "noise_multiplier": sim.noise_multiplier, "private": sim.private,
        "clip_norm": cfg.clip_norm if sim.private else math.inf,
        "sample_rates": sim.sample_rates, "rounds": cfg.rounds, "filter": bool(cfg.filter),
        "wall_time_s": elapsed, "dp_mode": cfg.dp_mode,
        "majority_baseline": majority_baseline(task), "accountant": cfg.accountant,
        "provenance": run_provenance(task, accountant=cfg.accountant),
    }
    if not_dp:   # σ was picked as real DP at cfg.epsilon would; nothing here is an ε guarantee
        final.update(private=False, privacy=NOT_DP, target_epsilon=math.nan, clip_norm=math.nan,
                     sigma_from_epsilon=cfg.epsilon)
    if "test_per_client_accuracy" in last_eval:
        final["per_client_accuracy"] = last_eval["test_per_client_accuracy"]
        final["scored_clients"] = last_eval["test_scored_clients"]
        final["fedsa_scoring"] = last_eval["test_fedsa_scoring"]
    run_dir.write_final(final)
    return RunResult(cfg, run_dir.read_metrics(), read_json(run_dir.final_path), str(run_dir.path))
