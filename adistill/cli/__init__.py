"""The `adistill` command line: one module per command group; `main` is the console entry point.

`main.py` builds the parser from each group's `add_parser` and turns errors into one line and an exit code;
`common.py` holds the flags and helpers groups share; `train.py` (train, evaluate, predict), `registry.py`,
`onboard.py`, `tune.py` and `serve.py` (serve, demo) hold the commands.
"""

from adistill.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
