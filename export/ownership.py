"""Which folders grains-edge made, so it deletes or replaces only those.

An export folder is ours when it holds a valid marker (`.grains-edge-export.json`, written last, listing
every other file of the folder with its size) and nothing else. Exports of earlier versions have no marker:
they count as ours when they hold only the files an export writes and a manifest.json that parses as one.
A staging folder (`OUT.partial-PID-XXXXXX`) is ours when it holds a staging marker naming its process and
host, written the moment the folder is created; one whose process is gone is removed by the next export.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from grains_edge.errors import GrainsError
from grains_edge.export.manifest import MANIFEST_NAME, required_fields

MARKER_NAME = ".grains-edge-export.json"
MARKER_FORMAT = "grains-edge export marker 1"
STAGING_MARKER_NAME = ".grains-edge-staging.json"
STAGING_FORMAT = "grains-edge staging marker 1"
# what an export of an earlier version (no marker) may hold: the graph, the manifest and a tokenizer's files
LEGACY_EXPORT_FILES = frozenset(
    {
        "model.onnx",
        "model.onnx.data",
        MANIFEST_NAME,
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "chat_template.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
    }
)


def read_json(path: Path):
    """The parsed file, or None when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def regular_files(folder: Path) -> dict[str, int] | None:
    """Name -> size of every entry in `folder`, or None when one is not a regular file (a folder, a link)."""
    sizes = {}
    for entry in os.scandir(folder):
        if entry.is_symlink() or not entry.is_file():
            return None
        sizes[entry.name] = entry.stat().st_size
    return sizes


def write_marker(folder: Path) -> None:
    """Record the folder's files and sizes in its marker; call it last, when nothing else will be written."""
    files = regular_files(folder)
    if files is None:
        raise GrainsError(f"{folder} holds a folder or a link; fix: report this as a grains-edge bug")
    files.pop(MARKER_NAME, None)
    (folder / MARKER_NAME).write_text(json.dumps({"format": MARKER_FORMAT, "files": files}, indent=1) + "\n")


def has_valid_marker(folder: Path) -> bool:
    """The marker parses and lists exactly the folder's other files, with their sizes."""
    marker = read_json(folder / MARKER_NAME)
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return False
    files = regular_files(folder)
    if files is None or files.pop(MARKER_NAME, None) is None:
        return False
    return marker.get("files") == files


def is_legacy_export(folder: Path) -> bool:
    """An export of an earlier version: no marker, only export files, a manifest with a manifest's fields."""
    files = regular_files(folder)
    if files is None or not files.keys() <= LEGACY_EXPORT_FILES:
        return False
    manifest = read_json(folder / MANIFEST_NAME)
    return isinstance(manifest, dict) and required_fields() <= manifest.keys()


def is_our_export(folder: Path) -> bool:
    if not folder.is_dir() or folder.is_symlink():
        return False
    if (folder / MARKER_NAME).exists():
        return has_valid_marker(folder)
    return is_legacy_export(folder)


def check_replaceable(out_dir: Path) -> None:
    """Refuse, with the fix, an --out that is not new, empty or an export grains-edge made."""
    if out_dir.is_symlink():
        raise GrainsError(f"{out_dir} is a symbolic link; fix: pass the folder it points to, or a new --out folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise GrainsError(f"{out_dir} is a file; fix: choose a new or empty folder for --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_our_export(out_dir):
        raise GrainsError(
            f"{out_dir} holds files grains-edge did not write (it is not an export it made); "
            "fix: choose a new or empty --out folder, or empty this one yourself"
        )


def process_alive(pid: int) -> bool:
    """Whether `pid` runs on this host; on Windows always True (os.kill there would end the process)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_pattern(out_dir: Path) -> re.Pattern:
    return re.compile(re.escape(out_dir.name) + r"\.partial-(\d+)-[0-9a-f]{6}")


def is_dead_staging(folder: Path, pid: int) -> bool:
    """A staging folder of ours whose process (on this host) is gone."""
    marker = read_json(folder / STAGING_MARKER_NAME)
    if isinstance(marker, dict):
        ours = marker == {"format": STAGING_FORMAT, "pid": pid, "host": socket.gethostname()}
    else:  # the staging marker is dropped just before publishing; by then the export marker proves it
        ours = has_valid_marker(folder)
    return ours and not folder.is_symlink() and not process_alive(pid)


def remove_dead_staging(out_dir: Path) -> list[Path]:
    """Delete the staging folders of `out_dir` left by killed exports; returns what was removed."""
    pattern, removed = staging_pattern(out_dir), []
    if not out_dir.parent.is_dir():
        return removed
    for folder in out_dir.parent.iterdir():
        match = pattern.fullmatch(folder.name)
        if match and folder.is_dir() and is_dead_staging(folder, int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def new_staging(out_dir: Path) -> Path:
    """Create `out_dir`'s staging folder (a unique sibling) with its staging marker."""
    staging = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(3)}")
    staging.mkdir(parents=True)
    marker = {"format": STAGING_FORMAT, "pid": os.getpid(), "host": socket.gethostname()}
    try:
        (staging / STAGING_MARKER_NAME).write_text(json.dumps(marker) + "\n")
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def publish(staging: Path, out_dir: Path) -> None:
    """Mark the finished `staging` as an export and rename it to `out_dir`, replacing an export of ours there
    (renamed aside to a staging name first, so a crash at any point leaves either export whole, and the
    aside one is removed as a dead staging by its export marker)."""
    (staging / STAGING_MARKER_NAME).unlink()
    write_marker(staging)
    check_replaceable(out_dir)  # again: the user may have put files there during the export
    retired = None
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    elif out_dir.is_dir():
        if not has_valid_marker(out_dir):
            write_marker(out_dir)  # an export of an earlier version, proven ours by its content
        retired = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(3)}")
        os.replace(out_dir, retired)
    try:
        os.replace(staging, out_dir)
    except OSError:
        if retired is not None:
            os.replace(retired, out_dir)  # the old export back in place
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
