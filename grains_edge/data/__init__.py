"""Data files shipped with grains-edge (sources and licenses in README.md beside this file)."""

from pathlib import Path

DATA_DIR = Path(__file__).parent


def data_file(name: str) -> Path:
    """Path of a shipped data file, e.g. data_file("caa/refusal_generate.json")."""
    return DATA_DIR / name
