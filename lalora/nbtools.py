"""Helpers the result notebooks share: a grid of federated runs -> per-seed records -> mean ± std table.

``experiment_base`` and ``make_config`` build a notebook's RunConfigs (a variant label such as
``dp-lora+filter`` maps to a method plus config overrides, ``VARIANTS``); ``run_grid`` runs them
through ``lalora.federated.runs.run_experiment`` (cached by config hash, so notebooks that
ask for the same run share it); ``accuracy_table`` is the mean ± std table over seeds that
``lalora.report`` reads. The papermill runner that executes the notebooks is ``lalora.notebooks``.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Sequence

# A variant label that is not a method id maps to (method, RunConfig overrides): the ablation's
# arms are DP-LoRA and LA-LoRA with the low-pass filter switched on or off.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dp-lora+filter": ("dp-lora", {"filter": True}),
    "la-lora-filter": ("la-lora", {"filter": False}),
}


def make_config(base: dict[str, Any], **changes: Any):
    """A RunConfig from a dict of fields; ``method`` may be a variant label (see VARIANTS)."""
    from lalora.config import RunConfig

    fields = {**base, **changes}
    label = fields.get("method")
    if label in VARIANTS:
        method, overrides = VARIANTS[label]
        fields = {**fields, **overrides, "method": method}
    return RunConfig(**fields)


def experiment_base(task: str, *, task_overrides: dict[str, Any] | None = None, data_root: str | None = None,
                    weights_path: str | None = None, **fields: Any) -> dict[str, Any]:
    """RunConfig fields shared by a notebook's grid; ``None`` means "the task's default".

    ``task_overrides`` may be keyed by task name ({"digits-swin": {...}}) or flat; ``data_root``
    and ``weights_path`` (paper profile) are passed to the task factory when given.
    """
    overrides = dict(task_overrides or {})
    if overrides and all(isinstance(v, dict) for v in overrides.values()):
        overrides = dict(overrides.get(task, {}))
    if data_root is not None:
        overrides["data_root"] = data_root
    if weights_path is not None:
        overrides["weights_path"] = weights_path
    base = {k: v for k, v in fields.items() if v is not None}
    return {"task": task, **base, "task_overrides": overrides}


def grid_jobs() -> int:
    """How many runs of a grid train at once: ``LALORA_JOBS`` (the notebook runner sets it to its
    ``--jobs``), else 1."""
    raw = os.environ.get("LALORA_JOBS", "1").strip() or "1"
    try:
        jobs = int(raw)
    except ValueError:
        raise ValueError(f"LALORA_JOBS: expected a whole number >= 1, got {raw!r}") from None
    if jobs < 1:
        raise ValueError(f"LALORA_JOBS: expected a whole number >= 1, got {raw!r}")
    return jobs


@contextlib.contextmanager
def training_slot():
    """Hold one of the machine's training slots while a run trains.

    The notebook runner with ``--jobs N`` runs up to N notebooks at once and lets each grid train up
    to N runs at once; ``LALORA_RUN_SLOTS`` (``<folder>:<N>``, set by the runner) caps the runs
    training at the same time across all of them at N, so two notebooks' grids never put 2N runs
    on N cores. An ``flock`` per slot file: a slot held by a process that dies is freed by the OS.
    Without the variable (a notebook run by hand) there is no cap beyond the grid's own jobs."""
    spec = os.environ.get("LALORA_RUN_SLOTS")
    if not spec:
        yield
        return
    folder, _, count = spec.rpartition(":")
    handles = [open(os.path.join(folder, f"slot-{i}"), "a+") for i in range(max(1, int(count)))]
    held = None
    try:
        while held is None:
            for h in handles:
                try:
                    fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                held = h
                break
            else:
                time.sleep(0.2)
        yield
    finally:
        for h in handles:   # closing a file releases its flock
            h.close()


