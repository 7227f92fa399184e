"""First run: build whatever the chat needs that is not there yet, with progress shown."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from grains_edge import paths
from grains_edge.errors import GrainsError
from grains_edge.export.manifest import MANIFEST_NAME, Manifest
from grains_edge.locking import BuildLock
from grains_edge.model.sources import DEFAULT_MODEL

DEFAULT_EXPORT_NAME = "smollm2-135m-instruct"


def is_export_folder(given: Path) -> bool:
    """A folder passed to use as an export: it has a manifest.json and no config.json (which every model
    folder has and no export has); it is never exported into."""
    return given.is_dir() and (given / MANIFEST_NAME).is_file() and not (given / "config.json").exists()


def export_dir_for(model_spec: str, quantize: str = "none") -> Path:
    """The export folder of a model spec: itself if it is an export folder, else one under exports_dir()
    (suffixed with the quantization, e.g. smollm2-135m-instruct-int4)."""
    given = Path(model_spec).expanduser()
    if is_export_folder(given):
        return given
    suffix = "" if quantize == "none" else f"-{quantize}"
    if model_spec == DEFAULT_MODEL:
        return paths.exports_dir() / f"{DEFAULT_EXPORT_NAME}{suffix}"
    slug = re.sub(r"[^a-z0-9]+", "-", given.name.lower()).strip("-") or "model"
    key = str(given.resolve()) if given.exists() else model_spec
    return paths.exports_dir() / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}{suffix}"


def ensure_export(model_spec: str, quantize: str = "none") -> Path:
    """Return a verified export of `model_spec` (weights `quantize`d: none, int8, int4), exporting it first
    if there is none. An export folder is used as it is (a stale or damaged one is an error, never rebuilt)."""
    target = export_dir_for(model_spec, quantize)
    if is_export_folder(Path(model_spec).expanduser()):
        existing = Manifest.load(target).quantization
        if quantize not in ("none", existing):
            raise GrainsError(
                f"{target} is an export with {existing} weights, not {quantize}; "
                "fix: drop --quantize, or pass the source model with --model"
            )
        return target
    if Manifest.is_current(target):
        return target
    from grains_edge.export.onnx_export import export, log

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GrainsError(
            f"cannot create {target.parent} ({error}); fix: set GRAINS_EDGE_HOME to a writable folder"
        ) from error
    lock = BuildLock(target.with_name(target.name + ".lock"))
    if not lock.acquire(blocking=False):  # a second chat started on first run: wait for the first one's build
        log(f"another grains-edge process is building {target}; waiting for it …")
        lock.acquire()
    try:
        if not Manifest.is_current(target):
            kind = "" if quantize == "none" else f"{quantize} "
            log(f"no usable {kind}export of '{model_spec}' yet, building it in {target} (under a minute)")
            export(model_spec, target, quantize=quantize)
    finally:
        lock.release()
    return target


def ensure_builtin_profiles(model_spec: str) -> list[Path]:
    """The built-in profiles usable with `model_spec`: they ship in the package for the default model
    (rebuild them with `grains-edge builtins`); other models get none, and the chat lists user profiles."""
    from grains_edge.steer.profiles import BUILTIN_DIR

    if model_spec != DEFAULT_MODEL and export_dir_for(model_spec) != export_dir_for(DEFAULT_MODEL):
        return []
    return sorted(BUILTIN_DIR.glob("*.safetensors"))
