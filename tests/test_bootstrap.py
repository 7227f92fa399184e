import json
import shutil
import threading

import pytest

from grains_edge import paths
from grains_edge.errors import GrainsError
from grains_edge.export import ownership
from grains_edge.export.manifest import Manifest
from grains_edge.runtime.bootstrap import ensure_export, export_dir_for


def test_default_export_lives_under_the_home_folder():
    assert export_dir_for("default") == paths.exports_dir() / "smollm2-135m-instruct"
    assert export_dir_for("default", "int4") == paths.exports_dir() / "smollm2-135m-instruct-int4"


def test_an_export_folder_is_used_as_it_is(tiny_export):
    assert export_dir_for(str(tiny_export)) == tiny_export


def make_stale(export_dir, marked: bool) -> None:
    """Turn an export into one of an older format: with its marker (as a marker-writing version left it)
    or without (as versions before markers left it)."""
    manifest = export_dir / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 1}))
    if marked:
        ownership.write_marker(export_dir)
    else:
        (export_dir / ownership.MARKER_NAME).unlink()


@pytest.mark.parametrize("marked", [True, False])
def test_builds_once_then_reuses_and_rebuilds_a_stale_export(tiny_model_dir, marked):
    target = ensure_export(str(tiny_model_dir))
    assert target.parent == paths.exports_dir()
    manifest = target / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert ensure_export(str(tiny_model_dir)) == target and manifest.stat().st_mtime_ns == stamp
    format_version = json.loads(manifest.read_text())["format_version"]
    make_stale(target, marked)
    ensure_export(str(tiny_model_dir))
    assert json.loads(manifest.read_text())["format_version"] == format_version
    assert ownership.has_valid_marker(target)
    assert sorted(p.name for p in paths.exports_dir().iterdir()) == [target.name]  # no lock, no staging left


def test_a_stale_export_holding_a_users_file_is_not_replaced(tiny_model_dir):
    target = ensure_export(str(tiny_model_dir))
    make_stale(target, marked=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(GrainsError, match="did not write.*fix:"):
        ensure_export(str(tiny_model_dir))
    assert (target / "notes.txt").read_text() == "mine" and (target / "model.onnx").is_file()


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_model_folder_holding_a_manifest_json_is_exported_elsewhere_and_kept(tiny_model_dir, tmp_path):
    model = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "manifest.json").write_text(json.dumps({"name": "my notes on this model"}))
    before = snapshot(model)
    target = ensure_export(str(model))
    assert target.parent == paths.exports_dir() and Manifest.load(target).source_model == str(model)
    assert snapshot(model) == before


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [('{"name": "my app", "start_url": "/"}', "not a grains-edge manifest"), ('{"format_version": 7', "damaged")],
)
def test_a_folder_with_a_foreign_or_damaged_manifest_is_named_and_never_exported_into(tmp_path, manifest, problem):
    app = tmp_path / "app"
    app.mkdir()
    (app / "manifest.json").write_text(manifest)
    (app / "index.html").write_text("<html></html>")
    before = snapshot(app)
    with pytest.raises(GrainsError, match=f"{problem}.*fix:"):
        ensure_export(str(app))
    assert snapshot(app) == before and not paths.exports_dir().exists()


def test_a_quantized_export_is_built_beside_the_float_one(tiny_model_dir):
    float_dir, int8_dir = ensure_export(str(tiny_model_dir)), ensure_export(str(tiny_model_dir), "int8")
    assert int8_dir == float_dir.with_name(float_dir.name + "-int8")
    assert json.loads((int8_dir / "manifest.json").read_text())["quantization"] == "int8"
    assert ensure_export(str(int8_dir), "int8") == int8_dir  # an export folder of that kind is used as it is


def test_an_export_folder_of_another_kind_is_a_clear_error(tiny_export):
    with pytest.raises(GrainsError, match="fix: drop --quantize"):
        ensure_export(str(tiny_export), "int4")


def test_a_second_process_waits_for_the_first_build_and_uses_it(tiny_model_dir, capsys):
    from filelock import FileLock

    from grains_edge.export.onnx_export import export

    target = export_dir_for(str(tiny_model_dir))
    target.parent.mkdir(parents=True)
    other = FileLock(target.with_name(target.name + ".lock"))  # the first process, mid-build
    other.acquire()
    second = threading.Thread(target=ensure_export, args=(str(tiny_model_dir),))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive() and not target.exists()
    export(str(tiny_model_dir), target)  # the first process's build
    stamp = (target / "manifest.json").stat().st_mtime_ns
    other.release()
    second.join(timeout=60)
    assert not second.is_alive() and (target / "manifest.json").stat().st_mtime_ns == stamp
    assert "another grains-edge process is building" in capsys.readouterr().err
    assert not list(target.parent.glob("*.partial*")) and not list(target.parent.glob("*.lock"))
