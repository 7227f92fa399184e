"""What runs where: the execution providers a `--device` choice asks ONNX Runtime for, and the one line the
engine prints when its graph, or part of it, runs on the CPU where CUDA was possible.

Pure functions of provider names and manifest fields (no onnxruntime import), so the export and the engine
share one rule and tests can fake a GPU.
"""

from __future__ import annotations

from grains_edge.errors import GrainsError
from grains_edge.options import DEVICES

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def choose_providers(device: str, available: list[str]) -> list[str]:
    """Execution providers for `device`: CUDA first when asked for (or auto) and installed, CPU always."""
    if device not in DEVICES:
        raise GrainsError(f"unknown device '{device}'; fix: use one of {', '.join(DEVICES)}")
    if device != "cpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def device_notice(device: str, available: list[str], active: str, kernels: str) -> str | None:
    """The one line to print about where a session runs: on the CPU although CUDA was wanted (or possible),
    or on CUDA with part of the graph left on the CPU; `active` is the session's first provider, `kernels`
    the manifest's (stock | fused)."""
    if active == CUDA:
        # every export computes in float32, so no export has a CUDA attention kernel yet
        why = "ONNX Runtime's CUDA GroupQueryAttention takes fp16/bf16 only, and grains-edge has no fp16 export yet"
        if kernels == "fused":
            return (
                "running on CUDA, but attention and grains-edge's own kernels (Q4_1MatMul, SteeredAdd; CPU only) "
                f"run on the CPU: {why}; re-export with --kernels stock to move the linears to CUDA"
            )
        return f"running on CUDA, but attention runs on the CPU: {why}"
    if device == "cpu":
        return None
    if CUDA not in available:
        return "CUDA not available (onnxruntime-gpu is not installed: pip install 'grains-edge[gpu]'); running on CPU"
    return "CUDA provider could not start (no usable GPU or CUDA libraries); running on CPU"
