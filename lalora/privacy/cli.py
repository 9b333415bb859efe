"""`lalora accountant`: both directions of the privacy accountant from the command line.

    lalora accountant --epsilon 1 --delta 1e-5 --sample-rate 0.032 --steps 1000 [--accountant rdp|prv] [--sigma S]

prints the noise multiplier σ that meets the target ε, and the ε that this σ actually gives
(≤ the target). With --sigma S it also prints the ε that S gives; --sigma alone (no --epsilon)
prints only that. --json prints the same numbers as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from .accountant import ACCOUNTANTS, DEFAULT_ACCOUNTANT, calibrate_sigma, epsilon_for


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "accountant", help="noise multiplier for a target epsilon, and epsilon for a noise multiplier",
        description=__doc__.splitlines()[0])
    p.add_argument("--epsilon", type=float, help="target epsilon (omit to only evaluate --sigma)")
    p.add_argument("--delta", type=float, default=1e-5, help="target delta (default 1e-5)")
    p.add_argument("--sample-rate", type=float, required=True,
                   help="Poisson sampling rate q = batch size / examples per client")
    p.add_argument("--steps", type=int, required=True, help="number of DP steps")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default=DEFAULT_ACCOUNTANT)
    p.add_argument("--sigma", type=float, help="also report the epsilon of this noise multiplier")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.epsilon is None and args.sigma is None:
        print("lalora accountant: error: give --epsilon, --sigma, or both", file=sys.stderr)
        return 2
    out: dict = {"accountant": args.accountant, "delta": args.delta,
                 "sample_rate": args.sample_rate, "steps": args.steps}
    lines = [f"accountant={args.accountant}  delta={args.delta:g}  sample_rate={args.sample_rate:g}  "
             f"steps={args.steps}  (Poisson sampling, Opacus)"]
    try:
        if args.epsilon is not None:
            sigma = calibrate_sigma(args.epsilon, args.delta, [(args.sample_rate, args.steps)], args.accountant)
            achieved = epsilon_for(sigma, args.delta, args.sample_rate, args.steps, args.accountant)
            out.update(target_epsilon=args.epsilon, noise_multiplier=sigma, epsilon=achieved)
            lines.append(f"noise multiplier for epsilon <= {args.epsilon:g}: sigma = {sigma:.4f}")
            lines.append(f"epsilon given by sigma = {sigma:.4f}: {achieved:.4f}"
                         + ("" if math.isinf(achieved) else f"  (target {args.epsilon:g})"))
        if args.sigma is not None:
            eps = epsilon_for(args.sigma, args.delta, args.sample_rate, args.steps, args.accountant)
            out.update(sigma=args.sigma, epsilon_for_sigma=eps)
            lines.append(f"epsilon given by sigma = {args.sigma:g}: {eps:.4f}")
    except ValueError as err:   # bad input: one line and exit 2, like every lalora command
        print(f"lalora accountant: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out) if args.json else "\n".join(lines))
    return 0
