"""What every benchmark records: the machine it ran on (speed depends on the CPU kind more than on anything
else) and its result as JSON, in which a NaN or an infinity is refused as a failed measurement."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# the instruction sets the kernels of ONNX Runtime, llama.cpp and grains-edge choose their paths by
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")


def machine() -> dict:
    """The CPU model, its SIMD flags, core count, platform and the load average at the time of the call."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {
        "cpu": model,
        "simd": [flag for flag in SIMD_FLAGS if flag in flags],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],
    }


def publish(result: dict, out: str | Path | None) -> None:
    """Print `result` as JSON and, with `out`, write it there whole (a temporary file renamed into place)."""
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    print(text, end="")
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text)
        os.replace(temporary, path)
