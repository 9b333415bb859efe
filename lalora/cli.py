"""The `lalora` command. Each subcommand lives beside the code it drives and registers itself here.

A subcommand module exposes `register(subparsers)`, which adds a parser whose `func(args) -> int`
runs it. Imports are lazy so `lalora --help` stays fast and a missing optional extra only breaks
its own subcommand.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it provides) -- order is the order in `lalora --help`.
SUBCOMMAND_MODULES = [
    "lalora.federated.cli",      # lalora run
    "lalora.privacy.cli",        # lalora accountant
    "lalora.notebooks",          # lalora notebooks
    "lalora.site",               # lalora site
    "lalora.bench",              # lalora bench
    "lalora.audit.cli",          # lalora audit
    "lalora.export",             # lalora export-adapter
    "lalora.verify",             # lalora verify-results
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lalora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            # Only tolerate the subcommand module itself being absent, not a broken import inside it.
            if err.name is not None and name.startswith(err.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
