import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grains_edge.errors import GrainsError
from grains_edge.store import conversations
from grains_edge.store.conversations import ConversationStore, HistoryError, open_store
from grains_edge.tui.app import message_widgets
from grains_edge.tui.generation import StoredReply

ROOT = os.geteuid() == 0  # root writes through file permissions: read-only files can't be made for it


def test_round_trip(tmp_path):
    store = ConversationStore(tmp_path / "chat.sqlite3")
    first = store.create_conversation("model-a", "Be brief.", title="first")
    second = store.create_conversation("model-a", title="second")
    store.add_message(first.id, "user", "Hello 👋 — ünïcode")
    answer = store.add_message(first.id, "assistant", "Hi!", profile="truthful", alpha=0.5)
    store.add_message(second.id, "user", "Other")
    store.add_message(first.id, "compare", "Hey.", profile="none")
    messages = store.messages(first.id)
    assert [(m.role, m.content) for m in messages] == [
        ("user", "Hello 👋 — ünïcode"),
        ("assistant", "Hi!"),
        ("compare", "Hey."),
    ]
    assert messages[1].id == answer and messages[1].profile == "truthful" and messages[1].alpha == 0.5
    assert all(m.complete for m in messages)
    assert store.latest().id == first.id  # the most recently active, not the most recently created
    assert [c.message_count for c in store.conversations()] == [3, 1]
    store.set_system_prompt(first.id, "Be kind.")
    assert (store.conversation(first.id).system_prompt, store.conversation(first.id).title) == ("Be kind.", "first")
    store.delete_messages([answer])
    assert [m.role for m in store.messages(first.id)] == ["user", "compare"]
    store.delete_conversation(first.id)
    assert store.messages(first.id) == [] and [c.id for c in store.conversations()] == [second.id]


def test_every_piece_is_on_disk_once_added(tmp_path):
    path = tmp_path / "chat.sqlite3"
    store = ConversationStore(path)
    conversation = store.create_conversation("m")
    reply = StoredReply(store, store.add_message(conversation.id, "assistant", complete=False))
    reader = ConversationStore(path)  # another connection, as after a crash
    for piece, seen in [("Partial", "Partial"), (" answer", "Partial answer"), (" \x1b[2J", "Partial answer \x1b[2J")]:
        reply.add(piece)
        row = reader.messages(conversation.id)[0]
        assert (row.content, row.complete) == (seen, False) == (reply.text, False)
    reply.finish()
    assert reader.messages(conversation.id)[0].complete


