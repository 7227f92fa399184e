"""GGUF control vectors, the format of llama.cpp (`--control-vector`) and repeng, to and from profiles.

What the readers and writers of the format do (read in their sources):
- llama.cpp common/common.cpp `common_control_vector_load_one` (commit 00758e0): every tensor must be named
  `direction.N`, F32, 1-D, all of one length; N = 0 is refused ("invalid (zero) direction tensor layer index")
  and the whole file skipped; each direction is multiplied by the `--control-vector-scaled` strength (1 for
  `--control-vector`) and files are summed. It reads no metadata key.
- llama.cpp src/llama-adapter.cpp `llama_adapter_cvec::init`/`apply` (commit 0650ea8): tensors exist for layers
  1 to n_layer - 1 only, so a direction.N with N >= n_layer is ignored; `apply_to` is a plain ggml_add.
- llama.cpp src/models/llama.cpp (commit 069be0a): `cur = build_cvec(cur, il)` right after block il's last
  residual add, so direction.N is added to the output of 0-based block N (Hugging Face `hidden_states[N + 1]`).
- repeng repeng/extract.py `ControlVector.export_gguf` (commit 0ba7196): GGUFWriter(path, "controlvector"),
  `controlvector.model_hint` (the HF model_type), `controlvector.layer_count` (uint32: the number of directions;
  llama.cpp's generator writes an int32), then `direction.{layer}` with layer the 0-based block whose output its
  ControlModel adds to (its reader takes `hidden_states[layer + 1]`).
grains-edge's layer i is the output of block i too (`steering.steering_hooks` hooks decoder_layers(model)[i],
the export adds after layer i), so direction.N is profile layer N with no shift.

Strength: llama.cpp adds scale * direction.N; grains-edge adds alpha * vectors[N] and then rescales the hidden
state to its own norm. Export writes the unscaled vectors, so `--control-vector-scaled FILE alpha` adds the same
shift s: the two hidden states point the same way, llama.cpp's longer or shorter by a factor within
1 +- ||s||/||h|| (about 1 +- alpha, vectors being scaled to the layer's mean norm). Import keeps the directions
as vectors with alpha = the file's `grains_edge.alpha`, else 1 (llama.cpp's `--control-vector` strength). The
rest of a profile (name, metadata, the rows it does not steer) travels in `grains_edge.*` keys, which llama.cpp
ignores, so profile -> GGUF -> profile is exact.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from grains_edge.errors import GrainsError
from grains_edge.steer.profiles import Profile

ARCH = "controlvector"
DIRECTION = re.compile(r"direction\.(\d+)")
PROFILE_KEY = "grains_edge.profile"  # JSON: name, method, alpha, metadata
IDLE_LAYERS_KEY = "grains_edge.idle_layers"  # rows the profile holds but does not steer
IDLE_VECTORS_KEY = "grains_edge.idle_vectors"  # those rows, flattened [idle, hidden]
ALPHA_KEY = "grains_edge.alpha"
USAGE_KEY = "grains_edge.usage"


def export_gguf(profile: Profile, path: str | Path, model_hint: str, drop_layer_0: bool = False) -> list[int]:
    """Write `profile` as a llama.cpp control vector; returns the layers written. Layer 0 (llama.cpp refuses
    direction.0) is refused unless `drop_layer_0`."""
    import gguf

    layers = [layer for layer in profile.layers if layer != 0]
    if 0 in profile.layers and not drop_layer_0:
        raise GrainsError(
            f"profile '{profile.name}' steers layer 0, which llama.cpp cannot load (it refuses direction.0); "
            "fix: pass --drop-layer-0 to export the other layers only"
        )
    if not layers:
        raise GrainsError(f"profile '{profile.name}' steers only layer 0; fix: re-tune it with 'grains-edge tune'")
    idle = [layer for layer in range(profile.vectors.shape[0]) if layer not in layers]
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(temporary, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(layers))
        record = {"name": profile.name, "method": profile.method, "alpha": profile.alpha, "metadata": profile.metadata}
        writer.add_string(PROFILE_KEY, json.dumps(record))
        writer.add_float32(ALPHA_KEY, profile.alpha)
        writer.add_string(
            USAGE_KEY,
            f"llama.cpp: --control-vector-scaled {path.name} {profile.alpha:g} (scale = the profile's alpha; "
            "grains-edge also renormalizes each steered hidden state, llama.cpp does not)",
        )
        if idle:
            writer.add_array(IDLE_LAYERS_KEY, idle)
            writer.add_array(IDLE_VECTORS_KEY, profile.vectors[idle].astype(np.float32).ravel().tolist())
        for layer in layers:
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(profile.vectors[layer], np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return layers


def field_text(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (IndexError, UnicodeDecodeError, TypeError):
        return None


def field_values(reader, key: str) -> list[float]:
    field = reader.get_field(key)
    return [] if field is None else [float(field.parts[index][0]) for index in field.data]


def read_directions(path: Path, hidden: int) -> tuple[object, dict[int, np.ndarray]]:
    """(reader, {N: direction [hidden] float32}) of a control vector file, checked as llama.cpp checks it."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError) as error:
        raise GrainsError(f"cannot read {path} as GGUF ({error}); fix: pass a GGUF control vector file") from None
    architecture = field_text(reader, "general.architecture")
    if architecture not in (None, ARCH):
        raise GrainsError(
            f"{path} is a GGUF of '{architecture}', not a control vector; fix: pass a file whose "
            "general.architecture is 'controlvector' (written by llama.cpp, repeng or 'grains-edge profiles export')"
        )
    directions: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        match = DIRECTION.fullmatch(tensor.name)
        problem = (
            f"has a tensor '{tensor.name}' (a control vector holds only direction.N)"
            if match is None
            else f"has {tensor.name} of type {tensor.tensor_type.name}, not F32"
            if tensor.tensor_type != gguf.GGMLQuantizationType.F32
            else f"has {tensor.name} of shape {list(tensor.shape)}, not [{hidden}] (this model's hidden size)"
            if len(tensor.shape) != 1 or int(tensor.shape[0]) != hidden
            else None
        )
        if problem:
            raise GrainsError(f"{path} {problem}; fix: export it again for this model")
        vector = np.asarray(tensor.data, np.float32).reshape(hidden)
        if not np.isfinite(vector).all():
            raise GrainsError(f"{path} has NaN or infinite values in {tensor.name}; fix: export it again")
        layer = int(match.group(1))
        directions[layer] = directions.get(layer, 0) + vector  # duplicates add up, as in llama.cpp
    if not directions:
        raise GrainsError(f"{path} holds no direction.N tensor; fix: pass a GGUF control vector file")
    return reader, directions


