"""The `lalora` command. Each subcommand lives beside the code it drives and registers itself here.

A subcommand module exposes `register(subparsers)`, which adds a parser whose `func(args) -> int`
runs it. Imports are lazy so `lalora --help` stays fast and a missing optional extra only breaks
its own subcommand.

Exit codes, the same for every subcommand:
  0    done (for `audit` and `verify-results`: and the check passed)
  1    a check ran and found a problem (`audit`: an ε lower bound above the accountant's;
       `verify-results`: a committed cell did not reproduce; `notebooks`: a notebook failed)
  2    bad input or an unusable environment: one line on stderr naming the field or path and what
       is expected (argparse usage errors, a folder that cannot be written, ...)
  130  interrupted (Ctrl-C); finished work is kept and the same command continues it
`--debug` (anywhere on the line) shows the traceback instead of the one line.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

DEBUG_FLAG = "--debug"

# (module, what it provides) -- order is the order in `lalora --help`.
SUBCOMMAND_MODULES = [
    "lalora.run_cli",            # lalora run
    "lalora.privacy.cli",        # lalora accountant
    "lalora.notebooks",          # lalora notebooks
    "lalora.site",               # lalora site
    "lalora.bench",              # lalora bench
    "lalora.audit.cli",          # lalora audit
    "lalora.export",             # lalora export-adapter
    "lalora.verify",             # lalora verify-results
]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage of `lalora run` is 25 lines, which
    buried the actual complaint); `--help` still prints everything."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lalora", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the full traceback of an error (also accepted after the subcommand)")
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


def describe_os_error(err: OSError) -> str:
    """One line for a filesystem error: what failed, on which path, and what to do about it."""
    path = f" {err.filename}" if err.filename else ""
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{path}: {err.strerror} (choose a writable folder: --runs-dir, --out or LALORA_CACHE)"
    if err.errno == errno.ENOTDIR:
        return f"{path.strip()} (or a folder above it) is a file, not a folder"
    if err.errno == errno.EEXIST:
        return f"{path.strip()} exists and is not a folder"
    if err.errno == errno.ENOSPC:
        return f"no space left on the device while writing{path}; free some space and run the same command again"
    return f"{err.strerror or err}{':' + path if path else ''}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    parser = build_parser()
    args = parser.parse_args(argv)   # usage errors: argparse prints one line and exits 2
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    name = f"lalora {args.command}"
    # The one error boundary: whatever a subcommand does not handle becomes one line and an exit
    # code here, so no command shows a traceback for a user's mistake or a full disk.
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        if debug:
            raise
        # a subcommand may re-raise with a better message (lalora run: the round it stopped at)
        detail = str(err) or "interrupted; finished work is kept: run the same command again to continue"
        print(f"{name}: {detail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as err:
        # `raise SystemExit("message")` is a subcommand refusing its input: exit 2, like argparse
        if debug or not isinstance(err.code, str):
            raise
        message = err.code if err.code.startswith("lalora") else f"{name}: error: {err.code}"
        print(message, file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        if debug:
            raise
        print(f"{name}: error: {describe_os_error(err)} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as err:   # library code names the bad field in its ValueError
        if debug:
            raise
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
