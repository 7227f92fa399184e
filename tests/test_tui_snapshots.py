"""Screenshots of the main screens on the FakeEngine, compared with tests/__snapshots__ (pytest-textual-snapshot).

After a deliberate change of the look: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from tests.fake_engine import fake_app, type_and_send

SIZE = (110, 32)


def still(pilot) -> None:
    pilot.app.query_one("#composer").cursor_blink = False


def test_chat_with_a_reply(snap_compare, tmp_path):
    app, _ = fake_app(tmp_path / "chat.sqlite3", profile="truthful")

    async def run_before(pilot):
        still(pilot)
        await type_and_send(pilot, "What is the capital of France?")

    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)


def test_compare_mode(snap_compare, tmp_path):
    app, _ = fake_app(tmp_path / "chat.sqlite3", profile="truthful")

    async def run_before(pilot):
        still(pilot)
        await pilot.press("ctrl+t")
        await type_and_send(pilot, "What is the capital of France?")

    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)


def test_help(snap_compare, tmp_path):
    app, _ = fake_app(tmp_path / "chat.sqlite3")
    assert snap_compare(app, press=["f1"], run_before=still, terminal_size=SIZE)
