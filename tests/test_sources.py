"""Loading a model: every unreadable or inconsistent model folder or GGUF is one GrainsError naming it."""

import json
import os
import shutil

import pytest

from grains_edge.cli import main
from grains_edge.errors import GrainsError
from grains_edge.model import sources


def edit_config(**changes):
    def damage(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    return damage


def cut(name: str):
    def damage(folder):
        (folder / name).write_bytes((folder / name).read_bytes()[:1000])

    return damage


DAMAGES = {
    "model_type unknown": (edit_config(model_type="foo"), "cannot read the config .*model type `foo`"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{"), "cannot read the config"),
    "weights truncated": (cut("model.safetensors"), "cannot read the weights"),
    "weights missing": (lambda f: (f / "model.safetensors").unlink(), "cannot read the weights"),
    "more layers than weights": (edit_config(num_hidden_layers=6, n_layer=6), "do not fit its config \\(\\d+ missing"),
    "tokenizer.json garbage": (lambda f: (f / "tokenizer.json").write_text("garbage{"), "cannot read the tokenizer"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_a_damaged_model_folder_is_one_line_naming_the_part(tiny_model_dir, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    apply, message = DAMAGES[damage]
    apply(folder)
    with pytest.raises(GrainsError, match=f"{message}.*fix:"):
        sources.load(str(folder))


@pytest.mark.parametrize(
    "content", [b"", os.urandom(4096), b"GGUF" + os.urandom(4096)], ids=["empty", "random", "magic"]
)
def test_a_file_that_is_not_a_gguf_is_one_line_through_the_cli(tmp_path, capsys, content):
    (tmp_path / "model.gguf").write_bytes(content)
    assert main(["export", "--model", str(tmp_path / "model.gguf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("grains-edge: error: cannot read the config of model") and "fix:" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no output, no staging left
