import subprocess
import sys
import textwrap

from grains_edge.conversations import ConversationStore
from grains_edge.tui.generation import SAVE_EVERY, StoredReply


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


def test_a_streaming_reply_is_on_disk_before_it_completes(tmp_path):
    path = tmp_path / "chat.sqlite3"
    store = ConversationStore(path)
    conversation = store.create_conversation("m")
    message_id = store.add_message(conversation.id, "assistant", complete=False)
    now = [0.0]
    reply = StoredReply(store, message_id, clock=lambda: now[0])
    reply.add("Partial ")
    reader = ConversationStore(path)  # another connection, as after a crash
    assert reader.messages(conversation.id)[0].content == ""  # not yet due
    now[0] += SAVE_EVERY
    reply.add("answer")
    row = reader.messages(conversation.id)[0]
    assert (row.content, row.complete) == ("Partial answer", False)
    reply.add(" and the end.")
    reply.finish()
    row = reader.messages(conversation.id)[0]
    assert (row.content, row.complete) == ("Partial answer and the end.", True)


def test_a_killed_writer_loses_nothing_already_saved_and_the_store_reopens(tmp_path):
    path = tmp_path / "chat.sqlite3"
    script = textwrap.dedent(
        f"""
        import os
        from grains_edge.conversations import ConversationStore
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
