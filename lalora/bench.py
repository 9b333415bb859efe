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
# Per-model defaults of --repeats and --draws. A small-Swin step takes ~20 ms, and which process a variant
# lands in (its heap, its allocator's state) moves that step's time by up to +-8% (benchmarks/RESULTS.md,
# issue 30's third pass): so many short steps, and the ratio taken over several fresh process draws. A
# MiniLM step takes ~3 s on one thread: a few steps in a few draws.
MODEL_DEFAULTS = {"minilm": {"repeats": 3, "draws": 3}, "swin": {"repeats": 21, "draws": 7}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write the results here (atomically)")
    defaults = "; ".join(f"{m} {d['repeats']} x {d['draws']}" for m, d in MODEL_DEFAULTS.items())
    p.add_argument("--repeats", type=int, help="timed steps per variant in each draw (default per model: "
                                               f"repeats x draws = {defaults})")
    p.add_argument("--draws", type=int, help="fresh processes per variant, one after the other; the ratios "
                                             "are the median over draws (default per model, see --repeats)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first, in each draw")
    # One thread by default: the notebook runner trains every run on one thread (--jobs runs at once), so
    # that is the step the simulation pays for; more threads add OpenMP spinning to the CPU time.
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every variant")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of: {', '.join(MODELS)}")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list of: {', '.join(VARIANTS + OPTIONAL_VARIANTS)}")
    p.add_argument("--batch-size", type=int, default=32, help="N, samples per step")
    p.add_argument("--seq-len", type=int, default=128, help="T, MiniLM tokens per sequence")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--same-process", action="store_true",
                   help="build every variant in this process (the old method; one draw); by default each "
                        "variant runs in its own process, stepped round-robin from here, so one variant's "
                        "allocations cannot change another's heap")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for field in ("repeats", "draws", "threads", "batch_size", "seq_len", "rank"):
        value = getattr(args, field)
        if value is not None and value < 1:
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
    for field in ("json", "repeats", "draws", "warmup", "threads", "models", "variants", "batch_size",
                  "seq_len", "rank"):
        value = getattr(args, field)
        if value is not None:
            argv += [f"--{field.replace('_', '-')}", str(value)]
    if getattr(args, "same_process", False):
        argv.append("--same-process")
    return argv


def load_script():
    """benchmarks/dp_step.py as a module (it is not part of the installed package)."""
    name = "lalora_benchmarks_dp_step"
    if name in sys.modules:
        return sys.modules[name]
    if not SCRIPT.is_file():
        raise SystemExit(f"lalora bench: {SCRIPT} not found; the benchmark ships with the source "
                         "repository (clone it and `pip install -e .`)")
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return module


def variant_process(*args) -> None:
    """The target of a variant's own (spawned) process. It lives here, in an importable module, because
    a spawned child finds its target by module name: the script's own functions are only importable
    when the script is ``__main__`` (``python benchmarks/dp_step.py``), not under ``lalora bench`` or
    pytest, where the child would die unpickling its target."""
    load_script()._variant_worker(*args)


def run(args: argparse.Namespace) -> int:
    return int(load_script().main(_to_argv(args)) or 0)
