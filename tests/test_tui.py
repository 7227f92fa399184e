"""The chat app driven by Textual's pilot on a FakeEngine: no model, a few seconds in all."""

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from textual import events
from textual.widgets import Input, Label, Switch, TextArea

from grains_edge import paths
from grains_edge.steer.profiles import steering_tensor
from grains_edge.store.conversations import ConversationStore
from grains_edge.tui.app import ChatApp
from grains_edge.tui.screens import HelpScreen, HistoryScreen, MixScreen, SettingsScreen, SystemPromptScreen
from grains_edge.tui.widgets import Answer, AnswerPair, Composer, ProfileList, UserMessage
from tests.fake_engine import PROFILES, FakeEngine, fake_app, plain_reply, type_and_send

pytestmark = pytest.mark.anyio
TRUTHFUL = PROFILES[0]
SIZE = (110, 36)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def status(app: ChatApp, name: str) -> str:
    return str(app.query_one(f"#status-{name}", Label).content)


async def pick_profile(pilot, name: str) -> None:
    """Tab to the profile list, walk to `name` with the arrow keys, enter."""
    options = pilot.app.query_one(ProfileList)
    options.focus()
    await pilot.press("home")
    while options.highlighted_option.id != name:
        await pilot.press("down")
    await pilot.press("enter")
    await pilot.pause()


# Seconds per fake token for replies a test interrupts: the 256 max tokens take 13 s, so a slow first render
# cannot let the reply finish before the test presses escape or ctrl+q (both tests act at the first words).
SLOW = 0.05


