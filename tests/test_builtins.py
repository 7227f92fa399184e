"""`grains-edge builtins`: every recipe is two runnable commands on data shipped with the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from grains_edge.cli import main
from grains_edge.commands.builtins import RECIPES, commands


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_is_vectors_then_tune_on_shipped_data(name, tmp_path) -> None:
    vectors, tune = commands(name, tmp_path)
    recipe = RECIPES[name]
    assert vectors[0] == "vectors" and tune[0] == "tune"
    data = Path(vectors[vectors.index("--data") + 1])
    assert data.is_file() and tune[tune.index("--data") + 1] == str(data)
    profile = str(tmp_path / f"{name}.safetensors")
    assert vectors[vectors.index("--out") + 1] == profile == tune[tune.index("--profile") + 1]
    assert vectors[vectors.index("--limit") + 1] == str(recipe["limit"])
    assert ("--ig-steps" in vectors) == ("ig_steps" in recipe)
    assert ("--mmlu" in tune) == (recipe["task"] == "ab")


def test_overrides_replace_the_sweep(tmp_path) -> None:
    tune = commands("truthful", tmp_path, alphas="0.5", windows="1-2")[1]
    assert tune[tune.index("--alphas") + 1] == "0.5" and tune[tune.index("--windows") + 1] == "1-2"


def test_print_shows_the_commands_without_running_them(tmp_path, capsys) -> None:
    assert main(["builtins", "--print", "--only", "no-sycophancy", "--out-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["vectors", "tune"]
    assert not list(tmp_path.iterdir())
