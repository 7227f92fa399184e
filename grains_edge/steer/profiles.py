"""Behaviour profiles: steering vectors [num_layers, hidden] plus how to apply them, in one .safetensors.

Metadata (strings): name, method, layers ("4,5,6"), alpha (default strength), source (data), fingerprint
(of the model's weights), created, description, and `tuning` (the sweep table, JSON). The steering tensor
for the engine is alpha * vectors on the profile's layers and zero elsewhere (`combine`, the one strength
rule of the chat, `ask`, `eval` and the server). Built-in profiles ship in `grains_edge/steer/builtin_profiles/`;
user profiles live in `paths.profiles_dir()` and shadow built-ins of the same name. Saving writes a temporary
file and renames it, so a profile is never half-written.

Trust: a profile is validated when it is read (a 2-D float tensor `vectors`, every value finite, layers
within its rows, a finite alpha) and again where it meets a model (`check_fits`: its shape, and a warning
when its fingerprint names other weights); a strength far outside the tuned range warns once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grains_edge import paths
from grains_edge.errors import GrainsError

BUILTIN_DIR = Path(__file__).parent / "builtin_profiles"
SUFFIX = ".safetensors"
REBUILD = "fix: rebuild it with 'grains-edge vectors', or delete the file"
# α counts as far outside the tuned range when |α| exceeds FAR_OUTSIDE times the largest |α| the profile was
# tuned at (its `tuning` sweep), or, untuned, FAR_OUTSIDE times 10·|its default α|: past that the small
# models this runs answer garbage
FAR_OUTSIDE = 2.0


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


class OnceWarnings:
    """A profile warning (key, message) shown through `show` the first time its key comes, then no more."""

    def __init__(self, show: Callable[[str], None]):
        self.show = show
        self.shown: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.shown:
            self.shown.add(key)
            self.show(message)


warn_once = OnceWarnings(lambda message: print(f"[grains-edge] warning: {message}", file=sys.stderr, flush=True))


def finite_alpha(alpha: float, what: str = "alpha") -> float:
    """`alpha` as a float, or a one-line error when it is NaN or infinite."""
    value = float(alpha)
    if not math.isfinite(value):
        raise GrainsError(f"{what} must be a finite number, not {alpha}; fix: pass a strength like 0.02")
    return value


def tuned_range(profile: Profile) -> tuple[float, float]:
    """The strengths the profile was tuned over (its sweep table), else [0, 10·α] (ordered)."""
    try:
        sweep = json.loads(profile.metadata.get("tuning", "{}")).get("sweep", [])
        swept = [float(row["alpha"]) for row in sweep]
    except (ValueError, TypeError, AttributeError, KeyError):
        swept = []
    swept = [alpha for alpha in swept if math.isfinite(alpha)]
    if swept:
        return min(swept), max(swept)
    return min(0.0, 10 * profile.alpha), max(0.0, 10 * profile.alpha)


def warn_if_far(profile: Profile, alpha: float, warn: Callable[[str, str], None] = warn_once) -> None:
    low, high = tuned_range(profile)
    bound = FAR_OUTSIDE * max(abs(low), abs(high))
    if bound > 0 and abs(alpha) > bound:
        warn(
            f"alpha:{profile.name}",
            f"α {alpha:g} is far outside the range profile '{profile.name}' was tuned for ([{low:g}, {high:g}]); "
            f"expect garbage; fix: use a strength within ±{bound:g}",
        )


def combine(terms: Sequence[tuple[Profile, float | None]], warn: Callable[[str, str], None] = warn_once) -> np.ndarray:
    """The one strength rule: sum over terms of α * vectors on that profile's layers ([num_layers, hidden]
    float32); α None is the profile's own default. A mix weight w means α = w * profile.alpha."""
    if not terms:
        raise GrainsError("nothing to steer with; fix: name at least one profile")
    shape = terms[0][0].vectors.shape
    steering = np.zeros(shape, dtype=np.float32)  # [num_layers, hidden]
    for profile, alpha in terms:
        if profile.vectors.shape != shape:
            raise GrainsError(
                f"profiles '{terms[0][0].name}' {tuple(shape)} and '{profile.name}' {tuple(profile.vectors.shape)} "
                "are for different models; fix: combine profiles built for the same model"
            )
        strength = profile.alpha if alpha is None else finite_alpha(alpha, f"the strength of '{profile.name}'")
        if alpha is not None:
            warn_if_far(profile, strength, warn)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow (inf, or inf - inf) is refused below
            steering[profile.layers] += strength * profile.vectors[profile.layers]
    if not np.isfinite(steering).all():
        raise GrainsError("the steering overflows float32 at this strength; fix: use a smaller α")
    return steering


def steering_tensor(profile: Profile, alpha: float | None = None) -> np.ndarray:
    """alpha * vectors on the profile's layers, zeros elsewhere: [num_layers, hidden] float32."""
    return combine([(profile, alpha)])


