import json

from grains_edge import paths
from grains_edge.bootstrap import ensure_export, export_dir_for


def test_default_export_lives_under_the_home_folder():
    assert export_dir_for("default") == paths.exports_dir() / "smollm2-135m-instruct"


def test_an_export_folder_is_used_as_it_is(tiny_export):
    assert export_dir_for(str(tiny_export)) == tiny_export


def test_builds_once_then_reuses_and_rebuilds_a_stale_export(tiny_model_dir):
    target = ensure_export(str(tiny_model_dir))
    assert target.parent == paths.exports_dir()
    manifest = target / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert ensure_export(str(tiny_model_dir)) == target and manifest.stat().st_mtime_ns == stamp
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "format_version": 1}))
    ensure_export(str(tiny_model_dir))
    assert json.loads(manifest.read_text())["format_version"] == data["format_version"]