def test_a_killed_chat_kept_every_piece_it_showed(tmp_path):
    """The child stores each piece, then "shows" it (prints it); killed at once, nothing shown is missing."""
    path = tmp_path / "chat.sqlite3"
    script = textwrap.dedent(
        f"""
        import sys, time
        from grains_edge.store.conversations import ConversationStore
        from grains_edge.tui.generation import StoredReply
        store = ConversationStore({str(path)!r})
        conversation = store.create_conversation("m", title="killed")
        reply = StoredReply(store, store.add_message(conversation.id, "assistant", complete=False))
        for number in range(100000):
            reply.add(f" piece{{number}}")
            print(f" piece{{number}}", flush=True)
            time.sleep(0.002)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    shown = "".join(child.stdout.readline().rstrip("\n") for _ in range(20))
    child.send_signal(signal.SIGKILL)
    child.wait()
    (answer,) = ConversationStore(path).messages(ConversationStore(path).latest().id)
    assert answer.content.startswith(shown) and not answer.complete
    assert len(answer.content) - len(shown) <= len(" piece99999")  # at most the piece being shown when killed


def test_a_killed_writer_loses_nothing_already_saved_and_the_store_reopens(tmp_path):
    path = tmp_path / "chat.sqlite3"
    script = textwrap.dedent(
        f"""
        import os
        from grains_edge.store.conversations import ConversationStore
        store = ConversationStore({str(path)!r})
        conversation = store.create_conversation("m", title="killed")
        store.add_message(conversation.id, "user", "Tell me a story")
        reply = store.add_message(conversation.id, "assistant", profile="none", complete=False)
        store.update_message(reply, "Once upon a time")
        os._exit(9)  # no close, no commit hooks, no cleanup
        """
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    store = ConversationStore(path)
    conversation = store.latest()
    assert conversation.title == "killed"
    user, answer = store.messages(conversation.id)
    assert (user.content, answer.content, answer.complete) == ("Tell me a story", "Once upon a time", False)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---- histories that can't be used as they are --------------------------------------------------


def filled_history(path) -> int:
    """A history big enough to span several pages; the id of its conversation."""
    store = ConversationStore(path)
    conversation = store.create_conversation("m", title="old")
    for number in range(60):
        store.add_message(conversation.id, "user", f"message {number} " + "x" * 1000)
    store.close()
    return conversation.id


def page_corrupted(path) -> None:
    filled_history(path)
    data = bytearray(path.read_bytes())
    for page in (3, 5):
        data[page * 4096 + 100 : page * 4096 + 300] = b"\xff" * 200
    path.write_bytes(bytes(data))


def not_ours(path) -> None:
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE notes (text TEXT)")


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(os.urandom(8192)),
        lambda path: path.write_bytes(b"SQLite format 3\x00" + os.urandom(8192)),
        page_corrupted,
        not_ours,
    ],
    ids=["random-bytes", "sqlite-header-then-random", "page-corrupted", "not-a-grains-edge-history"],
)
def test_a_damaged_history_is_kept_untouched_and_a_fresh_one_used_beside_it(tmp_path, damage):
    path = tmp_path / "chat.sqlite3"
    damage(path)
    before = digest(path)
    with pytest.raises(HistoryError) as refused:
        ConversationStore(path)
    assert refused.value.kind == "damaged" and "\n" not in str(refused.value)
    store, notice = open_store(path)
    assert store.path == tmp_path / "chat-1.sqlite3" and store.writable
    assert str(path) in notice and "chat-1.sqlite3" in notice and "\n" not in notice
    conversation = store.create_conversation("m", title="new")
    store.close()
    again, _ = open_store(path)  # the next start reuses the same fresh file
    assert again.path == store.path and again.latest().id == conversation.id
    assert digest(path) == before and sorted(p.name for p in tmp_path.iterdir() if "-1" not in p.name) == [path.name]


def test_a_data_folder_that_cannot_be_made_gives_an_empty_read_only_history(tmp_path):
    blocker = tmp_path / "home"
    blocker.write_text("a file where the data folder should be")
    store, notice = open_store(blocker / "chat.sqlite3")
    assert not store.writable and store.conversations() == []
    assert "sending is off" in notice and "GRAINS_EDGE_HOME" in notice
    with pytest.raises(GrainsError, match="read-only"):
        store.create_conversation("m")


def test_a_read_only_store_shows_the_history_and_refuses_writes(tmp_path):
    path = tmp_path / "chat.sqlite3"
    conversation_id = filled_history(path)
    before = digest(path)
    store = ConversationStore(path, mode="read")
    assert len(store.messages(conversation_id)) == 60
    with pytest.raises(GrainsError, match="read-only.*; fix: "):
        store.add_message(conversation_id, "user", "lost?")
    assert digest(path) == before


def test_a_file_the_user_cannot_write_opens_read_only_with_its_history(tmp_path, monkeypatch):
    path = tmp_path / "chat.sqlite3"
    conversation_id = filled_history(path)
    before = digest(path)
    writable = os.access
    monkeypatch.setattr(os, "access", lambda where, mode: writable(where, mode) and where != path)  # as for chmod 444
    store, notice = open_store(path)
    assert not store.writable and len(store.messages(conversation_id)) == 60
    assert "the file is read-only" in notice and "sending is off" in notice
    assert digest(path) == before


@pytest.mark.skipif(ROOT, reason="root writes read-only files")
def test_a_read_only_file_opens_read_only(tmp_path):
    path = tmp_path / "chat.sqlite3"
    conversation_id = filled_history(path)
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        store, notice = open_store(path)
        assert not store.writable and "sending is off" in notice
        assert len(store.messages(conversation_id)) == 60
    finally:
        tmp_path.chmod(0o755)


def test_a_locked_history_fails_a_write_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(conversations, "BUSY_SECONDS", 0.1)
    path = tmp_path / "chat.sqlite3"
    conversation_id = filled_history(path)
    store, notice = open_store(path)
    assert notice == ""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another program holds the write lock
    with pytest.raises(HistoryError) as refused:
        store.add_message(conversation_id, "user", "hello")
    assert refused.value.kind == "locked" and "; fix: " in str(refused.value)
    assert len(store.messages(conversation_id)) == 60  # reading goes on (WAL)
    other.execute("ROLLBACK")
    store.add_message(conversation_id, "user", "hello")


# ---- the history loader against anything a file may hold -----------------------------------------

VALUES = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.binary(max_size=50),
    st.sampled_from(["user", "assistant", "compare", "truthful+concise@x", "a+b@1.5", "\x1b[2J", "x" * 200_000]),
)


def load_everything(path) -> list:
    """What the chat loads from a history: the listing, every conversation's messages, their widgets."""
    store, _ = open_store(path)
    loaded = []
    for conversation in store.conversations():
        messages = store.messages(conversation.id)
        loaded.append((conversation, messages, list(message_widgets(messages))))
    store.close()
    return loaded


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=4096), header=st.booleans())
def test_a_file_of_random_bytes_loads_or_falls_back(tmp_path, data, header):
    path = tmp_path / "random" / "chat.sqlite3"
    path.parent.mkdir(exist_ok=True)
    for old in path.parent.iterdir():
        old.unlink()
    path.write_bytes((b"SQLite format 3\x00" if header else b"") + data)
    before = digest(path)
    load_everything(path)  # no error at all: a file that isn't a history falls back to a fresh one beside it
    assert digest(path) == before or (not data and not header)  # an empty file is an empty database: it is used


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    conversation_rows=st.lists(st.tuples(*[VALUES] * 4), max_size=4),
    message_rows=st.lists(st.tuples(st.integers(0, 5), *[VALUES] * 6), max_size=8),
    constrained=st.booleans(),
)
def test_any_rows_of_a_history_load_as_text_or_fail_as_one_line(tmp_path, conversation_rows, message_rows, constrained):
    """Wrong types, NULLs, huge text, invalid UTF-8: the loader gives well-typed messages, never a traceback."""
    path = tmp_path / "rows" / "chat.sqlite3"
    path.parent.mkdir(exist_ok=True)
    for old in path.parent.iterdir():
        old.unlink()
    with sqlite3.connect(path) as db:
        if constrained:
            db.executescript(conversations.SCHEMA.replace("NOT NULL", ""))  # our columns, no NULL checks
        else:
            db.executescript(
                "CREATE TABLE conversations (id INTEGER PRIMARY KEY, title, created, model, system_prompt);"
                "CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id, role, content, profile, alpha,"
                " created, complete);"
            )
        db.executemany(
            "INSERT INTO conversations (title, created, model, system_prompt) VALUES (?,?,?,?)", conversation_rows
        )
        db.executemany(
            "INSERT INTO messages (conversation_id, role, content, profile, alpha, created, complete)"
            " VALUES (?,?,?,?,?,?,?)",
            message_rows,
        )
        db.execute("UPDATE messages SET content = CAST(x'ff00fe' AS TEXT) WHERE id % 3 = 0")  # invalid UTF-8
    try:
        loaded = load_everything(path)
    except GrainsError:
        return
    for conversation, messages, _ in loaded:
        assert isinstance(conversation.title, str) and isinstance(conversation.message_count, int)
        for message in messages:
            assert message.role in conversations.ROLES and isinstance(message.content, str)
            assert message.profile is None or isinstance(message.profile, str)
            assert message.alpha is None or isinstance(message.alpha, float)
