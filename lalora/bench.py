"""`lalora bench`: the DP-step benchmark (benchmarks/dp_step.py) from the `lalora` command.

    lalora bench --json out.json [--repeats R] [--models minilm,swin] ...

A thin wrapper: every option is passed to benchmarks/dp_step.py, which lives in the repository
(not in the installed package), so this works from a source checkout (`pip install -e .`).
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dp_step.py"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="time non-private vs lalora DP vs Opacus steps (benchmarks/dp_step.py)",
        description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="options of benchmarks/dp_step.py (try `lalora bench --help`)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not SCRIPT.is_file():
        raise SystemExit(f"lalora bench: {SCRIPT} not found; the benchmark ships with the source "
                         "repository (clone it and `pip install -e .`)")
    spec = importlib.util.spec_from_file_location("lalora_benchmarks_dp_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(args.args) or 0)
