"""Which folders count as grains-edge's own: proven by the marker's listing, or by an old export's content."""

import json
import os
import shutil
import socket

import pytest

from grains_edge.errors import GrainsError
from grains_edge.export import ownership
from grains_edge.export.ownership import MARKER_NAME, is_our_export


def add_file(folder):
    (folder / "notes.txt").write_text("mine")


def grow_file(folder):
    with open(folder / "tokenizer.json", "a") as file:
        file.write(" ")


def add_folder(folder):
    (folder / "photos").mkdir()


def add_link(folder):
    (folder / "link").symlink_to(folder / "model.onnx")


def garble_marker(folder):
    (folder / MARKER_NAME).write_text("{")


@pytest.fixture
def marked(tiny_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    return folder


def test_a_fresh_export_is_ours_by_its_marker(marked):
    assert ownership.has_valid_marker(marked) and is_our_export(marked)
    ownership.check_replaceable(marked)


@pytest.mark.parametrize("change", [add_file, grow_file, add_folder, add_link, garble_marker])
def test_any_change_to_a_marked_export_makes_it_not_ours(marked, change):
    change(marked)
    assert not is_our_export(marked)
    with pytest.raises(GrainsError, match="did not write.*fix:"):
        ownership.check_replaceable(marked)


@pytest.mark.parametrize("change", [None, add_file, add_folder])
def test_an_export_without_a_marker_is_ours_only_with_export_files_and_a_manifest(marked, change):
    (marked / MARKER_NAME).unlink()
    if change:
        change(marked)
    assert is_our_export(marked) == (change is None)
    (marked / "manifest.json").write_text(json.dumps({"name": "an app"}))
    assert not is_our_export(marked)


def test_staging_is_removed_only_for_a_dead_process_on_this_host(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(ownership, "process_alive", lambda pid: pid == os.getpid())
    folders = {}
    for label, pid, host in [("dead", 11, None), ("alive", os.getpid(), None), ("elsewhere", 12, "other-host")]:
        folders[label] = out.with_name(f"out.partial-{pid}-00000{len(folders)}")
        folders[label].mkdir()
        record = {"format": ownership.STAGING_FORMAT, "pid": pid, "host": host or socket.gethostname()}
        (folders[label] / ownership.STAGING_MARKER_NAME).write_text(json.dumps(record))
    assert ownership.remove_dead_staging(out) == [folders["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f.name for f in (folders["alive"], folders["elsewhere"])
    )


def test_a_failed_publish_puts_the_old_export_back(marked, tmp_path, monkeypatch):
    before = {p.name: p.read_bytes() for p in marked.iterdir()}
    staging = ownership.new_staging(marked)
    (staging / "model.onnx").write_text("new")
    replace = os.replace

    def failing(source, target):
        if source == staging:
            raise OSError("disk gone")
        replace(source, target)

    monkeypatch.setattr(ownership.os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        ownership.publish(staging, marked)
    assert {p.name: p.read_bytes() for p in marked.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", staging.name])
