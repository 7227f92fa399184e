"""Chat history in SQLite: conversations and their messages, kept safe against a crash mid-reply.

An assistant row is inserted when its reply starts (complete = 0) and its content rewritten while it
streams, so a kill loses at most the last half second of text. The database runs in WAL mode and every
write is one statement, so one transaction: nothing is ever half-written. A row still incomplete after
a restart was cut off. Roles: user, assistant, and compare (the baseline column of a compared turn,
shown but never sent to the model).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL DEFAULT '',
    profile TEXT,
    alpha REAL,
    created TEXT NOT NULL,
    complete INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""

# conversations with their last activity and size, most recently active first
LISTING = """
SELECT c.id, c.title, c.created, c.model, c.system_prompt,
       COALESCE(MAX(m.created), c.created) AS active, COUNT(m.id) AS size
FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id
GROUP BY c.id ORDER BY active DESC, MAX(m.id) DESC, c.id DESC
"""


@dataclass
class Conversation:
    id: int
    title: str
    created: str
    model: str
    system_prompt: str
    last_active: str = ""
    message_count: int = 0


@dataclass
class Message:
    id: int
    conversation_id: int
    role: str  # user | assistant | compare
    content: str
    profile: str | None
    alpha: float | None
    created: str
    complete: bool


def now() -> str:
    return datetime.now().isoformat(timespec="microseconds")


class ConversationStore:
    """One SQLite file; safe to call from the UI thread and a generation thread."""

    def __init__(self, path: str | Path, clock: Callable[[], str] = now):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._lock = threading.Lock()
        # autocommit: each statement is its own transaction
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def _run(self, sql: str, parameters: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, parameters)

    def _rows(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, parameters).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- conversations ---------------------------------------------------------------------

    def create_conversation(self, model: str, system_prompt: str = "", title: str = "") -> Conversation:
        created = self.clock()
        cursor = self._run(
            "INSERT INTO conversations (title, created, model, system_prompt) VALUES (?, ?, ?, ?)",
            (title, created, model, system_prompt),
        )
        return Conversation(cursor.lastrowid, title, created, model, system_prompt, created)

    def conversations(self) -> list[Conversation]:
        """All conversations, most recently active first."""
        return [Conversation(*row) for row in self._rows(LISTING)]

    def conversation(self, conversation_id: int) -> Conversation | None:
        return next((c for c in self.conversations() if c.id == conversation_id), None)

    def latest(self) -> Conversation | None:
        listing = self.conversations()
        return listing[0] if listing else None

    def set_system_prompt(self, conversation_id: int, system_prompt: str) -> None:
        self._run("UPDATE conversations SET system_prompt = ? WHERE id = ?", (system_prompt, conversation_id))

    def delete_conversation(self, conversation_id: int) -> None:
        self._run("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # ---- messages --------------------------------------------------------------------------

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str = "",
        profile: str | None = None,
        alpha: float | None = None,
        complete: bool = True,
    ) -> int:
        cursor = self._run(
            "INSERT INTO messages (conversation_id, role, content, profile, alpha, created, complete)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (conversation_id, role, content, profile, alpha, self.clock(), int(complete)),
        )
        return cursor.lastrowid

    def update_message(self, message_id: int, content: str, complete: bool | None = None) -> None:
        if complete is None:
            self._run("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))
        else:
            self._run(
                "UPDATE messages SET content = ?, complete = ? WHERE id = ?", (content, int(complete), message_id)
            )

    def delete_messages(self, message_ids: list[int]) -> None:
        marks = ",".join("?" * len(message_ids))
        self._run(f"DELETE FROM messages WHERE id IN ({marks})", tuple(message_ids))

    def messages(self, conversation_id: int) -> list[Message]:
        rows = self._rows(
            "SELECT id, conversation_id, role, content, profile, alpha, created, complete"
            " FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation_id,),
        )
        return [Message(*row[:7], complete=bool(row[7])) for row in rows]