def _init_worker(threads: int, modules: tuple[str, ...]) -> None:
    import torch   # lazy, like every torch-heavy import here: `lalora --help` imports this module

    torch.set_num_threads(threads)
    for module in modules:   # registers the grid's tasks that live outside lalora (lalora.tasks.register)
        importlib.import_module(module)


def _task_modules(task_names) -> tuple[str, ...] | str:
    """The modules a fresh process imports to know ``task_names`` (their factories' modules), or the
    first name it cannot know: a task registered in this process only (a notebook cell, a lambda)."""
    from lalora.tasks import TASKS

    modules = []
    for name in sorted(task_names):
        factory = TASKS.get(name)
        module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "<")
        if factory is None or not module or module == "__main__" or "<" in qualname:
            return name
        modules.append(module)
    return tuple(dict.fromkeys(modules))


def _train_in_worker(cfg_fields: dict[str, Any], runs_dir: str) -> tuple[bool, float]:
    """Train (or find finished) one run in a grid worker; (trained now, seconds)."""
    from lalora.config import RunConfig                  # lazy: torch-heavy (see _init_worker)
    from lalora.federated.runs import run_experiment

    start = time.perf_counter()
    with training_slot():
        result = run_experiment(RunConfig(**cfg_fields), runs_dir=runs_dir, progress=False)
    return (not result.cached), time.perf_counter() - start


def _train_in_parallel(configs: list, runs_dir, jobs: int, echo) -> set[int]:
    """Train ``configs`` (RunConfigs) in ``jobs`` worker processes; the indices trained now.

    Each worker uses this process's intra-op thread count, so a run trains to the same bits as in
    the serial loop (tests/test_grid_jobs.py). Identical configs are folded by the run folder's lock:
    the second worker waits, then finds the run finished."""
    import torch   # lazy: see _init_worker

    trained: set[int] = set()
    modules = _task_modules({cfg.task for cfg in configs})
    if isinstance(modules, str):
        if echo:
            echo(f"run_grid: task {modules!r} is registered in this process only; its runs train here, one at a time")
        return trained
    # spawn, not fork: this process (a Jupyter kernel, a test runner) may hold threads fork would copy mid-state
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(torch.get_num_threads(), modules)) as pool:
        futures = {pool.submit(_train_in_worker, cfg.to_dict(), str(runs_dir)): i for i, cfg in enumerate(configs)}
        for n, future in enumerate(as_completed(futures), start=1):
            i = futures[future]
            now, seconds = future.result()
            if now:
                trained.add(i)
            if echo and now:
                cfg = configs[i]
                echo(f"[trained {n}/{len(configs)}] {cfg.task} {cfg.method} ε={cfg.epsilon} seed={cfg.seed} "
                     f"lr={'default' if cfg.lr is None else format(cfg.lr, 'g')} ({seconds:.0f} s, {jobs} at once)")
    return trained


