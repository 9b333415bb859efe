"""`lalora audit`: run the empirical privacy audit of one DP step (and optionally the one-run audit).

    lalora audit --epsilon 1 --trials 2000                   # correct mechanism: bound <= ε expected
    lalora audit --epsilon 1 --trials 2000 --planted noise_halved   # must report a violation
    lalora audit --epsilon 8 --one-run --canaries 1000
    lalora audit --run --planted ledger_undercount            # the run's ledger counts 1 of 20 steps
Exit status: 0 when no lower bound exceeds the accountant's ε, 1 when one does (a privacy bug).
Only assumption-free bounds decide; the Gaussian-fit figure is printed as an estimate.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from .planted import PLANTED_BUGS

    p = subparsers.add_parser("audit", help="empirical privacy audit (ε lower bounds vs the accountant)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--epsilon", type=float, default=1.0, help="target ε the DP step is calibrated for")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--trials", type=int, default=2000, help="trials per world (with / without canary)")
    p.add_argument("--model", choices=["lora", "swin"], default="lora",
                   help="block LoRA model (fast) or a small Swin (one trial per DP call)")
    p.add_argument("--planted", choices=sorted(PLANTED_BUGS), default=None,
                   help="plant a privacy bug to check the audit catches it")
    p.add_argument("--one-run", action="store_true", help="also run the one-run audit (Steinke et al. 2023)")
    p.add_argument("--canaries", type=int, default=1000, help="one-run audit: number of canaries")
    p.add_argument("--run", action="store_true",
                   help="also audit a whole federated run end to end (canaries in one client vs its ledger)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="joint confidence of all the bounds reported (split equally between them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results to this JSON file (atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..results import atomic_write_json, to_jsonable
    from . import stats
    from .canary import audit_dp_step, audit_swin_step
    from .one_run import audit_one_run
    from .planted import plant
    from .run_audit import audit_federated_run

    if args.trials < 4:
        raise SystemExit(f"--trials must be >= 4, got {args.trials}")
    if not 0.5 <= args.confidence < 1:
        raise SystemExit(f"--confidence must lie in [0.5, 1), got {args.confidence}")
    kw = {"windows_per_sample": 4} if args.planted == "per_window_clipping" else {}
    if args.planted == "per_window_clipping" and args.model != "swin":
        raise SystemExit("--planted per_window_clipping needs --model swin (the block model has no windows)")
    # every reported bound gets an equal share of the error budget, so they hold jointly (union bound)
    k = 1 + bool(args.one_run) + bool(args.run)
    each = 1.0 - (1.0 - args.confidence) / k
    out, levels = {}, []
    with plant(args.planted, **kw):
        audit = audit_swin_step if args.model == "swin" else audit_dp_step
        res = audit(args.epsilon, delta=args.delta, trials=args.trials, seed=args.seed,
                    planted=args.planted, confidence=each)
        out["canary"] = res.to_dict()
        levels.append(each)
        print(f"one DP step ({res.model}), {res.trials_per_world} trials/world, planted={args.planted}")
        print(f"  accountant ε (1 step, q=1, σ={res.noise_multiplier:.4f}): {res.accountant_epsilon:.4f}"
              f"   exact ε of that Gaussian mechanism: {res.exact_epsilon:.4f}")
        print(f"  ε lower bound, Clopper–Pearson ({res.threshold['method']}, {each:.2%}): "
              f"{res.threshold['epsilon_lb']:.4f}")
        g = res.gaussian
        print(f"  ε estimate from a Gaussian fit to the scores (NOT a bound; diagnostics "
              f"{'pass' if g['diagnostics_pass'] else 'fail'}): {g['epsilon_estimate']:.4f}"
              + ("   -> exceeds the accountant's ε: worth a closer look" if res.estimate_exceeds else ""))
        violated = res.violates
        if args.one_run:
            one = audit_one_run(args.epsilon, delta=args.delta, canaries=args.canaries, seed=args.seed,
                                guesses=max(2, args.canaries // 10), planted=args.planted, confidence=each)
            out["one_run"] = one.to_dict()
            levels.append(each)
            print(f"one-run audit: {one.canaries} canaries, {one.correct}/{one.guesses} correct, "
                  f"ε lower bound ({each:.2%}) {one.epsilon_lb:.4f} vs accountant ε {one.accountant_epsilon:.4f}")
            violated = violated or one.violates
        if args.run:
            run_res = audit_federated_run(max(args.epsilon, 8.0), delta=args.delta, seed=args.seed,
                                          planted=args.planted, confidence=each)
            out["run"] = run_res.to_dict()
            levels.append(each)
            print(f"federated-run audit: {run_res.canaries} canaries in one client, {run_res.correct}/"
                  f"{run_res.guesses} correct, ε lower bound ({each:.2%}) {run_res.epsilon_lb:.4f} vs the "
                  f"run ledger's ε {run_res.claimed_epsilon:.4f} ({run_res.steps_counted} of "
                  f"{run_res.steps_run} steps counted)")
            violated = violated or run_res.violates
    joint = stats.joint_confidence(*levels)
    out["joint_confidence"] = joint
    print(f"VIOLATION: an ε lower bound exceeds the accountant's ε (the bounds hold jointly with "
          f"confidence {joint:.2%})" if violated else
          f"ok: every ε lower bound is <= the accountant's ε (joint confidence {joint:.2%})")
    if args.json:
        atomic_write_json(args.json, to_jsonable(out))
    return 1 if violated else 0
