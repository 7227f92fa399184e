import json

from grains_edge.cli import main
from grains_edge.profiles import load_profile


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
