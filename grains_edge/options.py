"""Argument types shared by the commands (light: no numpy, no torch, so `--help` stays fast)."""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite (argparse type: `--alpha nan` is a usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number; fix: pass e.g. 0.02") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number; fix: pass e.g. 0.02")
    return value


def finite_floats(text: str) -> list[float]:
    """A comma-separated list of finite floats (argparse type), e.g. '0.005,0.01,0.02'."""
    values = [finite_float(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"'{text}' names no number; fix: pass e.g. 0.005,0.01,0.02")
    return values