async def until(pilot, condition: Callable[[], object], seconds: float = 10.0) -> None:
    """Let the app run until condition() holds; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the app never reached the expected state"
        await pilot.pause(0.01)


def recorded_notes(app: ChatApp) -> list[str]:
    notes = []
    app.notify = lambda message, **options: notes.append(message)
    return notes


async def test_a_message_gets_a_streamed_markdown_reply(tmp_path):
    app, engine = fake_app(tmp_path / "chat.sqlite3")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"Hello there", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert [m.source for m in app.query(UserMessage)] == ["Hello there"]
        (answer,) = app.query(Answer)
        assert answer.source == plain_reply([], None)
        assert answer.query("MarkdownParagraph")  # rendered as Markdown
        assert str(answer.border_title) == "unsteered" and "40.0 tok/s" in str(answer.border_subtitle)
        assert engine.calls[0].messages == [{"role": "user", "content": "Hello there"}]
        assert engine.calls[0].steering is None
        assert status(app, "speed") == "40.0 tok/s" and status(app, "context") == "ctx 24/2048"
        assert app.query_one(Composer).text == ""


async def test_a_profile_switch_steers_the_next_reply_without_reload(tmp_path):
    app, engine = fake_app(tmp_path / "chat.sqlite3")
    notes = recorded_notes(app)
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "one")
        await pick_profile(pilot, "truthful")
        assert status(app, "steering") == "profile truthful α0.60"
        assert app.focused is app.query_one(Composer)  # picked: back to writing
        assert "switched in" in notes[-1] and "ms" in notes[-1] and "not reloaded" in notes[-1]
        await type_and_send(pilot, "two")
        app.query_one(ProfileList).focus()
        await pilot.press("plus", "plus")  # on the profile list: α +0.10
        assert status(app, "steering") == "profile truthful α0.70"
        app.query_one(Composer).focus()
        await pilot.press("ctrl+down")
        await type_and_send(pilot, "three")
        await pick_profile(pilot, "none")
        await type_and_send(pilot, "four")
        titles = [str(answer.border_title) for answer in app.query(Answer)]
        assert titles == ["unsteered", "truthful α0.60", "truthful α0.65", "unsteered"]
    steerings = [call.steering for call in engine.calls]
    assert steerings[0] is None and steerings[3] is None
    np.testing.assert_allclose(steerings[1], steering_tensor(TRUTHFUL, 0.6))
    np.testing.assert_allclose(steerings[2], steering_tensor(TRUTHFUL, 0.65))


async def test_mixing_two_profiles_adds_their_steering(tmp_path):
    app, engine = fake_app(tmp_path / "chat.sqlite3", profile="truthful")
    async with app.run_test(size=SIZE) as pilot:
        options = app.query_one(ProfileList)
        options.focus()
        options.highlighted = [option.id for option in options.options].index("concise")
        await pilot.press("m")
        assert isinstance(app.screen, MixScreen)
        app.screen.query_one(Input).value = "0.3"
        await pilot.press("enter")
        await pilot.pause()
        assert status(app, "steering") == "profile truthful α0.60 + concise α0.30"
        await type_and_send(pilot, "mixed")
        options.focus()
        await pilot.press("m")  # again on the mixed-in profile: removed
        assert status(app, "steering") == "profile truthful α0.60"
    expected = steering_tensor(TRUTHFUL, 0.6) + steering_tensor(PROFILES[1], 0.3)
    np.testing.assert_allclose(engine.calls[0].steering, expected)


async def test_escape_stops_the_reply_and_keeps_what_was_shown(tmp_path):
    long_reply = " ".join(f"word{i}" for i in range(400))
    app, engine = fake_app(tmp_path / "chat.sqlite3", FakeEngine(lambda m, s: long_reply, delay=SLOW))
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(Composer).insert("Talk for a long time")
        await pilot.press("enter")
        await until(pilot, lambda: app.turn is not None and len(app.turn.lanes[0].reply.text) >= 20)
        answer = app.query_one(Answer)
        await pilot.press("escape")
        await app.workers.wait_for_complete()
        await pilot.pause()
        shown = answer.source
        assert 0 < len(shown) < len(long_reply) and "stopped" in str(answer.border_subtitle)
        assert engine.last_stats.stopped_by == "user"
        stored = app.store.messages(app.conversation.id)[-1]
        assert (stored.content, stored.complete) == (shown, True)


async def test_quitting_mid_reply_saves_it(tmp_path):
    long_reply = " ".join(f"word{i}" for i in range(400))
    app, _ = fake_app(tmp_path / "chat.sqlite3", FakeEngine(lambda m, s: long_reply, delay=SLOW))
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(Composer).insert("Talk")
        await pilot.press("enter")
        await until(pilot, lambda: app.turn is not None and app.turn.lanes[0].reply.text)
        await pilot.press("ctrl+q")
    reopened = ConversationStore(tmp_path / "chat.sqlite3")
    answer = reopened.messages(reopened.latest().id)[-1]
    assert answer.complete and answer.content and len(answer.content) < len(long_reply)


async def test_conversations_persist_across_restarts(tmp_path):
    db = paths.db_path()  # under the test's own GRAINS_EDGE_HOME
    app, _ = fake_app(db, profile="truthful")
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "first question")
        await type_and_send(pilot, "second question")
    app, engine = fake_app(db, resume=True)
    async with app.run_test(size=SIZE) as pilot:
        assert [m.source for m in app.query(UserMessage)] == ["first question", "second question"]
        assert [str(a.border_title) for a in app.query(Answer)] == ["truthful α0.60"] * 2
        assert app.sub_title == "first question"
        await type_and_send(pilot, "third")
    roles = [m["role"] for m in engine.calls[0].messages]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    app, _ = fake_app(db)  # without --resume: a fresh conversation
    async with app.run_test(size=SIZE):
        assert not app.query(UserMessage) and app.conversation is None


async def test_an_interrupted_answer_is_marked_on_reopening(tmp_path):
    store = ConversationStore(tmp_path / "chat.sqlite3")
    conversation = store.create_conversation("m", title="cut off")
    store.add_message(conversation.id, "user", "Hi")
    store.add_message(conversation.id, "assistant", "Half an ans", profile="truthful", alpha=0.6, complete=False)
    app, _ = fake_app(tmp_path / "chat.sqlite3", resume=True)
    async with app.run_test(size=SIZE):
        answer = app.query_one(Answer)
        assert (answer.source, str(answer.border_subtitle)) == ("Half an ans", "interrupted")


async def test_compare_mode_answers_side_by_side(tmp_path):
    app, engine = fake_app(tmp_path / "chat.sqlite3", profile="truthful")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+t")
        assert app.query_one("#compare-switch", Switch).value
        assert status(app, "compare") == "COMPARE vs none"
        await type_and_send(pilot, "Is the earth flat?")
        pair = app.query_one(AnswerPair)
        assert (str(pair.left.border_title), str(pair.right.border_title)) == ("unsteered", "truthful α0.60")
        assert pair.left.source == plain_reply([], None) and pair.right.source.startswith("Steered reply")
        roles = [m.role for m in app.store.messages(app.conversation.id)]
        assert roles == ["user", "compare", "assistant"]
        await pilot.press("ctrl+t")
        await type_and_send(pilot, "And the moon?")
        assert len(app.query(AnswerPair)) == 1 and len(app.query(Answer)) == 3
    assert engine.calls[0].steering is None
    np.testing.assert_allclose(engine.calls[1].steering, steering_tensor(TRUTHFUL, 0.6))
    assert [m["role"] for m in engine.calls[2].messages] == ["user", "assistant", "user"]  # no baseline
    assert engine.calls[2].messages[1]["content"] == plain_reply([], engine.calls[1].steering)


async def test_compare_against_another_profile(tmp_path):
    app, engine = fake_app(tmp_path / "chat.sqlite3", profile="truthful")
    async with app.run_test(size=SIZE) as pilot:
        options = app.query_one(ProfileList)
        options.focus()
        options.highlighted = [option.id for option in options.options].index("formal")
        await pilot.press("c")  # compare against formal: switches compare mode on
        assert app.compare and status(app, "compare") == "COMPARE vs formal α0.50"
        await type_and_send(pilot, "Hi")
    np.testing.assert_allclose(engine.calls[0].steering, steering_tensor(PROFILES[2], 0.5))


async def test_regenerate_answers_again_with_the_current_profile(tmp_path):
    app, engine = fake_app(tmp_path / "chat.sqlite3")
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "Question")
        await pick_profile(pilot, "truthful")
        await pilot.press("ctrl+r")
        await app.workers.wait_for_complete()
        await pilot.pause()
        (answer,) = app.query(Answer)
        assert str(answer.border_title) == "truthful α0.60"
        assert [m.role for m in app.store.messages(app.conversation.id)] == ["user", "assistant"]
    assert engine.calls[1].messages == engine.calls[0].messages
    np.testing.assert_allclose(engine.calls[1].steering, steering_tensor(TRUTHFUL, 0.6))


async def test_empty_messages_are_ignored(tmp_path):
    app, engine = fake_app(tmp_path / "chat.sqlite3")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter", "space", "ctrl+j", "enter")
        await pilot.pause()
        assert not app.query(UserMessage) and engine.calls == [] and app.conversation is None


async def test_newlines_unicode_and_resizing(tmp_path):
    app, engine = fake_app(tmp_path / "chat.sqlite3")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"line one", "ctrl+j", *"line two")
        assert app.query_one(Composer).text == "line one\nline two"
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        text = "Ça va? 日本語 🎉 مرحبا \u200b [bold]not markup[/] `code` \x1b[31m"
        await type_and_send(pilot, text)
        shown = "Ça va? 日本語 🎉 مرحبا \u200b [bold]not markup[/] `code` \u241b[31m"
        assert [m.source for m in app.query(UserMessage)] == ["line one\nline two", shown]
        assert app.query(UserMessage).last().typed == engine.calls[-1].messages[-1]["content"] == text
        for size in [(30, 10), (160, 50)]:
            await pilot.resize_terminal(*size)
            await pilot.pause()
        assert app.query(Answer)


async def test_a_huge_paste_that_cannot_fit_comes_back_to_the_box(tmp_path):
    app, engine = fake_app(tmp_path / "chat.sqlite3")
    notes = recorded_notes(app)
    paste = "λ word " * 3000
    async with app.run_test(size=SIZE) as pilot:
        composer = app.query_one(Composer)
        app.post_message(events.Paste(paste))  # as the terminal driver delivers it
        await pilot.pause()
        assert composer.text == paste
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "the model's context is 2048" in notes[-1]
        assert not app.query(UserMessage) and not app.query(Answer)
        assert app.store.messages(app.conversation.id) == []
        assert composer.text == paste  # back in the box, nothing lost
        composer.clear()
        await type_and_send(pilot, "short one")
        assert [m.source for m in app.query(UserMessage)] == ["short one"]


async def test_a_full_context_drops_the_oldest_turns(tmp_path):
    app, engine = fake_app(tmp_path / "chat.sqlite3", FakeEngine(max_context=100))
    notes = recorded_notes(app)
    app.settings.max_new_tokens = 20
    async with app.run_test(size=SIZE) as pilot:
        for index in range(4):
            await type_and_send(pilot, f"message {index} " + "padding " * 10)
        assert any("oldest" in note for note in notes)
    last = engine.calls[-1].messages
    assert last[-1]["content"].startswith("message 3") and last[0]["role"] == "user"
    assert len(last) < 7


async def test_settings_modal_changes_the_next_reply(tmp_path):
    app, engine = fake_app(tmp_path / "chat.sqlite3")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#max-tokens", Input).value = "zero"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)  # refused, with the reason shown
        assert "max-tokens" in str(app.screen.query_one("#settings-error", Label).content)
        values = {"max-tokens": "3", "temperature": "0.7", "top-p": "0.9", "seed": "7", "repetition-penalty": "1.2"}
        for name, value in values.items():
            app.screen.query_one(f"#{name}", Input).value = value
        app.screen.query_one("#seed", Input).focus()
        await pilot.press("enter")  # enter in any field saves too
        await pilot.pause()
        assert not isinstance(app.screen, SettingsScreen)
        await type_and_send(pilot, "Hi")
        assert "3 tokens" in str(app.query_one(Answer).border_subtitle)
        assert "max tokens" in str(app.query_one(Answer).border_subtitle)
    settings = engine.calls[0].settings
    assert (settings.max_new_tokens, settings.temperature, settings.top_p, settings.seed) == (3, 0.7, 0.9, 7)
    assert settings.repetition_penalty == 1.2


async def test_system_prompt_is_sent_and_stored(tmp_path):
    app, engine = fake_app(tmp_path / "chat.sqlite3")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        assert isinstance(app.screen, SystemPromptScreen)
        app.screen.query_one(TextArea).text = "Answer like a pirate."
        await pilot.press("ctrl+s")
        await type_and_send(pilot, "Hi")
        assert app.store.conversation(app.conversation.id).system_prompt == "Answer like a pirate."
    assert engine.calls[0].messages[0] == {"role": "system", "content": "Answer like a pirate."}


async def test_copy_the_last_answer(tmp_path):
    app, _ = fake_app(tmp_path / "chat.sqlite3")
    copied = []
    app.copy_to_clipboard = copied.append
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "Hi")
        await pilot.press("ctrl+y")  # a priority key: works while the message box has focus
    assert copied == [plain_reply([], None)]


async def test_history_reopens_a_past_conversation_and_new_starts_over(tmp_path):
    app, _ = fake_app(tmp_path / "chat.sqlite3")
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "about cats")
        await pilot.press("ctrl+n")
        assert not app.query(UserMessage) and app.conversation is None
        await type_and_send(pilot, "about dogs")
        await pilot.press("ctrl+o")
        assert isinstance(app.screen, HistoryScreen)
        await pilot.press("down", "enter")
        await pilot.pause()
        assert [m.source for m in app.query(UserMessage)] == ["about cats"]
        assert app.sub_title == "about cats"
        await pilot.press("ctrl+o", "home", "d")  # the most recent, "about dogs": deleted
        await pilot.press("home", "d", "escape")  # "about cats" is open: refused
        assert [c.title for c in app.store.conversations()] == ["about cats"]


async def test_help_and_command_palette_list_the_actions(tmp_path):
    app, _ = fake_app(tmp_path / "chat.sqlite3")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        titles = [command.title for command in app.get_system_commands(app.screen)]
        for title in ("Compare", "Regenerate", "Stop", "History", "Settings", "Steer: none", "Steer: truthful"):
            assert title in titles


async def test_a_profile_for_another_model_is_refused(tmp_path):
    app, _ = fake_app(tmp_path / "chat.sqlite3")
    notes = recorded_notes(app)
    other = PROFILES[0].__class__("huge", np.ones((30, 576), np.float32), [3], 1.0, "grains")
    app.library.profiles["huge"] = other
    async with app.run_test(size=SIZE):
        app.select_profile("huge")
        assert "another model" in notes[-1] and app.steering.profile is None


async def test_a_failing_engine_is_reported_not_fatal(tmp_path):
    class Broken(FakeEngine):
        def generate(self, *args, **kwargs):
            raise RuntimeError("ONNX Runtime fell over")

    app, _ = fake_app(tmp_path / "chat.sqlite3", Broken())
    notes = recorded_notes(app)
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "Hi")
        assert notes[-1] == "RuntimeError: ONNX Runtime fell over"
        assert app.turn is None and app.query_one(Composer).text == "Hi"


# ---- terminal safety and a history that can't be written -------------------------------------------

HOSTILE = "clear\x1b[2J title\x1b]0;pwned\x07 csi\x9b31m [bold]markup[/bold] del\x7f"
SHOWN = "clear␛[2J title␛]0;pwned␇ csi␛[31m [bold]markup[/bold] del␡"
RAW = ("\x1b", "\x07", "\x9b", "\x7f")


def screen_text(app: ChatApp) -> str:
    """Every character drawn on the screen (the SVG screenshot holds each cell's text)."""
    return app.export_screenshot()


async def test_hostile_history_replays_as_visible_stand_ins(tmp_path):
    path = tmp_path / "chat.sqlite3"
    store = ConversationStore(path)
    conversation = store.create_conversation("m", title="title\x1b]0;pwned\x07")
    store.add_message(conversation.id, "user", HOSTILE)
    store.add_message(conversation.id, "assistant", HOSTILE, profile="evil\x1b[2J", alpha=0.5)
    store.close()
    app, _ = fake_app(path, resume=True)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        (user,) = app.query(UserMessage)
        (answer,) = app.query(Answer)
        assert user.source == answer.source == SHOWN and user.typed == HOSTILE
        assert str(answer.border_title) == "evil␛[2J α0.50" and app.sub_title == "title␛]0;pwned␇"
        drawn = screen_text(app)
        assert "␛[2J" in drawn and "[bold]markup[/bold]" in drawn  # literal text, not markup
        assert not any(character in drawn for character in RAW)


async def test_hostile_model_pieces_are_shown_as_stand_ins_and_stored_as_they_came(tmp_path):
    app, _ = fake_app(tmp_path / "chat.sqlite3", FakeEngine(lambda m, s: HOSTILE))
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "say something nasty")
        (answer,) = app.query(Answer)
        assert answer.source == SHOWN and not any(character in screen_text(app) for character in RAW)
        assert app.store.messages(app.conversation.id)[-1].content == HOSTILE  # the record is faithful


