"""Where grains-edge keeps what it builds and what the user makes ($GRAINS_EDGE_HOME overrides), and its
build cache ($GRAINS_EDGE_CACHE overrides)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    override = os.environ.get("GRAINS_EDGE_HOME")
    return Path(override).expanduser() if override else Path(platformdirs.user_data_dir("grains-edge"))


def profiles_dir() -> Path:
    return home() / "profiles"


def exports_dir() -> Path:
    return home() / "exports"


def db_path() -> Path:
    return home() / "chat.sqlite3"


def cache_dir() -> Path:
    """Rebuildable artefacts (compiled kernels): the platform's cache folder."""
    override = os.environ.get("GRAINS_EDGE_CACHE")
    return Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("grains-edge"))
