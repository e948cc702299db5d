"""The `adistill` command line. The CLI owns the terminal: progress bars, tables, one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import adistill
from adistill.cli import keys, onboard, registry, serve, train, tune
from adistill.errors import AdistillError

log = logging.getLogger("adistill")

# Each command group registers its subcommands; this order is the order of `adistill --help`.
COMMAND_GROUPS = (train, registry, onboard, tune, serve, keys)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adistill", description=__doc__)
    parser.add_argument("--version", action="version", version=f"adistill {adistill.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # the CLI owns the terminal: no weight-loading reports
    transformers.logging.disable_progress_bar()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (AdistillError, FileExistsError) as exc:
        sys.stderr.write(f"adistill {args.command}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"adistill {args.command}: interrupted\n")
        return 130
