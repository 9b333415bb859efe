"""`lalora audit`: run the empirical privacy audit of one DP step (and optionally the one-run audit).

    lalora audit --epsilon 1 --trials 2000                   # correct mechanism: bound <= ε expected
    lalora audit --epsilon 1 --trials 2000 --planted noise_halved   # must report a violation
    lalora audit --epsilon 8 --one-run --canaries 1000
Exit status: 0 when no lower bound exceeds the accountant's ε, 1 when one does (a privacy bug).
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results to this JSON file (atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..results import atomic_write_json, to_jsonable
    from .canary import audit_dp_step, audit_swin_step
    from .one_run import audit_one_run
    from .planted import plant

    if args.trials < 4:
        raise SystemExit(f"--trials must be >= 4, got {args.trials}")
    kw = {"windows_per_sample": 4} if args.planted == "per_window_clipping" else {}
    if args.planted == "per_window_clipping" and args.model != "swin":
        raise SystemExit("--planted per_window_clipping needs --model swin (the block model has no windows)")
    out = {}
    with plant(args.planted, **kw):
        audit = audit_swin_step if args.model == "swin" else audit_dp_step
        res = audit(args.epsilon, delta=args.delta, trials=args.trials, seed=args.seed, planted=args.planted)
        out["canary"] = res.to_dict()
        print(f"one DP step ({res.model}), {res.trials_per_world} trials/world, planted={args.planted}")
        print(f"  accountant ε (1 step, q=1, σ={res.noise_multiplier:.4f}): {res.accountant_epsilon:.4f}"
              f"   exact ε of that Gaussian mechanism: {res.exact_epsilon:.4f}")
        print(f"  ε lower bound, Clopper–Pearson ({res.threshold['method']}, 97.5%): "
              f"{res.threshold['epsilon_lb']:.4f}")
        print(f"  ε lower bound, Gaussian scores (97.5%): {res.gaussian['epsilon_lb']:.4f}"
              f"   (assumption {'ok' if res.gaussian['assumption_ok'] else 'REJECTED'})")
        violated = res.violates
        if args.one_run:
            one = audit_one_run(args.epsilon, delta=args.delta, canaries=args.canaries, seed=args.seed,
                                guesses=max(2, args.canaries // 10), planted=args.planted)
            out["one_run"] = one.to_dict()
            print(f"one-run audit: {one.canaries} canaries, {one.correct}/{one.guesses} correct, "
                  f"ε lower bound {one.epsilon_lb:.4f} vs accountant ε {one.accountant_epsilon:.4f}")
            violated = violated or one.violates
    print("VIOLATION: an empirical lower bound exceeds the accountant's ε (joint confidence 95%)"
          if violated else "ok: every lower bound is <= the accountant's ε")
    if args.json:
        atomic_write_json(args.json, to_jsonable(out))
    return 1 if violated else 0
