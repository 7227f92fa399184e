"""Behaviour profiles: steering vectors [num_layers, hidden] plus how to apply them, in one .safetensors.

Metadata (strings): name, method, layers ("4,5,6"), alpha (default strength), source (data), fingerprint
(of the model's weights), created, description, and `tuning` (the sweep table, JSON). The steering tensor
for the engine is alpha * vectors on the profile's layers and zero elsewhere. Built-in profiles ship in
`grains_edge/builtin_profiles/`; user profiles live in `paths.profiles_dir()` and shadow built-ins of the
same name. Saving writes a temporary file and renames it, so a profile is never half-written.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grains_edge import paths
from grains_edge.errors import GrainsError

BUILTIN_DIR = Path(__file__).parent / "builtin_profiles"
SUFFIX = ".safetensors"


@dataclass
class Profile:
    name: str
    vectors: np.ndarray  # [num_layers, hidden]
    layers: list[int]
    alpha: float
    method: str
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def builtin(self) -> bool:
        return self.path is not None and self.path.parent == BUILTIN_DIR


def steering_tensor(profile: Profile, alpha: float | None = None) -> np.ndarray:
    """alpha * vectors on the profile's layers, zeros elsewhere: [num_layers, hidden] float32."""
    return combine([(profile, alpha)])


def combine(terms: Sequence[tuple[Profile, float | None]]) -> np.ndarray:
    """The one strength rule: sum over terms of α * vectors on that profile's layers ([num_layers, hidden]
    float32); α None is the profile's own default. A mix weight w means α = w * profile.alpha."""
    if not terms:
        raise GrainsError("nothing to steer with; fix: name at least one profile")
    steering = np.zeros_like(terms[0][0].vectors, dtype=np.float32)
    for profile, alpha in terms:
        strength = profile.alpha if alpha is None else alpha
        steering[profile.layers] += strength * profile.vectors[profile.layers]
    return steering


def mix(weighted: Sequence[tuple[Profile, float]]) -> np.ndarray:
    """Sum of steering tensors, each at weight * its own default strength."""
    return combine([(profile, weight * profile.alpha) for profile, weight in weighted])


def save_profile(profile: Profile, path: str | Path) -> Path:
    from safetensors.numpy import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        **profile.metadata,
        "name": profile.name,
        "method": profile.method,
        "layers": ",".join(str(layer) for layer in profile.layers),
        "alpha": repr(float(profile.alpha)),
        "created": profile.metadata.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file({"vectors": np.ascontiguousarray(profile.vectors, np.float32)}, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def resolve(name_or_path: str) -> Path:
    """A profile file: an existing path, else a user profile, else a built-in one."""
    given = Path(name_or_path).expanduser()
    if given.suffix == SUFFIX or os.sep in name_or_path:
        if given.is_file():
            return given
        raise GrainsError(f"profile file not found: {name_or_path}; fix: check the path")
    for folder in (paths.profiles_dir(), BUILTIN_DIR):
        candidate = folder / f"{name_or_path}{SUFFIX}"
        if candidate.is_file():
            return candidate
    known = ", ".join(p.name for p in list_profiles()) or "none"
    raise GrainsError(
        f"unknown profile '{name_or_path}' (known: {known}); fix: pick one or build it with 'grains-edge vectors'"
    )


def load_profile(name_or_path: str) -> Profile:
    from safetensors import SafetensorError, safe_open

    path = resolve(name_or_path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            vectors = handle.get_tensor("vectors")
        return Profile(
            name=metadata.get("name", path.stem),
            vectors=vectors,
            layers=[int(x) for x in metadata.get("layers", "").split(",") if x.strip()],
            alpha=float(metadata.get("alpha", "1.0")),
            method=metadata.get("method", "unknown"),
            metadata=metadata,
            path=path,
        )
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise GrainsError(f"cannot read profile {path} ({error}); fix: rebuild it with 'grains-edge vectors'") from None


def list_profiles() -> list[Profile]:
    """User profiles, then built-ins not shadowed by a user profile of the same name; sorted by name."""
    found: dict[str, Path] = {}
    for folder in (BUILTIN_DIR, paths.profiles_dir()):
        if folder.is_dir():
            for path in sorted(folder.glob(f"*{SUFFIX}")):
                found[path.stem] = path
    profiles = []
    for name in sorted(found):
        try:
            profiles.append(load_profile(str(found[name])))
        except GrainsError:
            continue
    return profiles
