"""`lalora bench`: the DP-step benchmark (benchmarks/dp_step.py) from the `lalora` command.

    lalora bench --json out.json [--repeats R] [--models minilm,swin] ...

A thin wrapper: it runs benchmarks/dp_step.py, which lives in the repository (not in the installed
package), so this works from a source checkout (`pip install -e .`). The benchmark's options are
defined here, once, without importing torch, and the script reuses them.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dp_step.py"
MODELS = ("minilm", "swin")
VARIANTS = ("nondp", "lalora", "opacus_hooks", "opacus_ghost")  # the default set, issue 2
OPTIONAL_VARIANTS = ("lalora_peft",)  # lalora's DP step on the same PEFT model Opacus gets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write the results here (atomically)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per variant (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every variant")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of: {', '.join(MODELS)}")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list of: {', '.join(VARIANTS + OPTIONAL_VARIANTS)}")
    p.add_argument("--batch-size", type=int, default=32, help="N, samples per step")
    p.add_argument("--seq-len", type=int, default=128, help="T, MiniLM tokens per sequence")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--same-process", action="store_true",
                   help="build every variant in this process (the old method); by default each variant "
                        "runs in its own process, stepped round-robin from here, so one variant's "
                        "allocations cannot change another's heap")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for field in ("repeats", "threads", "batch_size", "seq_len", "rank"):
        if getattr(args, field) < 1:
            p.error(f"--{field.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    for field, choices in (("models", MODELS), ("variants", VARIANTS + OPTIONAL_VARIANTS)):
        unknown = sorted(set(getattr(args, field).split(",")) - set(choices))
        if unknown:
            p.error(f"--{field}: unknown {unknown}; choices: {', '.join(choices)}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="time non-private vs lalora DP vs Opacus steps (benchmarks/dp_step.py)",
        description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)


def _to_argv(args: argparse.Namespace) -> list[str]:
    argv = []
    for field in ("json", "repeats", "warmup", "threads", "models", "variants", "batch_size",
                  "seq_len", "rank"):
        value = getattr(args, field)
        if value is not None:
            argv += [f"--{field.replace('_', '-')}", str(value)]
    if getattr(args, "same_process", False):
        argv.append("--same-process")
    return argv


def run(args: argparse.Namespace) -> int:
    if not SCRIPT.is_file():
        raise SystemExit(f"lalora bench: {SCRIPT} not found; the benchmark ships with the source "
                         "repository (clone it and `pip install -e .`)")
    spec = importlib.util.spec_from_file_location("lalora_benchmarks_dp_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return int(module.main(_to_argv(args)) or 0)