def import_gguf(path: str | Path, num_layers: int, hidden: int, name: str | None = None) -> Profile:
    """A profile [num_layers, hidden] from a control vector file: direction.N steers layer N."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GrainsError(f"control vector file not found: {path}; fix: check the path")
    reader, directions = read_directions(path, hidden)
    beyond = sorted(layer for layer in directions if layer >= num_layers)
    if beyond:
        raise GrainsError(
            f"{path} steers layers {beyond} but this model has {num_layers}; "
            "fix: import it for the model it was made for"
        )
    vectors = np.zeros((num_layers, hidden), np.float32)  # [num_layers, hidden]
    for layer, vector in directions.items():
        vectors[layer] = vector
    try:
        record = json.loads(field_text(reader, PROFILE_KEY) or "{}")
        metadata = {str(key): str(value) for key, value in dict(record.get("metadata", {})).items()}
        alpha = float(record.get("alpha", 1.0))
        idle = [int(layer) for layer in field_values(reader, IDLE_LAYERS_KEY)]
        rows = np.asarray(field_values(reader, IDLE_VECTORS_KEY), np.float32).reshape(len(idle), hidden)
    except (ValueError, TypeError, AttributeError, IndexError):
        raise GrainsError(f"{path} has damaged grains_edge.* metadata; fix: export it again") from None
    if idle and (min(idle) < 0 or max(idle) >= num_layers or set(idle) & set(directions)):
        raise GrainsError(f"{path} lists idle layers {idle} that do not fit; fix: export it again")
    if idle:
        vectors[idle] = rows
    if not np.isfinite(vectors).all() or not np.isfinite(alpha):
        raise GrainsError(f"{path} has NaN or infinite values; fix: export it again")
    if not record:
        hint = field_text(reader, f"{ARCH}.model_hint") or "unknown"
        metadata = {"source": f"imported from {path.name}", "model_hint": hint, "description": f"from {path.name}"}
    return Profile(
        name=name or str(record.get("name") or path.stem),
        vectors=vectors,
        layers=sorted(directions),
        alpha=alpha,
        method=str(record.get("method", "gguf")),
        metadata=metadata,
    )
