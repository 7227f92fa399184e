"""The rate of int8 dot-product instructions on one core (dot_rate.c, compiled here): vpdpbusd per ns with both
operands in registers and with one from L1. Times 64 multiply-adds and the cores, the ceiling of a compute-bound
step of the linear kernels, against which a batched step's multiply-adds say how close they come.

    python bench/dot_rate.py [--out bench/results/dot_rate.json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
from pathlib import Path

from c_probe import ProbeUnavailable, compiled
from report import machine, publish

SOURCE = Path(__file__).with_name("dot_rate.c")


def dot_rate(repeats: int = 5) -> dict:
    """{"register_per_ns", "memory_per_ns": medians, "runs": [[register, memory], ...]}; {"failed": why}."""
    try:
        with compiled(SOURCE) as binary:
            done = subprocess.run([str(binary), str(repeats)], capture_output=True, text=True, check=False)
    except ProbeUnavailable as error:
        return {"failed": str(error)}
    if done.returncode:
        return {"failed": done.stderr.strip()[:200]}
    runs = [[float(value) for value in line.split()[:2]] for line in done.stdout.splitlines()]
    return {
        "register_per_ns": statistics.median(run[0] for run in runs),
        "memory_per_ns": statistics.median(run[1] for run in runs),
        "runs": runs,
        "multiply_adds_per_instruction": 64,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    publish({"machine": machine(), **dot_rate()}, parser.parse_args().out)


if __name__ == "__main__":
    main()
