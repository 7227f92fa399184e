"""`manifest.json`: what an export directory holds and how its graph is wired."""

from __future__ import annotations

import json
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from grains_edge.errors import GrainsError
from grains_edge.export.graph_io import io_names, past_names, present_names
from grains_edge.options import QUANTIZATIONS

MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
FORMAT_VERSION = 7  # what each version changed: docs/design-notes.md, "Export format versions"


KERNELS = ("stock", "fused")


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# a check per annotation of the fields below: the JSON value must have that type
TYPE_CHECKS = {
    "int": is_count,
    "str": lambda v: isinstance(v, str),
    "list[int]": lambda v: isinstance(v, list) and all(is_count(x) for x in v),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "dict[str, str]": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    "dict[str, float]": lambda v: isinstance(v, dict) and all(is_number(x) for x in v.values()),
}
POSITIVE = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "max_context")


def required_fields() -> set[str]:
    """The fields every manifest.json has (those without a default)."""
    return {f.name for f in fields(Manifest) if f.default is MISSING and f.default_factory is MISSING}


def problems(data: dict) -> list[str]:
    """What is wrong with a parsed manifest.json's fields: types first, then values."""
    known = {f.name: f.type for f in fields(Manifest)}
    found = [f"unknown field '{name}'" for name in data if name not in known]
    found += [f"no field '{name}'" for name in sorted(required_fields() - data.keys())]
    found += [
        f"'{name}' is not {kind}" for name, kind in known.items() if name in data and not TYPE_CHECKS[kind](data[name])
    ]
    if found:
        return found
    found += [f"'{name}' is {data[name]}, not a positive count" for name in POSITIVE if data[name] < 1]
    layers = data["num_layers"]
    if any(not 0 <= i < layers for i in data["steered_layers"]):
        found.append(f"steered_layers {data['steered_layers']} are not all in 0..{layers - 1}")
    if data.get("quantization", "none") not in QUANTIZATIONS:
        found.append(f"quantization '{data['quantization']}' is not one of {', '.join(QUANTIZATIONS)}")
    if data.get("kernels", "stock") not in KERNELS:
        found.append(f"kernels '{data['kernels']}' is not one of {', '.join(KERNELS)}")
    return found


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
        except (OSError, ValueError) as error:  # ValueError: not UTF-8 or not JSON
            raise GrainsError(f"{path} is damaged ({error}); fix: re-run 'grains-edge export'") from error
        if not isinstance(data, dict) or "format_version" not in data:
            raise GrainsError(
                f"{path} is not a grains-edge manifest; fix: pass an export folder (made by 'grains-edge export'), "
                "a model folder or a .gguf file"
            )
        if data["format_version"] != FORMAT_VERSION:
            raise GrainsError(
                f"{export_dir} was written by another grains-edge version (format {str(data['format_version'])[:20]}, "
                f"this one reads {FORMAT_VERSION}); fix: re-run 'grains-edge export'"
            )
        found = problems(data)
        if found:
            raise GrainsError(f"{path} is damaged ({'; '.join(found[:3])}); fix: re-run 'grains-edge export'")
        return cls(**data)

    @staticmethod
    def is_current(export_dir: str | Path) -> bool:
        """True when export_dir holds a manifest this version can read."""
        try:
            Manifest.load(export_dir)
        except GrainsError:
            return False
        return True


def graph_mismatches(manifest: Manifest, inputs: dict[str, list], outputs: dict[str, list]) -> list[str]:
    """Where the graph's declared inputs and outputs (name -> shape, a dim an int or a symbol) disagree
    with the manifest: names, and every dim the graph fixes that the manifest gives."""
    wanted_names = io_names(manifest.num_layers)
    for kind, graph_names, manifest_names, wanted in (
        ("inputs", list(inputs), manifest.input_names, wanted_names[0]),
        ("outputs", list(outputs), manifest.output_names, wanted_names[1]),
    ):
        if manifest_names != wanted:
            return [f"its {kind} do not fit num_layers {manifest.num_layers}"]
        if graph_names != manifest_names:
            only_graph = sorted(set(graph_names) - set(manifest_names))[:2]
            only_manifest = sorted(set(manifest_names) - set(graph_names))[:2]
            return [f"the graph's {kind} differ (graph only: {only_graph}, manifest only: {only_manifest})"]
    cache = [None, manifest.num_kv_heads, None, manifest.head_dim]  # [batch, kv_heads, tokens, head_dim]
    wanted = {
        "steering": [None, manifest.num_layers, manifest.hidden_size],
        "logits": [None, None, manifest.vocab_size],
    }
    caches = [*past_names(manifest.num_layers), *present_names(manifest.num_layers)]
    wanted.update((name, cache) for name in caches)
    declared = {**inputs, **outputs}
    return [
        f"{name} is {declared[name]} in the graph, the manifest says {['*' if w is None else w for w in dims]}"
        for name, dims in wanted.items()
        if not fits(declared[name], dims)
    ]


def fits(shape: list, dims: list) -> bool:
    """A declared shape matches the wanted dims: the same rank, and every fixed dim equal where both fix it."""
    if len(shape) != len(dims):
        return False
    return all(not isinstance(g, int) or w is None or g == w for g, w in zip(shape, dims, strict=True))
