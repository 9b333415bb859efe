"""`lalora verify-results`: re-run a few committed result cells from an empty cache and compare.

A *cell* is one federated run recorded in a results JSON (``results/<profile>/*.json``): a record
holding its resolved ``config`` and its ``accuracy`` (in %), in a file whose ``provenance``
(lalora.provenance) says how it was produced. For each randomly chosen cell this module

1. re-runs the config in a fresh interpreter with an EMPTY ``LALORA_CACHE`` and an empty runs
   folder (temporary), with the thread count the file records -- so the backbone is pretrained and
   σ calibrated again, exactly as on a fresh clone;
2. compares: when the provenance fields that decide float results (``BITWISE_FIELDS``: library
   versions, CPU model and float ISA flags, threads, backbone checksum) all match, the accuracy
   must be bitwise equal; otherwise it must lie within ``TOLERANCE_PP`` percentage points, and
   the report names every provenance field that differs.

Why 5 percentage points: across machines, float-order differences move a 10-round DP run of the
offline profile by ~2 points (issue 19: 69.17 vs 70.83 and 70.83 vs 68.61); a broken pipeline
(a wrong backbone, a wrong σ) moves it by far more.

    lalora verify-results --results results/offline --cells 3 [--seed S]
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lalora.provenance import differing_fields

TOLERANCE_PP = 5.0


@dataclass
class Cell:
    file: str
    index: int
    config: dict
    accuracy: float
    provenance: dict
    # further numbers of the record compared bitwise with the re-run (when both have them)
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        c = self.config
        return f"{Path(self.file).name}#{self.index} ({c.get('task')} {c.get('method')} eps={c.get('epsilon')} seed={c.get('seed')})"


@dataclass
class Outcome:
    cell: Cell
    fresh_accuracy: float
    mode: str            # "bitwise" | "tolerance"
    ok: bool
    differing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)   # EXTRA_FIELDS that differ (bitwise mode)

    def describe(self) -> str:
        delta = self.fresh_accuracy - self.cell.accuracy
        verdict = "OK" if self.ok else "FAILED"
        text = (f"{verdict} {self.cell.label}: accuracy {self.fresh_accuracy:.4f} fresh vs "
                f"{self.cell.accuracy:.4f} committed (delta {delta:+.4f} pp, ")
        if self.mode == "bitwise":
            extra = f"; differs: {', '.join(self.mismatched)}" if self.mismatched else ""
            return text + f"provenance matches: bitwise equality required{extra})"
        return (text + f"tolerance {TOLERANCE_PP} pp because the provenance differs: "
                + "; ".join(self.differing) + ")")


# Besides the accuracy, the numbers a record keeps that a re-run must reproduce bit for bit: the
# ε the binding client spent (the ledger) and σ (the accountant's calibration).
EXTRA_FIELDS = ("epsilon_spent", "noise_multiplier")


def committed_cells(results_dir: str | os.PathLike) -> list[Cell]:
    """Every record with a ``config`` and an ``accuracy`` in the results JSONs of a folder."""
    cells: list[Cell] = []
    for path in sorted(Path(results_dir).glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        prov = data.get("provenance") or {}
        found: list[dict] = []
        _collect(data, found)
        for i, rec in enumerate(found):
            extra = {k: rec[k] for k in EXTRA_FIELDS if isinstance(rec.get(k), (int, float))}
            cells.append(Cell(str(path), i, rec["config"], float(rec["accuracy"]), prov, extra))
    return cells


def _collect(obj: Any, out: list[dict]) -> None:
    if isinstance(obj, dict):
        if isinstance(obj.get("config"), dict) and isinstance(obj.get("accuracy"), (int, float)):
            out.append(obj)
            return
        for v in obj.values():
            _collect(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _collect(v, out)


def rerun(config: dict, *, threads: int | None = None, timeout: float | None = None) -> dict:
    """Run ``config`` in a fresh interpreter with an empty temporary cache and runs folder;
    returns {"accuracy": %, "provenance": the run's provenance}."""
    with tempfile.TemporaryDirectory(prefix="lalora-verify-") as tmp:
        env = dict(os.environ, LALORA_CACHE=str(Path(tmp) / "cache"))
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "lalora.verify", "--_rerun", json.dumps(config), "--_out", str(out),
               "--_runs", str(Path(tmp) / "runs")] + (["--_threads", str(threads)] if threads else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"re-running {config.get('task')} {config.get('method')} failed: "
                               f"{proc.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.read_text())


def compare(cell: Cell, fresh: dict, tolerance_pp: float = TOLERANCE_PP) -> Outcome:
    differing = differing_fields(cell.provenance, fresh["provenance"])
    acc = float(fresh["accuracy"])
    if not differing:
        mismatched = [f"{k} {fresh[k]!r} fresh vs {v!r} committed" for k, v in cell.extra.items()
                      if k in fresh and fresh[k] != v]
        return Outcome(cell, acc, "bitwise", acc == cell.accuracy and not mismatched, mismatched=mismatched)
    return Outcome(cell, acc, "tolerance", abs(acc - cell.accuracy) <= tolerance_pp, differing)


def verify(results_dir: str | os.PathLike, *, cells: int = 3, seed: int | None = None,
           echo=print) -> list[Outcome]:
    found = committed_cells(results_dir)
    if not found:
        raise ValueError(f"results: no cell with a recorded config in {results_dir}/*.json "
                         "(results written before provenance was recorded: regenerate them)")
    rng = random.Random(seed)
    chosen = rng.sample(found, min(cells, len(found)))
    outcomes = []
    for cell in chosen:
        threads = (cell.provenance.get("threads") or {}).get("torch_intra_op")
        outcome = compare(cell, rerun(cell.config, threads=threads))
        echo(outcome.describe())
        outcomes.append(outcome)
    return outcomes


# --------------------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("verify-results", help="re-run random committed result cells from an empty cache",
                              description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results/offline", help="folder of results JSONs")
    p.add_argument("--cells", type=int, default=3, help="how many random cells to re-run")
    p.add_argument("--seed", type=int, default=None, help="seed of the random choice")
    p.set_defaults(func=_main)


def _main(args) -> int:
    try:
        outcomes = verify(args.results, cells=args.cells, seed=args.seed)
    except ValueError as err:
        print(f"lalora verify-results: error: {err}", file=sys.stderr)
        return 2
    failed = [o for o in outcomes if not o.ok]
    print(f"== {len(outcomes) - len(failed)}/{len(outcomes)} cells reproduced ==")
    return 1 if failed else 0


def _rerun_main(argv: list[str]) -> int:
    """The child of :func:`rerun` (a fresh interpreter, so no in-memory cache is shared)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--_rerun", required=True)
    p.add_argument("--_out", required=True)
    p.add_argument("--_runs", required=True)
    p.add_argument("--_threads", type=int)
    a = p.parse_args(argv)
    import torch

    if a._threads:
        torch.set_num_threads(a._threads)
    from lalora.config import RunConfig
    from lalora.federated.runs import run_experiment
    from lalora.results import atomic_write_json

    cfg = RunConfig.from_dict(json.loads(a._rerun))
    final = run_experiment(cfg, runs_dir=a._runs, progress=False).final
    atomic_write_json(a._out, {"accuracy": 100.0 * float(final["accuracy"]),
                               **{k: final[k] for k in EXTRA_FIELDS if isinstance(final.get(k), (int, float))},
                               "provenance": final["provenance"]})
    return 0


if __name__ == "__main__":
    sys.exit(_rerun_main(sys.argv[1:]))
