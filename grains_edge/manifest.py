"""`manifest.json`: what an export directory holds and how its graph is wired."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from grains_edge.errors import GrainsError

MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
FORMAT_VERSION = 7  # 2: graph built by export/graph.py (GroupQueryAttention, in-place KV cache); 3: default
# MatMulNBits zero points (Q4_1 offsets m + 8d), the renormalization in 4 kernels; 4: Q4_1 offsets folded
# into the MatMulNBits as extra K blocks; 5: a tied embedding from the GGUF head's blocks (GatherBlockQuantized);
# 6: input logits_to_keep (a prompt step computes the last position's logits only); 7: field `kernels`, Q4_1
# linears in grains-edge's own kernel (grains_edge/kernels) when it builds


@dataclass
class Manifest:
    source_model: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    steered_layers: list[int]
    input_names: list[str]
    output_names: list[str]
    opset: int
    weights_fingerprint: str
    versions: dict[str, str]
    quantization: str = "none"  # none | int8 | int4 (weight-only, MatMulNBits)
    weights: str = "float32"  # how the MatMul weights are stored, e.g. taken from a GGUF's own blocks
    kernels: str = "stock"  # stock | fused: the graph uses grains-edge's own kernels (grains_edge/kernels)
    verification: dict[str, float] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(temporary, path)

    @classmethod
    def load(cls, export_dir: str | Path) -> Manifest:
        path = Path(export_dir).expanduser() / MANIFEST_NAME
        if not path.is_file():
            raise GrainsError(
                f"{export_dir} is not a grains-edge export (no {MANIFEST_NAME}); "
                "fix: run 'grains-edge export --model M --out DIR' first"
            )
        try:
            data = json.loads(path.read_text())
            manifest = cls(**data)
        except (ValueError, TypeError) as error:
            raise GrainsError(f"{path} is damaged ({error}); fix: re-run 'grains-edge export'") from error
        if manifest.format_version != FORMAT_VERSION:
            raise GrainsError(
                f"{export_dir} was written by another grains-edge version (format {manifest.format_version}, "
                f"this one reads {FORMAT_VERSION}); fix: re-run 'grains-edge export'"
            )
        return manifest

    @staticmethod
    def is_current(export_dir: str | Path) -> bool:
        """True when export_dir holds a manifest this version can read."""
        try:
            Manifest.load(export_dir)
        except GrainsError:
            return False
        return True
