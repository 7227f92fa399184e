"""grains-edge's own ONNX Runtime kernels (C++, the `*.cc` beside this file), compiled on first use here.

`Q4_1MatMul` (q4_1_matmul.cc) computes a linear layer from a GGUF's Q4_1 blocks in one kernel, where stock ONNX
Runtime needs three for the same exact weight (export/gguf_blocks.py); `Q4_0MatMul`, `Q4_KMatMul`, `Q5_KMatMul`,
`Q6_KMatMul` and their `Gather`s (k_quant_matmul.cc) read a GGUF's Q4_0, Q4_K, Q5_K and Q6_K blocks as they are
(4.5, 4.5, 5.5 and 6.56 bits per weight, exact; MatMulNBits and the Q4_1 kernel's fields took 5, 5 rounded, 10 and
10); `CachedAttention` (cached_attention.cc) keeps GroupQueryAttention's contract with decode and prompt steps of its
own; `SteeredAdd` (steered_add.cc) does a steered layer's residual add and renormalization in one kernel, where stock
ops need four;
all are registered by register.cc in the ONNX domain "grains_edge". Compiling them needs a C++17 compiler (`$CXX`,
else `c++`) and ONNX Runtime's C/C++ API headers, which the onnxruntime wheel does not ship. They are looked for in
`$GRAINS_EDGE_ORT_INCLUDE`, in the virtualenv's `include/onnxruntime` (where `make` unpacks Debian's
libonnxruntime-dev), then in /usr/include/onnxruntime and /usr/local/include/onnxruntime. The library is built with
-march=native into grains-edge's cache folder, keyed by the source, the headers, the compiler and the CPU, so a
second run loads it at once, and a machine that has since lost its compiler or headers keeps using its build.
Without compiler, headers or an earlier build, exports use the stock kernels.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from grains_edge import paths
from grains_edge.errors import GrainsError

DOMAIN = "grains_edge"  # the ONNX domain of the custom ops
SOURCES = sorted(Path(__file__).parent.glob("*.cc"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))  # included by SOURCES: part of a build's key
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]
HEADER = "onnxruntime_cxx_api.h"
LIBRARY = "libgrains_edge_kernels.so"
INSTALL_HINT = (
    "install ONNX Runtime's C++ headers (Debian/Ubuntu: apt install libonnxruntime-dev; or run `make`, which "
    "unpacks them into the virtualenv) or point GRAINS_EDGE_ORT_INCLUDE at the folder holding onnxruntime_cxx_api.h"
)


class KernelsUnavailable(GrainsError):
    """The kernels cannot be built here; the message says why and how to fix it."""


def header_dirs() -> list[Path]:
    """Where the ONNX Runtime headers are looked for, in order."""
    found = [Path(os.environ["GRAINS_EDGE_ORT_INCLUDE"])] if os.environ.get("GRAINS_EDGE_ORT_INCLUDE") else []
    return found + [
        Path(sys.prefix) / "include" / "onnxruntime",
        Path("/usr/include/onnxruntime"),
        Path("/usr/local/include/onnxruntime"),
    ]


def header_dir() -> Path | None:
    return next((folder for folder in header_dirs() if (folder / HEADER).is_file()), None)


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def cpu_signature() -> str:
    """The CPU's feature flags (what -march=native compiles for); empty where /proc/cpuinfo is absent."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith("flags")), "")


# What the vector paths of k_quant_matmul.cc and cached_attention.cc need; elsewhere they run plain C++, slower
# than ONNX Runtime's own kernels, so exports made there keep those (`vector_kernels`)
VECTOR_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def vector_kernels() -> bool:
    """Whether this CPU runs the GGUF-byte and attention kernels' AVX-512 VNNI paths."""
    flags = set(cpu_signature().split())
    return all(flag in flags for flag in VECTOR_FLAGS)


def digest(*parts: bytes | str | list[str]) -> str:
    key = hashlib.sha256()
    for part in parts:
        key.update(hashlib.sha256(part if isinstance(part, bytes) else str(part).encode()).digest())
    return key.hexdigest()[:16]


def builds_dir(flags: list[str]) -> Path:
    """The folder of this source's builds for these flags and this CPU (one per headers and compiler)."""
    sources = b"".join(source.read_bytes() for source in [*SOURCES, *HEADERS])
    return paths.cache_dir() / "kernels" / digest(sources, cpu_signature(), flags)


def library_path(cxx: str, include: Path, flags: list[str]) -> Path:
    """Where the library built from this source, headers, compiler, flags and CPU lives."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    headers = (include / "onnxruntime_c_api.h").read_bytes()
    return builds_dir(flags) / digest(headers, version) / LIBRARY


def cached_build(flags: list[str]) -> Path | None:
    """The newest build of this source for these flags and CPU, whatever headers and compiler made it."""
    built = sorted(builds_dir(flags).glob(f"*/{LIBRARY}"), key=lambda path: path.stat().st_mtime)
    return built[-1] if built else None


def library(extra_flags: tuple[str, ...] = ()) -> Path:
    """The compiled kernel library, building it first if needed; KernelsUnavailable when it cannot be.
    Without a compiler or headers, a build this machine made earlier of the same source is used.
    `extra_flags` (e.g. -mno-avx512f) build a variant, which tests use to check every instruction path."""
    cxx, include = compiler(), header_dir()
    flags = [*FLAGS, *extra_flags]
    if cxx is None or include is None:
        cached = cached_build(flags)
        if cached is not None:
            return cached
    if cxx is None:
        raise KernelsUnavailable("no C++ compiler for grains-edge's kernels; fix: install g++ (or set CXX)")
    if include is None:
        raise KernelsUnavailable(f"no ONNX Runtime headers for grains-edge's kernels; fix: {INSTALL_HINT}")
    target = library_path(cxx, include, flags)
    if target.is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_suffix(".lock")):
        if target.is_file():
            return target
        print("[grains-edge] compiling grains-edge's kernels for this machine (once)", file=sys.stderr)
        partial = target.with_suffix(f".partial-{os.getpid()}")
        result = subprocess.run(
            [cxx, *flags, f"-I{include}", *map(str, SOURCES), "-o", str(partial)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise KernelsUnavailable(f"grains-edge's kernels did not compile ({first}); fix: {INSTALL_HINT}")
        os.replace(partial, target)
    return target


def unavailable_reason() -> str | None:
    """None when the kernels can be used here, else why not (and the fix)."""
    try:
        library()
    except KernelsUnavailable as error:
        return str(error)
    return None


def register(options) -> None:
    """Add the kernels to an onnxruntime.SessionOptions, for a graph that uses them."""
    options.register_custom_ops_library(str(library()))
