import json
import tempfile
from pathlib import Path

from grains_edge import paths
from grains_edge.cli import main
from grains_edge.commands import tune
from grains_edge.evaluate.datasets import select
from grains_edge.layers import parse_layers
from grains_edge.steer.profiles import load_profile


def test_user_errors_are_one_line_without_traceback(capsys, tmp_path):
    assert main(["export", "--model", "no/such/thing/here", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grains-edge: error: model not found") and "fix:" in err[0]
    assert main(["eval", "truthfulqa", "--data", str(tmp_path / "missing.json"), "--model", str(tmp_path)]) == 2


def test_vectors_then_eval_through_the_cli(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}?", "preferred": "Yes, thank you!", "dispreferred": "Paris."} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "mine.safetensors"
    code = main(
        [
            "vectors",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--method",
            "grains",
            "--out",
            str(out),
            "--layers",
            "1-2",
            "--ig-steps",
            "4",
            "--k",
            "2",
            "--split",
            "all",
        ]
    )
    assert code == 0
    profile = load_profile(str(out))
    assert profile.layers == [1, 2] and profile.method == "grains" and "12 pairs" in profile.metadata["source"]
    capsys.readouterr()
    ab = tmp_path / "ab.json"
    ab.write_text(
        json.dumps(
            [
                {
                    "question": "Question 1?\n\nChoices:\n(A) Yes, thank you!\n(B) Paris.",
                    "answer_matching_behavior": "(A)",
                    "answer_not_matching_behavior": "(B)",
                }
            ]
        )
    )
    assert (
        main(
            [
                "eval",
                "ab",
                "--data",
                str(ab),
                "--model",
                str(tiny_model_dir),
                "--profile",
                str(out),
                "--alpha",
                "0.5",
                "--split",
                "all",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["profile"] == "mine" and result["alpha"] == 0.5 and result["items"] == 1


def tune_arguments(tmp_path, tiny_model_dir) -> list[str]:
    """A mean-diff profile of the tiny model on 60 A/B rows, and the `tune` command line for it."""
    data = tmp_path / "ab.json"
    rows = [
        {
            "question": f"Question {i}?\n\nChoices:\n(A) Yes, thank you!\n(B) Paris.",
            "answer_matching_behavior": "(A)",
            "answer_not_matching_behavior": "(B)",
        }
        for i in range(60)
    ]
    data.write_text(json.dumps(rows))
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("\n".join(json.dumps({"instruction": f"Say hello {i}", "response": "Hello!"}) for i in range(60)))
    profile = tmp_path / "p.safetensors"
    vectors = ["vectors", "--model", str(tiny_model_dir), "--data", str(data), "--method", "mean-diff"]
    assert main([*vectors, "--out", str(profile)]) == 0
    return [
        "tune",
        "--model",
        str(tiny_model_dir),
        "--profile",
        str(profile),
        "--task",
        "ab",
        "--data",
        str(data),
        "--ppl-data",
        str(dolly),
        "--alphas",
        "0.01,0.03",
        "--windows",
        "1-2;all",
    ]


def test_tune_writes_the_chosen_layers_alpha_and_sweep_into_the_profile(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(tune, "PPL_BUDGET", float("inf"))  # every setting admissible: the bracket's top is reached
    arguments = tune_arguments(tmp_path, tiny_model_dir)
    assert main(arguments) == 0
    tuned = load_profile(arguments[arguments.index("--profile") + 1])
    report = json.loads(tuned.metadata["tuning"])
    assert len(report["sweep"]) == 4 and report["unsteered"]["ppl"] > 0  # 2 layer sets x 2 strengths
    assert report["ppl_items"] == 60 - len(select(list(range(60)), "report", lambda i: f"Say hello {i}"))
    chosen = report["chosen"]
    assert chosen["alpha"] == 0.03 and all(0.01 <= row["alpha"] <= 0.03 for row in report["sweep"])
    assert tuned.alpha == chosen["alpha"] and tuned.layers == parse_layers(chosen["layers"], 4)
    assert chosen["cv_behaviour"] == max(report["cv_by_layer_set"].values())


def test_tune_with_no_admissible_setting_says_so_and_keeps_the_profile_as_built(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    monkeypatch.setattr(tune, "PPL_BUDGET", -1.0)  # no perplexity passes
    arguments = tune_arguments(tmp_path, tiny_model_dir)
    built = load_profile(arguments[arguments.index("--profile") + 1])
    assert built.alpha == 0.02  # the default strength: in units of the hidden-state norm
    assert main(arguments) == 0
    tuned = load_profile(arguments[arguments.index("--profile") + 1])
    assert json.loads(tuned.metadata["tuning"])["chosen"] is None
    assert tuned.alpha == built.alpha and tuned.layers == built.layers
    assert "no setting passed the capability check" in capsys.readouterr().err


def crash_in_export(monkeypatch, error: BaseException) -> None:
    def run(args):
        raise error

    monkeypatch.setattr("grains_edge.commands.export.run", run)


def test_an_unexpected_error_is_one_line_and_its_traceback_goes_to_a_log(monkeypatch, capsys, tmp_path):
    crash_in_export(monkeypatch, ZeroDivisionError("division by zero\nsecond line"))
    assert main(["export", "--out", str(tmp_path / "x")]) == 70
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grains-edge: internal error: ZeroDivisionError: division by zero;")
    log = Path(err[0].split("full traceback in ")[1])
    assert log.parent == paths.home() / "logs"
    assert "Traceback" in log.read_text() and "in run" in log.read_text() and "second line" in log.read_text()


def test_the_traceback_goes_to_the_temp_folder_when_the_home_is_not_writable(monkeypatch, capsys, tmp_path):
    (tmp_path / "home").write_text("a file, not a folder")
    monkeypatch.setenv("GRAINS_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    crash_in_export(monkeypatch, RuntimeError("boom"))
    assert main(["export", "--out", str(tmp_path / "x")]) == 70
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and Path(err[0].split("full traceback in ")[1]).parent.parent == tmp_path / "tmp"


def test_an_interrupt_is_130_without_a_log(monkeypatch, capsys, tmp_path):
    crash_in_export(monkeypatch, KeyboardInterrupt())
    assert main(["export", "--out", str(tmp_path / "x")]) == 130
    assert capsys.readouterr().err.strip() == "grains-edge: interrupted"
    assert not (paths.home() / "logs").exists()
