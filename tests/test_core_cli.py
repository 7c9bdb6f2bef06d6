"""The shared argument types and parser of core/cli.py, in process (no subprocess)."""

from __future__ import annotations

import argparse
import math

import pytest

from core.cli import OneLineParser, address, listen_address, split_host_port, threshold, unit_interval


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="t")
    sub = parser.add_subparsers()
    p = sub.add_parser("go")
    p.add_argument("--threshold", type=threshold, default=0.0)
    p.add_argument("--flag", action="store_true")
    return parser


@pytest.mark.parametrize("text,value", [("-inf", -math.inf), ("-Infinity", -math.inf), ("inf", math.inf),
                                        ("-0.5", -0.5), ("-3", -3.0), ("0.06", 0.06)])
def test_threshold_accepts_infinities_as_separate_arguments(text, value):
    assert _parser().parse_args(["go", "--threshold", text]).threshold == value


def test_an_option_is_still_an_option():
    args = _parser().parse_args(["go", "--flag", "--threshold", "-inf"])
    assert args.flag and args.threshold == -math.inf


@pytest.mark.parametrize("fn,text", [(threshold, "nan"), (unit_interval, "0"), (unit_interval, "1.5"),
                                     (address, "host"), (address, "host:0"), (address, "host:70000"),
                                     (listen_address, "nohost")])
def test_bad_values_are_argument_errors(fn, text):
    with pytest.raises((argparse.ArgumentTypeError, ValueError)):
        fn(text)


def test_addresses_parse():
    assert split_host_port("[::1]:50051") == ("::1", 50051)
    assert address("127.0.0.1:1") == "127.0.0.1:1"
    assert listen_address("0.0.0.0:0") == ("0.0.0.0", 0)
