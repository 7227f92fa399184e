"""`grains-edge builtins`: every recipe is two runnable commands on data shipped with the package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from grains_edge.cli import main
from grains_edge.commands import tune
from grains_edge.commands.builtins import RECIPES, commands
from grains_edge.evaluate import frontier
from grains_edge.layers import parse_layers
from grains_edge.options import finite_floats
from grains_edge.steer.profiles import load_profile


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
    assert tune[tune.index("--limit") + 1] == str(recipe["tune_limit"])
    assert tune[tune.index("--ppl-limit") + 1] == str(recipe["ppl_limit"])
    assert "--alphas" not in tune  # tune's own bracket


def test_overrides_replace_the_search(tmp_path) -> None:
    tune = commands("truthful", tmp_path, alphas="0.02,0.5", windows="1-2")[1]
    assert tune[tune.index("--alphas") + 1] == "0.02,0.5" and tune[tune.index("--windows") + 1] == "1-2"


def test_print_shows_the_commands_without_running_them(tmp_path, capsys) -> None:
    assert main(["builtins", "--print", "--only", "no-sycophancy", "--out-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["vectors", "tune"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_ships_as_a_tuned_profile_for_the_default_model(name) -> None:
    profile = load_profile(name)
    recipe = RECIPES[name]
    assert profile.builtin and profile.name == name and profile.method == "grains"
    assert profile.vectors.shape == (30, 576) and np.isfinite(profile.vectors).all()  # SmolLM2-135M
    assert profile.metadata["description"] == recipe["description"]
    assert profile.metadata["source"].startswith(Path(recipe["data"]).name)
    assert f"{recipe['limit']} pairs" in profile.metadata["source"] and recipe["toward"] in profile.metadata["source"]
    tuning = json.loads(profile.metadata["tuning"])
    chosen = tuning["chosen"]
    assert chosen["admissible"] and chosen["alpha"] == profile.alpha
    assert profile.layers == parse_layers(chosen["layers"], 30)
    # tuned by the recipe's search: the sweep covers its layer sets, on its item counts, within tune's bracket
    assert {row["layers"] for row in tuning["sweep"]} == set(tune.layer_sets_of(recipe["windows"], 30))
    assert (tuning["items"], tuning["ppl_items"]) == (recipe["tune_limit"], recipe["ppl_limit"])
    low, high = finite_floats(tune.BRACKET)
    assert all(low * frontier.LOWER_FRACTION <= row["alpha"] <= high for row in tuning["sweep"])
    assert "/" not in profile.metadata["source"]  # no path of the machine that built it


def test_built_ins_share_one_model_fingerprint() -> None:
    assert len({load_profile(name).metadata["fingerprint"] for name in RECIPES}) == 1