async def test_a_damaged_history_opens_a_fresh_one_and_says_so(tmp_path):
    path = tmp_path / "chat.sqlite3"
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 32)
    before = path.read_bytes()
    app, _ = fake_app(path)
    async with app.run_test(size=SIZE) as pilot:
        notice = status(app, "history")
        assert "chat-1.sqlite3" in notice and str(path) in notice
        await type_and_send(pilot, "Hello")
        assert app.query(Answer) and app.store.path.name == "chat-1.sqlite3"
    assert path.read_bytes() == before
    assert [m.content for m in ConversationStore(tmp_path / "chat-1.sqlite3").messages(1)][0] == "Hello"


async def test_a_read_only_history_opens_read_only_and_a_send_keeps_the_typed_text(tmp_path, monkeypatch):
    path = tmp_path / "chat.sqlite3"
    ConversationStore(path).close()
    writable = os.access
    monkeypatch.setattr("os.access", lambda where, mode: writable(where, mode) and where != path)  # root ignores chmod
    app, engine = fake_app(path)
    notes = recorded_notes(app)
    async with app.run_test(size=SIZE) as pilot:
        assert "read-only" in status(app, "history") and "sending is off" in status(app, "history")
        await type_and_send(pilot, "Please keep me")
        assert app.query_one(Composer).text == "Please keep me" and not app.query(UserMessage)
        assert engine.calls == [] and "read-only" in notes[-1] and "\n" not in notes[-1]


