"""The choices and argument types the commands share, in one light module (no numpy, no torch: `--help` stays
fast); the modules that act on a choice check it against the same tuple."""

from __future__ import annotations

import argparse
import math

QUANTIZATIONS = ("none", "int8", "int4")  # weight-only, MatMulNBits
KERNEL_CHOICES = ("auto", "fused", "stock")  # whether an int4 export from a GGUF runs grains-edge's own kernels
DEVICES = ("auto", "cpu", "cuda")
METHODS = ("grains", "mean-diff", "pca-diff")  # how steering vectors are built
AGGREGATES = ("pc1", "centered-pc1", "mean")  # GRAINS: per-pair hidden-state changes -> v+ and v-
SPLITS = ("report", "tune", "validation", "train", "train+tune", "all")  # evaluate.datasets.select
SCORES = ("text", "letter")  # an A/B answer scored by its text or by its letter
TOWARD = ("matching", "not-matching")  # the side of an A/B item a profile steers toward
PREFIX_CACHE_MB = 256  # serve's default: finished rows' KV kept for reuse, ~5,600 tokens of the default model


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
