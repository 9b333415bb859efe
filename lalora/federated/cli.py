"""`lalora run`: one federated experiment from the command line.

    lalora run --task digits-swin --method la-lora --epsilon 3
    lalora run --task digits-swin --method dp-lora --epsilon 3 --filter --rounds 20 --seed 1
    lalora run --task cifar100-swin-t --method la-lora --epsilon 1 --data-root data \\
        --weights-path weights/swin_tiny_patch4_window7_224.pth          (docs/PAPER_DATA.md)

Unset options take the task's defaults (``Task.defaults``), then RunConfig's fallbacks. The run
lives in ``<runs-dir>/<task>/<method>/<hash>/``; a finished run is served from there (``--force``
recomputes), an interrupted one resumes from its last checkpoint (``--no-resume`` restarts).
Progress bars (rounds, and clients within a round) go to stderr when it is a terminal; ``--quiet``
or ``LALORA_PROGRESS=0`` turns them off, ``LALORA_PROGRESS=1`` forces them on.
The last stdout line is the summary: accuracy, ε spent (max over clients), run folder.
``--dp-mode as-released`` runs the authors' released step instead of DP-SGD (comparison only): it is
NOT differentially private, claims no ε (``--epsilon`` then only picks σ), and says so in the run
folder name (``-NOT-DP``), its JSON files and the summary line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys


def _float_or_inf(text: str) -> float:
    try:
        return float(text)   # accepts "inf"
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use 'inf' for no DP)") from None


def register(subparsers) -> None:
    from lalora.federated.methods import METHODS
    from lalora.privacy.accountant import ACCOUNTANTS, DEFAULT_ACCOUNTANT

    p = subparsers.add_parser("run", help="run one federated LoRA experiment (resumable, cached)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="task name (see `lalora run --list-tasks`)")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--epsilon", type=_float_or_inf, default=3.0, help="target ε per client (inf: no DP)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--clipping", choices=["flat", "per_layer"], default="flat")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default=DEFAULT_ACCOUNTANT)
    p.add_argument("--dp-mode", choices=["dp", "as-released"], default="dp",
                   help="dp: per-sample clipping + accounted noise (default); as-released: the authors' "
                        "released step, NOT differentially private (no ε; epsilon only picks sigma)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--clients", type=int)
    p.add_argument("--clients-per-round", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--lr-decay", type=float)
    p.add_argument("--r", type=int, help="LoRA rank")
    p.add_argument("--alpha", type=float, help="LoRA alpha")
    p.add_argument("--partition", choices=["dirichlet-released", "dirichlet-per-class", "iid"])
    p.add_argument("--beta", type=float, help="Dirichlet concentration")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--filter", action=argparse.BooleanOptionalAction, default=None,
                   help="low-pass filter on the noised LoRA gradient (default: the method's)")
    p.add_argument("--lr-B-ratio", dest="lr_B_ratio", type=float, default=1.0)
    p.add_argument("--alternation-period", type=int, default=1)
    p.add_argument("--weighted-aggregation", action="store_true", help="weight clients by n_k")
    p.add_argument("--head", choices=["train", "freeze"], default="train")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32",
                   help="fp32, or bf16 (autocast forward; fp32 LoRA weights and per-sample gradients)")
    p.add_argument("--client-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="train a round's clients in lock-step through one backbone (default on; "
                        "--no-client-batching: one client after another, the reference)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=JSON",
                   help="extra task factory keyword, e.g. max_train_samples=500 (repeatable)")
    p.add_argument("--data-root", help="paper tasks: the folder holding the data set (docs/PAPER_DATA.md)")
    p.add_argument("--weights-path", help="paper tasks: the pretrained weights, a file or folder "
                                          "(docs/PAPER_DATA.md)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue an interrupted run from its checkpoint (default on)")
    p.add_argument("--force", action="store_true", help="recompute even if the run is finished")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--json", action="store_true", help="also print final.json to stdout")
    p.add_argument("--engine", choices=["inprocess", "flower"], default="inprocess",
                   help="inprocess (default) or flower: Flower's Ray simulation (lalora[flower], "
                        "docs/FLOWER.md; no resume)")
    p.set_defaults(func=main)


def _task_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--task-option must be KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _paper_path_problem(args: argparse.Namespace, task_overrides: dict) -> str | None:
    """Move --data-root/--weights-path into ``task_overrides``; the first problem with a paper
    task's paths (one line naming the flag, what is expected and how to obtain it), else None."""
    from lalora.tasks.paper import is_paper_task, path_problems

    for flag, key in (("--data-root", "data_root"), ("--weights-path", "weights_path")):
        value = getattr(args, key, None)
        if value is None:
            continue
        if not is_paper_task(args.task):
            return f"{flag} is only for the paper tasks (CIFAR-100, Tiny-ImageNet, GLUE); {args.task} needs no path"
        task_overrides[key] = value
    problems = path_problems(args.task, task_overrides.get("data_root"), task_overrides.get("weights_path"),
                             names={"data_root": "--data-root", "weights_path": "--weights-path"})
    return problems[0] if problems else None


