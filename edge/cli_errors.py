"""One-line CLI errors for every command of the project (edge, cloud, models): no usage dump, no traceback.

A bad argument or an unusable file is the user's to fix, so it gets one line naming the problem and exit
status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input (argument, file, folder) that a person can act on."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block first
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None, user_errors: tuple = ()) -> int:
    """Parse ``argv`` and call ``args.func(args)``; user errors become one line on stderr and exit 2."""
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.error("choose a command")
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, *user_errors) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535 (0 = any free port), got {text}")
    return value


CommandFn = Callable[[argparse.Namespace], int]