async def test_a_locked_history_mid_reply_stops_the_reply_and_keeps_what_was_shown(tmp_path, monkeypatch):
    monkeypatch.setattr("grains_edge.store.conversations.BUSY_SECONDS", 0.05)
    long_reply = " ".join(f"word{i}" for i in range(400))
    app, _ = fake_app(tmp_path / "chat.sqlite3", FakeEngine(lambda m, s: long_reply, delay=SLOW))
    notes = recorded_notes(app)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(Composer).insert("Talk")
        await pilot.press("enter")
        await until(pilot, lambda: app.turn is not None and len(app.turn.lanes[0].reply.text) >= 20)
        other = sqlite3.connect(tmp_path / "chat.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another program takes the write lock mid-reply
        await app.workers.wait_for_complete()
        await pilot.pause()
        other.execute("ROLLBACK")
        answer = app.query_one(Answer)
        stored = app.store.messages(app.conversation.id)[-1]
        assert answer.source == stored.content and 0 < len(stored.content) < len(long_reply)
        assert "locked" in notes[-1] and str(answer.border_subtitle) == "failed"


async def test_a_paste_and_a_stored_system_prompt_are_drawn_with_stand_ins(tmp_path):
    path = tmp_path / "chat.sqlite3"
    store = ConversationStore(path)
    conversation = store.create_conversation("m", system_prompt=HOSTILE)
    store.add_message(conversation.id, "user", "hi")
    store.close()
    app, _ = fake_app(path, resume=True)
    async with app.run_test(size=SIZE) as pilot:
        composer = app.query_one(Composer)
        composer.insert("keep ")
        composer.post_message(events.Paste(HOSTILE))
        await pilot.pause()
        assert composer.text == "keep " + SHOWN and not any(character in screen_text(app) for character in RAW)
        await pilot.press("f2")
        assert app.screen.query_one(TextArea).text == SHOWN
        assert not any(character in screen_text(app) for character in RAW)


async def test_a_model_without_a_chat_template_says_so_in_the_status_bar(tmp_path):
    plain = FakeEngine()
    plain.has_chat_template = False
    for engine, shown in ((FakeEngine(), False), (plain, True)):
        app, _ = fake_app(tmp_path / "chat.sqlite3", engine)
        async with app.run_test(size=SIZE):
            assert ("plain prompt" in status(app, "model")) is shown


async def test_profile_warnings_are_notifications_shown_once(tmp_path):
    app, _ = fake_app(tmp_path / "chat.sqlite3")
    app.library.fingerprint = "these-weights"
    TRUTHFUL.metadata["fingerprint"] = "other-weights"
    try:
        async with app.run_test(size=SIZE) as pilot:
            notes = recorded_notes(app)
            app.library.warn = app.warn_once  # as on_mount sets it, now that notify is recorded
            await pick_profile(pilot, "truthful")
            await pick_profile(pilot, "truthful")
            for _ in range(2):  # α 100: far outside the [0, 6] the profile's default 0.6 implies
                app.library.tensor(replace(app.steering, alpha=100.0))
    finally:
        del TRUTHFUL.metadata["fingerprint"]
    assert [note for note in notes if "other weights" in note] == [notes[0]]
    assert sum("far outside" in note for note in notes) == 1
