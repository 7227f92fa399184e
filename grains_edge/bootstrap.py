"""First run: build whatever the chat needs that is not there yet, with progress shown."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from grains_edge import paths
from grains_edge.errors import GrainsError
from grains_edge.manifest import MANIFEST_NAME, Manifest
from grains_edge.models import DEFAULT_MODEL

DEFAULT_EXPORT_NAME = "smollm2-135m-instruct"


def export_dir_for(model_spec: str, quantize: str = "none") -> Path:
    """The export folder of a model spec: itself if it already is an export, else one under exports_dir()
    (suffixed with the quantization, e.g. smollm2-135m-instruct-int4)."""
    given = Path(model_spec).expanduser()
    if (given / MANIFEST_NAME).is_file():
        return given
    suffix = "" if quantize == "none" else f"-{quantize}"
    if model_spec == DEFAULT_MODEL:
        return paths.exports_dir() / f"{DEFAULT_EXPORT_NAME}{suffix}"
    slug = re.sub(r"[^a-z0-9]+", "-", given.name.lower()).strip("-") or "model"
    key = str(given.resolve()) if given.exists() else model_spec
    return paths.exports_dir() / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}{suffix}"


def ensure_export(model_spec: str, quantize: str = "none") -> Path:
    """Return a verified export of `model_spec` (weights `quantize`d: none, int8, int4), exporting it first
    if there is none. An export folder is used as it is."""
    target = export_dir_for(model_spec, quantize)
    if target == Path(model_spec).expanduser() and quantize != "none":
        existing = json.loads((target / MANIFEST_NAME).read_text()).get("quantization", "none")
        if existing != quantize:
            raise GrainsError(
                f"{target} is an export with {existing} weights, not {quantize}; "
                "fix: drop --quantize, or pass the source model with --model"
            )
    if Manifest.is_current(target):
        return target
    from filelock import FileLock, Timeout

    from grains_edge.export.onnx_export import export, log

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(target.with_name(target.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:  # a second chat started on first run: wait for the first one's build and use it
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
    from grains_edge.profiles import BUILTIN_DIR

    if model_spec != DEFAULT_MODEL and export_dir_for(model_spec) != export_dir_for(DEFAULT_MODEL):
        return []
    return sorted(BUILTIN_DIR.glob("*.safetensors"))
