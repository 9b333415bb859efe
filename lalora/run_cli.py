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
import time
from pathlib import Path


def _float_or_inf(text: str) -> float:
    try:
        return float(text)   # accepts "inf"
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use 'inf' for no DP)") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers) -> None:
    from lalora.federated.methods import METHODS
    from lalora.privacy.accountant import ACCOUNTANTS, DEFAULT_ACCOUNTANT

    p = subparsers.add_parser("run", help="run one federated LoRA experiment (resumable, cached)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True,
                   help="task name, e.g. digits-swin, lfw-swin, topics-minilm (offline); a wrong name "
                        "prints the full list")
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
    p.add_argument("--threads", type=_positive_int, help="torch intra-op threads (>= 1)")
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
            out[key] = value   # a bare word is a string (model_path=/x/y); its type is checked below
    return out


# What a task factory's annotation allows, for the types a --task-option can carry (JSON values).
_JSON_TYPES = {"int": ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
               "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
               "str": ("a string", lambda v: isinstance(v, str)),
               "Path": ("a path", lambda v: isinstance(v, str)),
               "bool": ("true or false", lambda v: isinstance(v, bool)),
               "dict": ("a JSON object", lambda v: isinstance(v, dict)),
               "None": ("null", lambda v: v is None)}


def _task_option_problem(task: str, options: dict) -> str | None:
    """The first --task-option the task's factory does not take, or whose value has the wrong type
    (one line naming it and what is expected), else None. Why: the factory raised a TypeError
    deep inside for ``max_train_samples={bad``."""
    import inspect

    from lalora.tasks import TASKS

    params = {name: p for name, p in inspect.signature(TASKS[task]).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for key, value in options.items():
        if key not in params:
            return (f"--task-option {key}: {task} takes no option {key!r}; it takes: "
                    f"{', '.join(sorted(params))}")
        annotation = params[key].annotation
        if not isinstance(annotation, str):   # unannotated: the factory checks it
            continue
        names = [n.strip() for n in annotation.split("|")]
        if not all(n in _JSON_TYPES for n in names):   # a type JSON cannot carry: the factory checks it
            continue
        if not any(_JSON_TYPES[n][1](value) for n in names):
            expected = " or ".join(_JSON_TYPES[n][0] for n in names)
            return f"--task-option {key}: expected {expected}, got {json.dumps(value)}"
    return None


def _writable_folder_problem(flag: str, folder) -> str | None:
    """None when ``folder`` exists and accepts a new file, or can be created; else one line.
    Probed with a temporary file (deleted at once) in the nearest existing folder, so nothing is
    left behind and the answer is right for root and read-only mounts alike (os.access is not)."""
    import tempfile
    from pathlib import Path

    path = Path(folder).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "" if probe == path else f" ({probe} is a file)"
        return f"{flag} {str(path)!r} is not a folder{where}; give a folder to write into"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        return f"{flag} {str(path)!r} is not writable ({err.strerror}); give a folder you can write to"
    return None


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
    problem = (_task_option_problem(args.task, task_overrides)
               or _paper_path_problem(args, task_overrides))
    if problem:
        print(f"lalora run: error: {problem}", file=sys.stderr)
        return 2
    from lalora.tasks.pretrain import cache_dir

    # before any pretraining or σ calibration: both write there, minutes in
    problem = (_writable_folder_problem("--runs-dir", args.runs_dir)
               or _writable_folder_problem("LALORA_CACHE", cache_dir()))
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
    started = time.time()
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
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_interrupted_message(args, started)) from None
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


def _interrupted_message(args: argparse.Namespace, started: float) -> str:
    """What Ctrl-C leaves: the round the run folder written by this command reached (its
    config.json is rewritten when training starts, so it is the one newer than ``started``)."""
    from lalora.results import CONFIG_FILE, read_jsonl

    if getattr(args, "engine", "inprocess") == "flower":
        return "interrupted (the Flower engine does not resume: the same command starts the run again)"
    folders = [p.parent for p in Path(args.runs_dir).glob(f"{args.task}/{args.method}/*/{CONFIG_FILE}")
               if p.stat().st_mtime >= started - 1]
    if not folders:
        return "interrupted before the first round; run the same command again to start it"
    run = max(folders, key=lambda p: (p / CONFIG_FILE).stat().st_mtime)
    try:
        rounds = json.loads((run / CONFIG_FILE).read_text()).get("rounds")
    except (OSError, ValueError):
        rounds = None
    done = max((int(r.get("round", 0)) for r in read_jsonl(run / "metrics.jsonl")), default=0)
    of = f" of {rounds}" if rounds else ""
    return (f"interrupted at round {done + 1}{of} ({done} finished, saved in {run}); "
            "run the same command again to resume")