def run_grid(base: dict[str, Any], grid: list[dict[str, Any]], seeds: Sequence[int], runs_dir: str | os.PathLike,
             *, progress: bool | None = None, jobs: int | None = None, echo=print) -> list[dict[str, Any]]:
    """Run ``base`` updated by each entry of ``grid``, once per seed; one record per run.

    Identical resolved configs share one cached run folder (``run_experiment``), so notebooks
    that ask for the same run do not train it twice. A record holds the label (``method``, which
    may be a variant such as ``dp-lora+filter``), the grid's own keys, the seed, the final test
    accuracy in %, the ε the most-used client spent, the target ε and the accuracy curve.

    ``jobs`` (default :func:`grid_jobs`) > 1 trains the grid's runs in that many processes first,
    then reads every record from its run folder in grid order: the records are those of ``jobs=1``
    (bit for bit; only ``cached``/``wall_time_s``/``run_dir`` describe how they were made).
    """
    import math

    from lalora.federated.runs import run_experiment

    if progress is None:
        progress = os.environ.get("LALORA_QUIET", "") != "1"
    jobs = grid_jobs() if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs: expected a whole number >= 1, got {jobs!r}")
    points = [(point, int(seed)) for point in grid for seed in seeds]
    configs = [make_config(base, **point, seed=seed) for point, seed in points]
    trained_in_workers: set[int] = set()
    if jobs > 1 and len(configs) > 1:
        trained_in_workers = _train_in_parallel(configs, runs_dir, jobs, echo)
    records = []
    total = len(configs)
    for i, ((point, seed), cfg) in enumerate(zip(points, configs)):
        start = time.perf_counter()
        # after the workers every run is finished: reading it back needs no slot
        with (contextlib.nullcontext() if jobs > 1 and len(configs) > 1 else training_slot()):
            result = run_experiment(cfg, runs_dir=runs_dir, progress=progress)
        final = result.final
        acc = final.get("accuracy")
        rec = {k: v for k, v in point.items()}
        rec.update({
            "task": cfg.task, "method": point.get("method", cfg.method), "seed": int(seed),
            "epsilon": _eps(point.get("epsilon", cfg.epsilon)),
            "accuracy": 100.0 * float(acc) if acc is not None else math.nan,
            "epsilon_spent": _num(final.get("epsilon_spent")),
            "target_epsilon": _num(final.get("target_epsilon")),
            "noise_multiplier": _num(final.get("noise_multiplier")),
            "private": bool(final.get("private")),
            "accountant": final.get("accountant", result.config.accountant),
            "config": result.config.to_dict(),   # what `lalora verify-results` re-runs
            # trained by this call (here or in a worker) vs served from an earlier run's folder
            "cached": bool(result.cached) and i not in trained_in_workers,
            "wall_time_s": _num(final.get("wall_time_s")),
            # a real path: notebook 06 loads the checkpoint from it. Committed results are produced with
            # a repository-relative runs dir (test_notebook_outputs checks they hold no absolute path)
            "run_dir": str(result.run_dir),
            # evidence bookkeeping: the mechanism (as-released is NOT DP), the bar "did not train"
            # is judged against, and how fedsa-lora was scored
            "dp_mode": cfg.dp_mode, "majority_baseline": 100.0 * _num(final.get("majority_baseline")),
            **{k: final[k] for k in ("privacy", "fedsa_scoring") if k in final},
            "curve": [[m["round"], 100.0 * m["test_accuracy"]] for m in result.metrics
                      if m.get("test_accuracy") is not None],
        })
        records.append(rec)
        if echo:
            state = ("trained in a worker" if i in trained_in_workers else
                     "cached" if result.cached else f"{time.perf_counter() - start:.0f} s")
            echo(f"[{len(records)}/{total}] {cfg.task} {rec['method']} ε={rec['epsilon']} seed={seed}: "
                 f"acc {rec['accuracy']:.1f}%  ε spent {rec['epsilon_spent']:.3g}  ({state})")
    return records


def _num(value) -> float:
    import math

    if value is None:
        return math.nan
    return float(value)  # "inf" strings (strict JSON) become inf


def _eps(value) -> float | str:
    v = _num(value)
    return "inf" if v == float("inf") else v


def accuracy_table(records: Sequence[dict[str, Any]], by: Sequence[str] = ("task", "method", "epsilon")
                   ) -> list[dict[str, Any]]:
    """Mean ± sample std (ddof=1; 0 for one seed) of the accuracy over seeds, per ``by`` group.

    ``epsilon_spent`` is the largest over the group's seeds (and clients): the number to hold
    against the target.
    """
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(tuple(rec.get(k) for k in by), []).append(rec)
    rows = []
    for key, recs in groups.items():
        acc = np.array([r["accuracy"] for r in recs], dtype=float)
        row = dict(zip(by, key))
        row.update({
            "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "n_seeds": len(recs),
            "accuracies": [float(a) for a in acc],
            "epsilon_spent": float(max(r["epsilon_spent"] for r in recs)),
            "target_epsilon": recs[0]["target_epsilon"],
            "noise_multiplier": float(np.mean([r["noise_multiplier"] for r in recs])),
        })
        rows.append(row)
    return rows