def _fmt_eps(value) -> str:
    if isinstance(value, str) or (isinstance(value, float) and math.isinf(value)):
        return "inf (no DP)"
    return f"{value:.3f}"


def main(args: argparse.Namespace) -> int:
    from lalora.federated.methods import METHODS

    if args.method not in METHODS:
        print(f"lalora run: error: unknown method {args.method!r}; choices: {', '.join(METHODS)}",
              file=sys.stderr)
        return 2
    from lalora.tasks import list_tasks

    if args.task not in list_tasks():
        print(f"lalora run: error: unknown task {args.task!r}; choices: {', '.join(list_tasks())}",
              file=sys.stderr)
        return 2
    try:
        task_overrides = _task_options(args.task_option)
    except ValueError as err:
        print(f"lalora run: error: {err}", file=sys.stderr)
        return 2
    problem = _paper_path_problem(args, task_overrides)
    if problem:
        print(f"lalora run: error: {problem}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from lalora.config import RunConfig
    from lalora.federated.runs import run_experiment

    try:
        cfg = RunConfig(
            task=args.task, method=args.method, epsilon=args.epsilon, delta=args.delta,
            clip_norm=args.clip_norm, clipping=args.clipping, accountant=args.accountant, seed=args.seed,
            rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch_size,
            clients=args.clients, clients_per_round=args.clients_per_round, lr=args.lr,
            optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
            lr_decay=args.lr_decay, r=args.r, alpha=args.alpha, partition=args.partition, beta=args.beta,
            eval_every=args.eval_every, filter=args.filter, lr_B_ratio=args.lr_B_ratio,
            alternation_period=args.alternation_period, weighted_aggregation=args.weighted_aggregation,
            head=args.head, task_overrides=task_overrides, dp_mode=args.dp_mode,
            device=args.device, precision=args.precision, client_batching=args.client_batching)
        from lalora.config import resolve_device

        resolve_device(cfg.device, cfg.precision)   # a missing GPU is a one-line error, not a traceback
    except ValueError as err:
        print(f"lalora run: error: {err}", file=sys.stderr)
        return 2
    if getattr(args, "engine", "inprocess") == "flower" and cfg.dp_mode != "dp":
        print("lalora run: error: dp_mode 'as-released' runs only with --engine inprocess", file=sys.stderr)
        return 2
    try:   # settings that do not fit the task's model or data fail here, in the first seconds
        if getattr(args, "engine", "inprocess") == "flower":
            from lalora.flower import run_flower

            result = run_flower(cfg, runs_dir=args.runs_dir, progress=not args.quiet)
        else:
            result = run_experiment(cfg, runs_dir=args.runs_dir, resume=args.resume,
                                    progress=not args.quiet, force=args.force)
    except ValueError as err:
        print(f"lalora run: error: {err}", file=sys.stderr)
        return 2
    final = result.final
    if args.json:
        print(json.dumps(final, indent=2, sort_keys=True))
    acc = final.get("accuracy")
    acc_text = "n/a" if acc is None else f"{acc:.4f}"
    cached = " (cached)" if result.cached else ""
    if final.get("privacy"):   # the released (non-DP) mechanism: no ε to report
        privacy_text = f"{final['privacy']} (dp-mode as-released; no epsilon)"
    else:
        privacy_text = (f"epsilon spent {_fmt_eps(final['epsilon_spent'])} (max over "
                        f"{len(final['per_client_epsilon'])} clients, delta={cfg.delta:g}, "
                        f"target {_fmt_eps(final['target_epsilon'])})")
    print(f"{cfg.method} on {cfg.task}: accuracy {acc_text} | {privacy_text} | "
          f"wall {final['wall_time_s']:.1f}s | run {result.run_dir}{cached}")
    return 0
