"""The exported graph: its inputs, its renormalization ops, and parity with PyTorch."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM

from grains_edge.errors import GrainsError
from grains_edge.export import graph_io, ownership
from grains_edge.export.manifest import Manifest
from grains_edge.export.onnx_export import export
from grains_edge.model import sources
from grains_edge.model.hooks import steering_hooks


def test_manifest_describes_the_graph(tiny_export):
    manifest = Manifest.load(tiny_export)
    assert manifest.steered_layers == [1, 2]
    assert manifest.num_layers == 4 and manifest.hidden_size == 64
    fixed = ["input_ids", "attention_mask", "position_ids", "steering", "logits_to_keep"]
    assert manifest.input_names == [*fixed, *graph_io.past_names(4)]
    assert manifest.output_names == ["logits", *graph_io.present_names(4)]
    checks = manifest.verification
    assert checks["zero"] < 1e-3 and checks["steered"] < 1e-3 and checks["steering_effect_correlation"] > 0.99
    assert len(manifest.weights_fingerprint) == 16 and "onnxruntime" in manifest.versions
    assert json.loads((tiny_export / "manifest.json").read_text())["opset"] == manifest.opset


def test_graph_has_steering_input_and_renormalization_per_steered_layer(tiny_export):
    graph = onnx.load(str(tiny_export / "model.onnx"), load_external_data=False).graph
    steering = next(i for i in graph.input if i.name == "steering")
    dims = [d.dim_value or d.dim_param for d in steering.type.tensor_type.shape.dim]
    assert dims[1:] == [4, 64]
    ops = [node.op_type for node in graph.node]
    # per steered layer 1/rms(h) over (h+s)/rms(h+s): one Div each, which the model itself does not have
    assert ops.count("Div") == 2 and ops.count("Split") >= 1


def run_ort(export_dir, feeds):
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    manifest = Manifest.load(export_dir)
    batch = feeds["input_ids"].shape[0]
    past = feeds.pop("past", None)
    if past is None:
        empty = np.zeros((batch, manifest.num_kv_heads, 0, manifest.head_dim), np.float32)
        past = [empty] * (2 * manifest.num_layers)
    feeds.setdefault("logits_to_keep", np.zeros(1, np.int64))
    feeds.update(zip(graph_io.past_names(manifest.num_layers), past, strict=True))
    return session.run(None, feeds)


def test_ort_matches_pytorch_with_different_profiles_per_row(tiny_export):
    model = AutoModelForCausalLM.from_pretrained(Manifest.load(tiny_export).source_model)
    model.eval()
    ids = np.random.default_rng(0).integers(0, 200, (3, 8))
    mask = np.ones((3, 8), np.int64)
    mask[2, 6:] = 0  # right padding: a shorter third row
    positions = np.arange(8)[None].repeat(3, 0)
    steering = np.zeros((3, 4, 64), np.float32)
    steering[0, 1] = 5.0
    steering[1, 2] = -3.0  # row 2 unsteered
    logits = run_ort(
        tiny_export,
        {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "steering": steering},
    )[0]
    with torch.no_grad(), steering_hooks(model, torch.from_numpy(steering), [1, 2]):
        reference = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
        ).logits.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits[valid], reference[valid], atol=1e-4, rtol=1e-4)
    assert not np.allclose(logits[0], logits[1])


def test_cached_steps_equal_full_sequence_logits(tiny_export):
    ids = np.random.default_rng(1).integers(0, 200, (1, 6))
    steering = np.full((1, 4, 64), 2.0, np.float32)
    full = run_ort(
        tiny_export,
        {
            "input_ids": ids,
            "attention_mask": np.ones((1, 6), np.int64),
            "position_ids": np.arange(6)[None],
            "steering": steering,
        },
    )[0]
    past, steps = None, []
    for t in range(6):
        feeds = {
            "input_ids": ids[:, t : t + 1],
            "attention_mask": np.ones((1, t + 1), np.int64),
            "position_ids": np.array([[t]]),
            "steering": steering,
        }
        if past is not None:
            feeds["past"] = past
        logits, *past = run_ort(tiny_export, feeds)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep", [1, 3, 8, 20])
def test_logits_to_keep_gives_the_last_positions_and_the_same_cache(tiny_export, keep):
    rng = np.random.default_rng(2)
    feeds = {
        "input_ids": rng.integers(0, 200, (2, 8)),
        "attention_mask": np.ones((2, 8), np.int64),
        "position_ids": np.arange(8)[None].repeat(2, 0),
        "steering": rng.normal(0, 2, (2, 4, 64)).astype(np.float32),
    }
    full, *full_cache = run_ort(tiny_export, dict(feeds))
    kept, *kept_cache = run_ort(tiny_export, {**feeds, "logits_to_keep": np.array([keep])})
    assert full.shape[1] == 8 and kept.shape[1] == min(keep, 8)
    np.testing.assert_allclose(kept, full[:, -kept.shape[1] :], atol=1e-5, rtol=1e-5)
    for a, b in zip(full_cache, kept_cache, strict=True):
        np.testing.assert_array_equal(a, b)


def test_unsupported_architecture_is_a_clear_error(tmp_path, tiny_tokenizer):
    from transformers import BertConfig, BertLMHeadModel

    BertLMHeadModel(
        BertConfig(
            vocab_size=300,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            is_decoder=True,
        )
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(GrainsError, match="unsupported architecture 'bert'; supported: llama, mistral, .*, gpt2"):
        export(str(tmp_path / "bert"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]  # no output, no staging folder


def test_refuses_to_overwrite_a_folder_that_is_not_an_export(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(GrainsError, match="not an export"):
        export("default", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized_export_keeps_float_steering(tmp_path, tiny_model_dir, bits):
    manifest = export(str(tiny_model_dir), tmp_path / bits, layers_spec="1-2", quantize=bits, kernels="stock")
    assert manifest.quantization == bits
    ops = [node.op_type for node in onnx.load(str(tmp_path / bits / "model.onnx"), load_external_data=False).graph.node]
    block_sums = 4 * 4 if bits == "int4" else 0  # int4's Q4_1 layers: + a block-sum MatMulNBits each (stock kernels)
    assert "MatMul" not in ops and ops.count("MatMulNBits") == 4 * 4 + 1 + block_sums  # 4 per layer, the LM head
    assert ops.count("Div") == 2  # the renormalization (one Div per steered layer) stays float
    assert manifest.verification["steering_effect_correlation"] > 0.5


def no_model_load(monkeypatch):
    """A bad --out must be refused before the model loads (a minute for a large one)."""

    def refuse(spec):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(sources, "load", refuse)


@pytest.mark.parametrize(
    "files",
    [
        {"manifest.json": '{"name": "my app", "start_url": "/"}', "index.html": "<html></html>"},
        {"manifest.json": "{}", "model.onnx": "not ours"},
    ],
)
def test_refuses_a_folder_holding_a_manifest_json_it_did_not_write(tmp_path, monkeypatch, files):
    no_model_load(monkeypatch)
    (tmp_path / "app").mkdir()
    for name, text in files.items():
        (tmp_path / "app" / name).write_text(text)
    with pytest.raises(GrainsError, match="did not write.*fix:"):
        export("default", tmp_path / "app")
    assert {p.name: p.read_text() for p in (tmp_path / "app").iterdir()} == files


def test_refuses_an_out_that_is_a_file_or_cannot_be_written_before_loading(tmp_path, monkeypatch):
    no_model_load(monkeypatch)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(GrainsError, match="is a file; fix:"):
        export("default", tmp_path / "file")
    with pytest.raises(GrainsError, match="cannot create a folder beside .*fix: choose a writable --out"):
        export("default", tmp_path / "file" / "out")
    assert (tmp_path / "file").read_text() == "mine" and sorted(tmp_path.iterdir()) == [tmp_path / "file"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="a read-only folder binds no root")
def test_refuses_an_out_in_a_read_only_folder_before_loading(tmp_path, monkeypatch):
    no_model_load(monkeypatch)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        with pytest.raises(GrainsError, match="cannot create a folder beside .*fix: choose a writable --out"):
            export("default", tmp_path / "ro" / "out")
    finally:
        (tmp_path / "ro").chmod(0o700)


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def fake_staging(out_dir, pid: int, marker: bool):
    """A staging folder as an export killed mid-write leaves it."""
    staging = out_dir.with_name(f"{out_dir.name}.partial-{pid}-abcdef")
    staging.mkdir()
    (staging / "model.onnx.data").write_bytes(b"\0" * 1000)
    if marker:
        record = {"format": ownership.STAGING_FORMAT, "pid": pid, "host": socket.gethostname()}
        (staging / ownership.STAGING_MARKER_NAME).write_text(json.dumps(record))
    return staging


def test_replaces_its_own_export_and_removes_what_killed_exports_left(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    export(str(tiny_model_dir), out, layers_spec="1")
    marker = json.loads((out / ownership.MARKER_NAME).read_text())
    assert marker["files"] == {p.name: p.stat().st_size for p in out.iterdir() if p.name != ownership.MARKER_NAME}
    killed = fake_staging(out, dead_pid(), marker=True)
    running = fake_staging(out, os.getpid(), marker=True)
    unproven = fake_staging(out, dead_pid() + 1, marker=False)
    export(str(tiny_model_dir), out, layers_spec="2")
    assert Manifest.load(out).steered_layers == [2] and ownership.has_valid_marker(out)
    assert not killed.exists() and running.exists() and unproven.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", running.name, unproven.name])


def test_replaces_an_export_of_an_earlier_version_without_a_marker(tiny_export, tiny_model_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_export, old)
    (old / ownership.MARKER_NAME).unlink()
    assert ownership.is_our_export(old)
    export(str(tiny_model_dir), old, layers_spec="none")
    assert Manifest.load(old).steered_layers == [] and ownership.has_valid_marker(old)