def check_fits(
    profile: Profile,
    num_layers: int,
    hidden: int,
    fingerprint: str | None = None,
    warn: Callable[[str, str], None] = warn_once,
) -> Profile:
    """The profile, if it can steer a model of this shape; warns once when it was built from other weights."""
    if tuple(profile.vectors.shape) != (num_layers, hidden):
        raise GrainsError(
            f"profile '{profile.name}' was built for another model (vectors {tuple(profile.vectors.shape)}, "
            f"this model needs {(num_layers, hidden)}); fix: build it for this model with 'grains-edge vectors'"
        )
    outside = [layer for layer in profile.layers if not 0 <= layer < num_layers]
    if outside:
        raise GrainsError(
            f"profile '{profile.name}' steers layers {outside} of a {num_layers}-layer model; "
            f"fix: choose layers 0 to {num_layers - 1}"
        )
    built_for = profile.metadata.get("fingerprint", "")
    if fingerprint and built_for and built_for != fingerprint:
        warn(
            f"fingerprint:{profile.name}",
            f"profile '{profile.name}' was built for other weights (fingerprint {built_for}, this model "
            f"{fingerprint}); it may steer poorly; fix: rebuild it for this model with 'grains-edge vectors'",
        )
    return profile


def steering_for(
    engine, name: str, alpha: float | None = None, layers_spec: str | None = None
) -> tuple[np.ndarray | None, dict]:
    """The steering tensor [num_layers, hidden] of profile `name` (None for 'none') on `engine`, and what it is."""
    from grains_edge.layers import parse_layers

    if name in (None, "none"):
        return None, {"profile": "none"}
    manifest = getattr(engine, "manifest", None)
    profile = check_fits(
        load_profile(name), engine.num_layers, engine.hidden_size, getattr(manifest, "weights_fingerprint", None)
    )
    if layers_spec:
        profile.layers = parse_layers(layers_spec, engine.num_layers)
    strength = profile.alpha if alpha is None else finite_alpha(alpha)
    info = {"profile": profile.name, "method": profile.method, "alpha": strength, "layers": profile.layers}
    return combine([(profile, strength)]), info


def weighted_terms(weighted: Sequence[tuple[Profile, float]]) -> list[tuple[Profile, float]]:
    """Mix weights as strengths for `combine`: weight w on profile P steers at α = w × P's own α."""
    return [(profile, finite_alpha(weight, "a mix weight") * profile.alpha) for profile, weight in weighted]


def mixed(name: str, weighted: Sequence[tuple[Profile, float]]) -> Profile:
    """A new profile a·P + b·Q: vectors = the combined steering (each at weight × its own α), α 1, layers the
    union; the recipe is kept as JSON."""
    vectors = combine(weighted_terms(weighted))
    fingerprints = {profile.metadata["fingerprint"] for profile, _ in weighted if profile.metadata.get("fingerprint")}
    if len(fingerprints) > 1:
        raise GrainsError(
            f"the profiles were built for different weights ({', '.join(sorted(fingerprints))}); "
            "fix: mix profiles of the same model"
        )
    recipe = [{"profile": profile.name, "weight": weight, "alpha": profile.alpha} for profile, weight in weighted]
    terms = " + ".join(f"{weight:g}·{profile.name}" for profile, weight in weighted)
    return Profile(
        name=name,
        vectors=vectors,
        layers=sorted({layer for profile, _ in weighted for layer in profile.layers}),
        alpha=1.0,
        method="mix",
        metadata={
            "recipe": json.dumps(recipe),
            "fingerprint": next(iter(fingerprints), ""),
            "model": next((p.metadata["model"] for p, _ in weighted if p.metadata.get("model")), ""),
            "description": f"mix: {terms}",
        },
    )


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


def read_vectors(path: Path) -> tuple[dict[str, str], np.ndarray]:
    """(metadata, vectors [num_layers, hidden] float32) of a profile file, or a one-line error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            if "vectors" not in handle.keys():  # noqa: SIM118 (a safe_open handle has no __contains__)
                raise GrainsError(f"{path} holds no 'vectors' tensor, so it is not a grains-edge profile; {REBUILD}")
            vectors = handle.get_tensor("vectors")
    except (OSError, ValueError, TypeError, KeyError, OverflowError, SafetensorError) as error:
        raise GrainsError(f"cannot read profile {path} ({error}); {REBUILD}") from None
    if vectors.ndim != 2 or vectors.dtype.kind != "f" or 0 in vectors.shape:
        raise GrainsError(
            f"profile {path} has vectors of shape {vectors.shape} {vectors.dtype}, not [layers, hidden] floats; "
            f"{REBUILD}"
        )
    if not np.isfinite(vectors).all():
        raise GrainsError(f"profile {path} has NaN or infinite vectors; {REBUILD}")
    return metadata, vectors.astype(np.float32)


def parse_layers_field(text: str, num_layers: int, path: Path) -> list[int]:
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        layers = None
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise GrainsError(
            f"profile {path} names layers '{text}', not a list of 0 to {num_layers - 1}; "
            f"fix: re-tune it with 'grains-edge tune' or rebuild it with 'grains-edge vectors'"
        )
    return layers


def load_profile(name_or_path: str) -> Profile:
    path = resolve(name_or_path)
    metadata, vectors = read_vectors(path)
    layers = parse_layers_field(metadata.get("layers", ""), vectors.shape[0], path)
    try:
        alpha = float(metadata.get("alpha", "1.0"))
    except ValueError:
        alpha = math.nan
    if not math.isfinite(alpha):
        raise GrainsError(f"profile {path} has strength alpha '{metadata.get('alpha')}'; {REBUILD}")
    return Profile(
        name=metadata.get("name") or path.stem,
        vectors=vectors,
        layers=layers,
        alpha=alpha,
        method=metadata.get("method", "unknown"),
        metadata=metadata,
        path=path,
    )


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
