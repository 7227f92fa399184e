"""What runs where: the providers a device asks for, the one line the engine prints about them, and
`--kernels auto` keeping CPU-only kernels out of exports for CUDA. This machine has no GPU, so ONNX Runtime's
provider list (and, for the engine, its session's providers) is faked."""

from __future__ import annotations

import shutil

import onnxruntime as ort
import pytest

from grains_edge import kernels
from grains_edge.devices import CPU, CUDA, choose_providers, device_notice
from grains_edge.errors import GrainsError
from grains_edge.export import onnx_export
from grains_edge.export.manifest import Manifest
from grains_edge.runtime import engine as engine_module
from grains_edge.runtime.engine import Engine
from grains_edge.runtime.protocol import GenerationSettings

CPU_ONLY = [CPU]
WITH_GPU = [CUDA, CPU]
HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


def test_a_device_asks_for_cuda_only_when_it_is_installed_and_not_refused():
    assert choose_providers("auto", WITH_GPU) == WITH_GPU
    assert choose_providers("cuda", WITH_GPU) == WITH_GPU
    assert choose_providers("cuda", CPU_ONLY) == CPU_ONLY
    assert choose_providers("cpu", WITH_GPU) == CPU_ONLY
    with pytest.raises(GrainsError, match="unknown device"):
        choose_providers("tpu", CPU_ONLY)


@pytest.mark.parametrize(
    ("device", "available", "active", "kernels", "says"),
    [
        ("cuda", CPU_ONLY, CPU, "stock", "onnxruntime-gpu is not installed"),
        ("auto", WITH_GPU, CPU, "fused", "could not start"),
        ("auto", WITH_GPU, CUDA, "stock", "attention runs on the CPU"),
        ("cuda", WITH_GPU, CUDA, "fused", "Q4_1MatMul, SteeredAdd"),
    ],
)
def test_each_place_a_session_runs_is_one_line(device, available, active, kernels, says):
    notice = device_notice(device, available, active, kernels)
    assert says in notice and "\n" not in notice
    assert ("--kernels stock" in notice) == (active == CUDA and kernels == "fused")


def test_a_session_where_it_was_asked_to_run_prints_nothing():
    assert device_notice("cpu", WITH_GPU, CPU, "fused") is None
    assert device_notice("cpu", CPU_ONLY, CPU, "stock") is None


def test_kernels_auto_leaves_exports_for_cuda_on_stock_kernels(monkeypatch, capsys):
    q4_1 = {"Q4_1"}  # a GGUF with Q4_1 weights: what grains-edge's kernel would take
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: None)  # as if they built here
    monkeypatch.setattr(ort, "get_available_providers", lambda: CPU_ONLY)
    assert onnx_export.use_custom_kernels("auto", q4_1)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(ort, "get_available_providers", lambda: WITH_GPU)
    assert not onnx_export.use_custom_kernels("auto", q4_1)
    assert "export is for CUDA" in capsys.readouterr().err
    assert onnx_export.use_custom_kernels("fused", q4_1)  # asked for by name: a CPU export made here
    assert not onnx_export.use_custom_kernels("stock", q4_1)


class ReportsCuda:
    """A CPU session that names CUDA as its first provider, as a session on a GPU does."""

    def __init__(self, session):
        self.session = session

    def get_providers(self) -> list[str]:
        return WITH_GPU

    def __getattr__(self, name):
        return getattr(self.session, name)


def greedy_text(engine: Engine) -> str:
    return "".join(engine.chat(HELLO, None, GenerationSettings(max_new_tokens=8)))


def notices(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("[grains-edge]")]


def test_the_engine_says_where_it_runs_in_one_line_and_answers_as_on_the_cpu(tiny_export, monkeypatch, capsys):
    on_cpu = greedy_text(Engine(tiny_export, device="cpu"))
    assert notices(capsys) == []
    monkeypatch.setattr(ort, "get_available_providers", lambda: WITH_GPU)
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):  # ONNX Runtime's own, about the fake
        fallback = Engine(tiny_export, device="auto")
    assert fallback.provider == CPU
    assert notices(capsys) == [f"[grains-edge] {device_notice('auto', WITH_GPU, CPU, 'stock')}"]
    assert greedy_text(fallback) == on_cpu
    real_open = engine_module.open_session
    monkeypatch.setattr(engine_module, "open_session", lambda *args: ReportsCuda(real_open(*args)))
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        on_cuda = Engine(tiny_export, device="cuda")
    assert on_cuda.provider == CUDA
    assert notices(capsys) == [f"[grains-edge] {device_notice('cuda', WITH_GPU, CUDA, 'stock')}"]
    assert greedy_text(on_cuda) == on_cpu


def test_a_fused_export_on_cuda_names_its_kernels(tiny_export, tmp_path, monkeypatch, capsys, needs_kernels):
    fused = tmp_path / "fused"
    shutil.copytree(tiny_export, fused)
    manifest = Manifest.load(fused)
    manifest.kernels = "fused"
    manifest.save(fused / "manifest.json")
    monkeypatch.setattr(ort, "get_available_providers", lambda: WITH_GPU)
    real_open = engine_module.open_session
    monkeypatch.setattr(engine_module, "open_session", lambda *args: ReportsCuda(real_open(*args)))
    capsys.readouterr()  # needs_kernels may have said it compiled them
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        Engine(fused, device="auto")
    (line,) = notices(capsys)
    assert "Q4_1MatMul" in line and "--kernels stock" in line
