"""The machine probes written in C (read_bandwidth.c, dot_rate.c): compiled here with the system's C compiler
for this CPU, into a folder that goes when the probe has run."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ProbeUnavailable(Exception):
    """The probe cannot be built here; the message says why."""


@contextmanager
def compiled(source: Path, *flags: str) -> Iterator[Path]:
    """The binary of `source` ($CC, else cc; -O2 -march=native and `flags`), for the length of the block."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise ProbeUnavailable("no C compiler (set CC)")
    with tempfile.TemporaryDirectory() as folder:
        binary = Path(folder) / source.stem
        command = [compiler, "-O2", "-march=native", *flags, str(source), "-o", str(binary)]
        built = subprocess.run(command, capture_output=True, text=True, check=False)
        if built.returncode:
            raise ProbeUnavailable(built.stderr.strip().splitlines()[-1][:200])
        yield binary
