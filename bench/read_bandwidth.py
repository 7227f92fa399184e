"""The machine's streaming read bandwidth (read_bandwidth.c, compiled here): the ceiling of a decode step that
reads every weight once. A contender's bytes per step over it give the fastest decode any engine could reach
on these weights; its own rate times its bytes say how close it comes.

    python bench/read_bandwidth.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

from c_probe import ProbeUnavailable, compiled

SOURCE = Path(__file__).with_name("read_bandwidth.c")
BUFFER_MB = 1024  # far beyond any last-level cache here (32 MB)


def read_bandwidth(threads: int, repeats: int = 9) -> dict:
    """{"gb_per_s": median, "runs": [...], "threads": n}; {"failed": why} without a C compiler."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "spread"}
    try:
        with compiled(SOURCE, "-fopenmp") as binary:
            done = subprocess.run(
                [str(binary), str(BUFFER_MB), str(repeats)], capture_output=True, text=True, check=True, env=env
            )
    except ProbeUnavailable as error:
        return {"failed": str(error)}
    runs = [float(line.split()[0]) for line in done.stdout.splitlines()]
    return {"gb_per_s": statistics.median(runs), "runs": runs, "threads": threads}


def bytes_per_second() -> float:
    """The median read bandwidth with every core, in bytes/s, for a benchmark's roofline; without a C compiler
    it stops, naming the fix."""
    measured = read_bandwidth(os.cpu_count() or 1)
    if "failed" in measured:
        raise SystemExit(f"the read-bandwidth probe did not build ({measured['failed']}); fix: install cc or set CC")
    return measured["gb_per_s"] * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    print(json.dumps(read_bandwidth(parser.parse_args().threads), indent=1))


if __name__ == "__main__":
    main()
