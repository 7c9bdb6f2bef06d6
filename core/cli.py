"""Command-line rules every command of the project shares (edge, cloud, models, eval, simulate).

A bad argument or an unusable file is the user's to fix, so it gets one line naming the problem and exit
status 2: no usage dump, no traceback. Anything else is a bug and keeps its traceback. The argument types
below are the one definition of each kind of value (a port, a threshold, a HOST:PORT address, ...).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input (argument, file, folder) that a person can act on."""


# argparse takes any token starting with "-" for an option unless it looks like a negative number, and its
# own pattern does not count "-inf": `--threshold -inf` (verify everything) would fail as "expected one
# argument". Negative infinity is a number here.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+|\d*\.\d+|inf|infinity)$", re.IGNORECASE)


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER  # subparsers are built with this class too

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


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
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


def threshold(text: str) -> float:
    """An uncertainty threshold; ``inf`` and ``-inf`` are allowed (verify nothing / everything)."""
    value = float(text)
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be a number (inf and -inf allowed), got {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in (0, 1] (top-p)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def split_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port); ValueError naming the problem."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port_text)


def address(text: str) -> str:
    """``HOST:PORT`` with a port in 1..65535 (a server to connect to)."""
    try:
        if split_host_port(text)[1] == 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port in 1..65535, got {text}") from None
    return text


def addresses(text: str) -> list[str]:
    """Comma-separated ``HOST:PORT`` addresses (replicas to fail over to, in order)."""
    return [address(a.strip()) for a in text.split(",")]


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` to listen on (port 0 = any free port), as (host, port)."""
    try:
        return split_host_port(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, got {text}") from None


CommandFn = Callable[[argparse.Namespace], int]
