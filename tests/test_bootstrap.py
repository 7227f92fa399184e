import json
import threading

import pytest

from grains_edge import paths
from grains_edge.bootstrap import ensure_export, export_dir_for
from grains_edge.errors import GrainsError


def test_default_export_lives_under_the_home_folder():
    assert export_dir_for("default") == paths.exports_dir() / "smollm2-135m-instruct"
    assert export_dir_for("default", "int4") == paths.exports_dir() / "smollm2-135m-instruct-int4"


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
    assert not list(target.parent.glob("*.partial*"))
