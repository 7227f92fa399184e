"""bench/report.py: a benchmark's JSON is written whole, never with a non-finite number, with its machine."""

import json

import pytest
from report import machine, publish


def test_a_result_is_printed_and_written_whole(tmp_path, capsys):
    out = tmp_path / "results" / "speed.json"
    publish({"tokens_per_second": 41.5, "machine": machine()}, out)
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
    assert [p.name for p in out.parent.iterdir()] == ["speed.json"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_number_is_refused_and_nothing_is_written(tmp_path, bad):
    out = tmp_path / "speed.json"
    out.write_text('{"tokens_per_second": 40.0}\n')
    with pytest.raises(ValueError):
        publish({"tokens_per_second": bad}, out)
    assert json.loads(out.read_text()) == {"tokens_per_second": 40.0}


def test_the_machine_names_its_cpu_and_cores():
    found = machine()
    assert found["cpu"] and found["cpu_count"] >= 1
    assert set(found["simd"]) <= {
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx512_bf16",
        "avx_vnni",
        "amx_tile",
        "amx_int8",
    }
