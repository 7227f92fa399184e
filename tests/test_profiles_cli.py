"""`grains-edge profiles …`, and profiles meeting `ask` on a FakeEngine: refusals are one line, warnings once."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import save_file

from grains_edge import paths
from grains_edge.cli import main
from grains_edge.export.manifest import Manifest
from grains_edge.steer import profiles
from grains_edge.steer.profiles import BUILTIN_DIR, combine, load_profile, save_profile, steering_tensor
from tests.fake_engine import HIDDEN, LAYERS, FakeEngine, fake_profile


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(profiles.warn_once, "shown", set())


@pytest.fixture
def engine(monkeypatch, tmp_path):
    fake = FakeEngine()
    fake.manifest.weights_fingerprint = "aaaa"
    monkeypatch.setattr(
        "grains_edge.runtime.bootstrap.ensure_export", lambda spec, quantize="none": tmp_path / "export"
    )
    monkeypatch.setattr("grains_edge.runtime.bootstrap.ensure_builtin_profiles", lambda spec: None, raising=False)
    monkeypatch.setattr("grains_edge.runtime.engine.Engine", lambda path, device="auto": fake)
    return fake


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "--profile", "kind", "--alpha", "nan"],
        ["ask", "Hi", "--profile", "kind", "--alpha", "inf"],
        ["eval", "ab", "--data", "d.json", "--alpha", "nan"],
        ["vectors", "--data", "d.json", "--out", "x", "--alpha=-inf"],
        ["tune", "--profile", "p", "--task", "ab", "--data", "d", "--ppl-data", "d", "--alphas", "0.01,nan"],
        ["profiles", "import", "f.gguf", "--alpha", "nan"],
        ["profiles", "mix", "new", "--term", "truthful=inf"],
    ],
)
def test_a_non_finite_alpha_is_refused_by_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "is not a finite number" in one_line_error(capsys)


def write_profile(path, vectors, **metadata):
    save_file({"vectors": vectors}, str(path), metadata={"layers": "1", "alpha": "0.5", **metadata})
    return str(path)


@pytest.mark.parametrize(
    ("vectors", "metadata", "problem"),
    [
        (np.full((LAYERS, HIDDEN), np.nan, np.float32), {}, "NaN or infinite vectors"),
        (np.ones((LAYERS, HIDDEN), np.float32), {"layers": "1,40"}, "names layers '1,40'"),
        (np.ones((LAYERS, HIDDEN), np.float32), {"alpha": "nan"}, "alpha 'nan'"),
        (np.ones((LAYERS, HIDDEN * 2), np.float32), {}, "built for another model"),
    ],
)
def test_ask_refuses_a_profile_that_cannot_steer_in_one_line(engine, capsys, tmp_path, vectors, metadata, problem):
    path = write_profile(tmp_path / "p.safetensors", vectors, **metadata)
    assert main(["ask", "Hi", "--profile", path]) == 2
    assert problem in one_line_error(capsys) and not engine.calls


def test_ask_warns_once_about_other_weights_and_far_strengths_then_answers(engine, capsys, tmp_path):
    path = save_profile(replace(fake_profile("kind", 2), metadata={"fingerprint": "bbbb"}), tmp_path / "k.safetensors")
    assert main(["ask", "Hi", "--profile", str(path), "--alpha", "1e6"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 2 and "fingerprint bbbb, this model aaaa" in err and "far outside" in err
    np.testing.assert_allclose(engine.calls[0].steering, steering_tensor(load_profile(str(path)), 1e6))


def test_list_and_show(capsys):
    save_profile(fake_profile("kind", 2), paths.profiles_dir() / "kind.safetensors")
    assert main(["profiles", "list"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["kind"] == ["kind", "grains", "2", "0.5", "user", "-"]
    truthful = load_profile("truthful")
    tuning = json.loads(truthful.metadata["tuning"])
    assert rows["truthful"][3:] == [f"{truthful.alpha:g}", "built-in", "3c5fdee91060c09a"]
    assert main(["profiles", "show", "truthful"]) == 0
    shown = capsys.readouterr().out
    alphas = sorted(row["alpha"] for row in tuning["sweep"])
    assert f"tuned range [{alphas[0]:g}, {alphas[-1]:g}]" in shown and f"α scored: {alphas[0]:g} to" in shown
    assert f"{tuning['items']} scored items, {tuning['ppl_items']} perplexity items" in shown
    assert f"chosen: layers {tuning['chosen']['layers']}, α {truthful.alpha:.4g}" in shown
    assert "fingerprint: 3c5fdee91060c09a" in shown


def test_list_names_a_damaged_user_profile_instead_of_hiding_it(capsys):
    paths.profiles_dir().mkdir(parents=True)
    (paths.profiles_dir() / "broken.safetensors").write_bytes(b"\x00" * 3)
    assert main(["profiles", "list"]) == 0
    assert "skipped: cannot read profile" in capsys.readouterr().out


def test_rm_deletes_only_user_profiles_it_can_prove_it_made(capsys, tmp_path):
    save_profile(fake_profile("kind", 2), paths.profiles_dir() / "kind.safetensors")
    assert main(["profiles", "rm", "kind"]) == 0
    assert not (paths.profiles_dir() / "kind.safetensors").exists()
    (paths.profiles_dir() / "notes.safetensors").write_text("mine")
    outside = save_profile(fake_profile("far", 1), tmp_path / "far.safetensors")
    (paths.profiles_dir() / "link.safetensors").symlink_to(outside)
    capsys.readouterr()
    for name, problem in [
        ("truthful", "is built in and cannot be removed"),
        ("notes", "is not a profile grains-edge wrote"),
        ("link", "is not a profile grains-edge wrote"),
        ("../far", "is not a profile name"),
        (str(outside), "is not a profile name"),
        ("ghost", "is not a user profile"),
    ]:
        assert main(["profiles", "rm", name]) == 2
        assert problem in one_line_error(capsys)
    assert (paths.profiles_dir() / "notes.safetensors").read_text() == "mine" and outside.exists()
    assert (BUILTIN_DIR / "truthful.safetensors").exists()


def test_mix_saves_the_sum_and_never_overwrites_silently(capsys):
    assert main(["profiles", "mix", "both", "--term", "truthful=1", "--term", "no-sycophancy=-0.5"]) == 0
    both = load_profile("both")
    truthful, sycophancy = load_profile("truthful"), load_profile("no-sycophancy")
    expected = combine([(truthful, truthful.alpha), (sycophancy, -0.5 * sycophancy.alpha)])
    np.testing.assert_allclose(steering_tensor(both), expected, rtol=1e-6)
    assert both.method == "mix" and both.alpha == 1.0 and both.layers == sorted({*truthful.layers, *sycophancy.layers})
    assert [term["weight"] for term in json.loads(both.metadata["recipe"])] == [1.0, -0.5]
    capsys.readouterr()
    assert main(["profiles", "mix", "both", "--term", "truthful=2"]) == 2
    assert "exists" in one_line_error(capsys)
    assert main(["profiles", "mix", "truthful", "--term", "truthful=2"]) == 2
    assert "is a built-in profile" in one_line_error(capsys)
    assert main(["profiles", "mix", "both", "--term", "truthful=2", "--force"]) == 0
    np.testing.assert_allclose(
        steering_tensor(load_profile("both")), steering_tensor(truthful, 2 * truthful.alpha), rtol=1e-6
    )
    assert main(["profiles", "mix", "truthful", "--term", "truthful=2", "--force"]) == 0
    assert "shadows the built-in" in capsys.readouterr().out
    assert load_profile("truthful").method == "mix" and (BUILTIN_DIR / "truthful.safetensors").exists()


def test_mix_refuses_a_bad_term(capsys):
    with pytest.raises(SystemExit):
        main(["profiles", "mix", "odd", "--term", "truthful"])
    assert "is not PROFILE=WEIGHT" in one_line_error(capsys)


def fake_export(folder, num_layers=30, hidden=576, fingerprint="3c5fdee91060c09a"):
    """A manifest is all that import reads of an export."""
    folder.mkdir()
    Manifest("default", "llama", num_layers, hidden, 9, 3, 64, 49152, 8192, [], [], [], 17, fingerprint, {}).save(
        folder / "manifest.json"
    )
    return str(folder)


def test_export_then_import_through_the_command_line(capsys, tmp_path):
    model = fake_export(tmp_path / "export")
    out = tmp_path / "truthful.gguf"
    assert main(["profiles", "export", "truthful", str(out), "--model-hint", "llama"]) == 0
    assert f"--control-vector-scaled {out} {load_profile('truthful').alpha:g}" in capsys.readouterr().out
    assert main(["profiles", "export", "truthful", str(out), "--model-hint", "llama"]) == 2
    assert "exists" in one_line_error(capsys)
    assert main(["profiles", "import", str(out), "--name", "moved", "--model", model]) == 0
    moved, truthful = load_profile("moved"), load_profile("truthful")
    np.testing.assert_array_equal(moved.vectors, truthful.vectors)
    assert (moved.layers, moved.alpha, moved.metadata["tuning"]) == (
        truthful.layers,
        truthful.alpha,
        truthful.metadata["tuning"],
    )
    assert main(["profiles", "import", str(out), "--name", "moved", "--model", model]) == 2
    assert "exists" in one_line_error(capsys)


def test_import_warns_about_other_weights_and_refuses_another_shape(capsys, tmp_path):
    out = tmp_path / "truthful.gguf"
    assert main(["profiles", "export", "truthful", str(out), "--model-hint", "llama"]) == 0
    other = fake_export(tmp_path / "other", fingerprint="ffff")
    assert main(["profiles", "import", str(out), "--name", "t2", "--model", other]) == 0
    assert "fingerprint 3c5fdee91060c09a, this model ffff" in capsys.readouterr().err
    narrow = fake_export(tmp_path / "narrow", hidden=64)
    assert main(["profiles", "import", str(out), "--name", "t3", "--model", narrow]) == 2
    assert "not [64]" in one_line_error(capsys)


def test_listing_profiles_does_not_load_torch():
    code = "import sys; from grains_edge.cli import main; main(['profiles', 'list']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("False")
