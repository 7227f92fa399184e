"""`grains-edge chat` and `grains-edge ask` on a FakeEngine: the export and model loading are stubbed."""

import io

import numpy as np
import pytest

from grains_edge.cli import main
from grains_edge.steer.profiles import save_profile
from tests.fake_engine import FakeEngine, fake_profile, plain_reply


@pytest.fixture
def engine(monkeypatch, tmp_path):
    fake = FakeEngine()
    fake.exports = []  # (model, quantize) of each export asked for

    def ensure_export(spec, quantize="none"):
        fake.exports.append((spec, quantize))
        return tmp_path / "export"

    monkeypatch.setattr("grains_edge.runtime.bootstrap.ensure_export", ensure_export)
    monkeypatch.setattr("grains_edge.runtime.bootstrap.ensure_builtin_profiles", lambda spec: None, raising=False)
    monkeypatch.setattr("grains_edge.runtime.engine.Engine", lambda path, device="auto": fake)
    return fake


def test_ask_streams_one_answer_to_stdout(engine, capsys):
    assert main(["ask", "What is the capital of France?", "--system", "Be brief.", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out == " ".join(plain_reply([], None).split()[:5]) + "\n"
    call = engine.calls[0]
    assert call.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert call.steering is None and call.settings.max_new_tokens == 5
    assert engine.exports == [("default", "none")]


def test_quantize_picks_the_quantized_export(engine, capsys):
    assert main(["ask", "Hi", "--quantize", "int4"]) == 0
    assert engine.exports == [("default", "int4")]


def test_ask_with_a_profile_and_strength(engine, capsys, tmp_path):
    path = save_profile(fake_profile("kind", 2, alpha=0.4), tmp_path / "kind.safetensors")
    assert main(["ask", "Hi", "--profile", str(path), "--alpha", "1.5"]) == 0
    expected = np.zeros_like(engine.calls[0].steering)
    expected[2] = 1.5
    np.testing.assert_allclose(engine.calls[0].steering, expected)


def test_chat_without_the_tui_reads_stdin(engine, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me about Paris\n"))
    assert main(["chat", "--no-tui"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France")
    assert engine.calls[0].messages == [{"role": "user", "content": "Tell me about Paris\n"}]


def test_chat_opens_the_tui_with_the_options(engine, monkeypatch):
    opened = {}
    monkeypatch.setattr("grains_edge.tui.app.run_chat", lambda *args, **options: opened.update(args=args, **options))
    assert main(["chat", "--profile", "kind", "--alpha", "0.3", "--resume", "--temperature", "0.7"]) == 0
    assert opened["args"] == (engine, "kind", 0.3, True)
    assert opened["settings"].temperature == 0.7 and opened["system_prompt"] == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ask", "Hi", "--alpha", "2"], "--alpha sets a profile's strength"),
        (["ask", "   "], "the prompt is empty"),
        (["ask", "Hi", "--top-p", "0"], "--top-p"),
        (["ask", "Hi", "--profile", "no-such-profile"], "unknown profile 'no-such-profile'"),
    ],
)
def test_bad_input_is_one_line(engine, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_ask_prints_control_characters_as_visible_stand_ins(engine, capsys):
    engine.reply = lambda messages, steering: "wipe\x1b[2J retitle\x1b]0;pwned\x07 csi\x9b31m done"
    assert main(["ask", "Hi"]) == 0
    out = capsys.readouterr().out
    assert out == "wipe␛[2J retitle␛]0;pwned␇ csi␛[31m done\n"


async def quit_at_once(pilot) -> None:
    await pilot.press("ctrl+q")


@pytest.mark.parametrize(("crash", "code"), [(False, 0), (True, 1)])
def test_the_chat_exits_non_zero_when_the_app_crashed(engine, monkeypatch, tmp_path, capsys, crash, code):
    from textual.app import App

    from grains_edge.tui.app import ChatApp

    monkeypatch.setenv("GRAINS_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(ChatApp, "run", lambda app: App.run(app, headless=True, auto_pilot=quit_at_once))
    if crash:
        engine.provider = None  # the status bar fails on start: an unhandled error inside the app
    assert main(["chat"]) == code


def test_the_chat_names_a_fallback_history_on_stderr(engine, monkeypatch, tmp_path, capsys):
    from textual.app import App

    from grains_edge.tui.app import ChatApp

    home = tmp_path / "home"
    home.mkdir()
    (home / "chat.sqlite3").write_bytes(b"not a database at all")
    monkeypatch.setenv("GRAINS_EDGE_HOME", str(home))
    monkeypatch.setattr(ChatApp, "run", lambda app: App.run(app, headless=True, auto_pilot=quit_at_once))
    assert main(["chat"]) == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "chat.sqlite3" in line and "chat-1.sqlite3" in line and "kept untouched" in line
