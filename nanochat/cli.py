"""
Range checks for the training scripts' command lines. argparse checks types only: `--device-batch-size=0` would
otherwise surface as a ZeroDivisionError deep in setup, and `--num-iterations=0` silently trains the default
(days-long) horizon. A bad value ends the script at once with argparse's usage line and the flag named.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    positive: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    fractions: Iterable[str] = (),
    horizons: Iterable[str] = (),
) -> argparse.Namespace:
    """
    positive: > 0; non_negative: >= 0 (0 usually means "the default"); fractions: in [0, 1];
    horizons: -1 (the script's default horizon) or > 0. Calls parser.error (exit 2) naming the first bad flag.
    """
    rules = [
        (positive, lambda v: v > 0, "must be positive"),
        (non_negative, lambda v: v >= 0, "must be >= 0"),
        (fractions, lambda v: 0 <= v <= 1, "must be between 0 and 1"),
        (horizons, lambda v: v == -1 or v > 0, "must be -1 (the default) or positive"),
    ]
    for names, ok, rule in rules:
        for name in names:
            value = getattr(args, name)
            if not ok(value):
                parser.error(f"{_flag(name)} {rule}, got {value}")
    return args
