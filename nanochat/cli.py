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


# -----------------------------------------------------------------------------
# Flags every training script has (names, defaults and help as the original nanochat's; only the help that
# differs by script is a parameter)

COMPILE_HELP = "torch.compile (auto: when the planned steps amortise it; see nanochat/compile_policy.py)"
# The learning-rate flags (add_optimizer_flags), for check_ranges(non_negative=...).
OPTIMIZER_FLAGS = ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay")


def add_device_flags(
    parser: argparse.ArgumentParser, device_help: str | None = None,
    dtype_help: str = "bfloat16|float32 (default: bf16 on cuda)",
) -> None:
    """--device-type (default: autodetect) and --dtype (default: common.default_dtype)."""
    parser.add_argument("--device-type", default="", help=device_help)
    parser.add_argument("--dtype", default="", help=dtype_help)


def add_optimizer_flags(parser: argparse.ArgumentParser, init_lr_frac: float | None = None) -> None:
    """The AdamW (embedding, unembedding) and Muon (matrix) learning rates and the weight decay; a stage that
    starts from a trained model also gets --init-lr-frac, the fraction of them it starts at."""
    parser.add_argument("--embedding-lr", type=float, default=0.2)
    parser.add_argument("--unembedding-lr", type=float, default=0.004)
    parser.add_argument("--matrix-lr", type=float, default=0.02)
    if init_lr_frac is not None:
        parser.add_argument("--init-lr-frac", type=float, default=init_lr_frac)
    parser.add_argument("--weight-decay", type=float, default=0.0)


def add_resume_flags(parser: argparse.ArgumentParser, resumes_from: str) -> None:
    """--resume (from the last complete checkpoint: `resumes_from` says which) and --resume-from-step."""
    parser.add_argument("--resume", action="store_true", help=f"continue from the last {resumes_from}")
    parser.add_argument("--resume-from-step", type=int, default=-1,
                        help="continue from this saved step (implies --resume)")


def add_run_flags(parser: argparse.ArgumentParser, compile_help: str = COMPILE_HELP) -> None:
    """--compile, --seed and --log-every."""
    parser.add_argument("--compile", choices=["auto", "yes", "no"], default="auto", help=compile_help)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--log-every", type=int, default=1)
