"""Chat history in SQLite: conversations and their messages, kept safe against a crash mid-reply.

An assistant row is inserted when its reply starts (complete = 0) and every streamed piece is appended
to it in its own commit before the piece is shown, so a kill loses nothing the screen showed. The
database runs in WAL mode with synchronous=NORMAL: a commit is in the operating system's hands once it
returns, which survives the process being killed; power loss or an OS crash can drop the last commits
(never half of one). Every write is one statement, so one transaction: nothing is ever half-written. A
row still incomplete after a restart was cut off. Roles: user, assistant, and compare (the baseline
column of a compared turn, shown but never sent to the model).

Any sqlite3 error becomes a HistoryError (a GrainsError: one line naming the file, the problem and the
fix). `open_store` never fails: a damaged file is kept untouched and a fresh one used beside it; a file
or folder that can't be written gives a read-only store.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from grains_edge.errors import GrainsError

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

COLUMNS = {
    "conversations": {"id", "title", "created", "model", "system_prompt"},
    "messages": {"id", "conversation_id", "role", "content", "profile", "alpha", "created", "complete"},
}
ROLES = ("user", "assistant", "compare")
BUSY_SECONDS = 5.0  # how long a write waits for another process's lock before it fails
HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database
SPARES = 9  # fresh files tried beside a damaged one: chat-1.sqlite3 … chat-9.sqlite3

# conversations with their last activity and size, most recently active first
LISTING = """
SELECT c.id, c.title, c.created, c.model, c.system_prompt,
       COALESCE(MAX(m.created), c.created) AS active, COUNT(m.id) AS size
FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id
GROUP BY c.id ORDER BY active DESC, MAX(m.id) DESC, c.id DESC
"""

# SQLite's primary result codes, grouped by what the user can do about them
DAMAGED = {11: "the file is damaged", 26: "the file is not a database"}  # SQLITE_CORRUPT, SQLITE_NOTADB
READ_ONLY = {3: "permission denied", 8: "it is read-only", 14: "it cannot be opened"}  # PERM, READONLY, CANTOPEN
LOCKED = {5: "another program holds it locked", 6: "another program holds it locked"}  # BUSY, LOCKED
FULL = {13: "the disk is full", 10: "a disk I/O error"}  # FULL, IOERR
FIXES = {
    "damaged": "restart the chat: it keeps this file untouched and saves to a fresh one beside it",
    "read-only": "make the file and its folder writable, or set GRAINS_EDGE_HOME to a writable folder",
    "locked": "close the other program using it (another grains-edge chat?) and try again",
    "full": "free disk space and try again",
    "other": "check the file; move it away and grains-edge starts a fresh history",
}


class HistoryError(GrainsError):
    """The history file can't be used; `kind` says which fallback applies (damaged, read-only, locked, full)."""

    def __init__(self, path: Path, kind: str, reason: str):
        super().__init__(f"chat history {path}: {reason}; fix: {FIXES[kind]}")
        self.kind = kind
        self.reason = reason

    @classmethod
    def from_sqlite(cls, path: Path, error: sqlite3.Error) -> HistoryError:
        """The error's kind from SQLite's result code (Python 3.11+), else from its message."""
        code = getattr(error, "sqlite_errorcode", None)
        primary = None if code is None else code & 0xFF
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        for kind, reasons in (("damaged", DAMAGED), ("read-only", READ_ONLY), ("locked", LOCKED), ("full", FULL)):
            if primary in reasons:
                return cls(path, kind, f"{reasons[primary]} ({message})")
        lowered = message.lower()
        for kind, words in (
            ("damaged", ("malformed", "not a database", "corrupt")),
            ("read-only", ("readonly", "read-only", "unable to open")),
            ("locked", ("locked", "busy")),
        ):
            if any(word in lowered for word in words):
                return cls(path, kind, message)
        return cls(path, "other", message)


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


def as_text(value: object) -> str:
    """A stored value as text: SQLite keeps whatever type was written, whatever the column says."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def as_alpha(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def as_count(value: object) -> int:
    return value if isinstance(value, int) else 0


def decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")  # a TEXT value need not be valid UTF-8


def conversation_from_row(row: tuple) -> Conversation:
    identifier, title, created, model, system_prompt, active, size = row
    return Conversation(
        identifier,
        as_text(title),
        as_text(created),
        as_text(model),
        as_text(system_prompt),
        as_text(active),
        as_count(size),
    )


def message_from_row(row: tuple) -> Message:
    identifier, conversation_id, role, content, profile, alpha, created, complete = row
    profile = None if profile is None else as_text(profile)
    finished = isinstance(complete, (int, float)) and complete != 0
    return Message(
        identifier,
        conversation_id,
        as_text(role),
        as_text(content),
        profile,
        as_alpha(alpha),
        as_text(created),
        finished,
    )


def spare_paths(path: Path) -> list[Path]:
    """Fresh files beside a damaged history: chat-1.sqlite3, chat-2.sqlite3, …"""
    return [path.with_name(f"{path.stem}-{number}{path.suffix}") for number in range(1, SPARES + 1)]


def check_header(path: Path) -> None:
    """Refuse a non-empty file without SQLite's header: SQLite would take a short one for an empty database."""
    try:
        with path.open("rb") as file:
            start = file.read(len(HEADER))
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as error:
        raise HistoryError(path, "read-only", f"it cannot be read ({error.strerror})") from None
    if start and start != HEADER:
        raise HistoryError(path, "damaged", "the file is not a database")


def check_writable(path: Path) -> None:
    """Refuse a file or folder the chat can't write: SQLite would open a read-only file without a word and
    fail only at the first write; WAL mode writes two files beside the database."""
    if path.exists() and not os.access(path, os.W_OK):
        raise HistoryError(path, "read-only", "the file is read-only")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise HistoryError(path, "read-only", "its folder is read-only")


def check(db: sqlite3.Connection, path: Path) -> None:
    """Refuse a file that is not a sound grains-edge history, before anything is written to it."""
    verdict = db.execute("PRAGMA quick_check").fetchall()
    if verdict != [("ok",)]:
        detail = " ".join(as_text(verdict[0][0]).replace("*", "").split())  # one line
        raise HistoryError(path, "damaged", f"the file is damaged ({detail[:100]})")
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for table in tables - {"sqlite_sequence", "sqlite_stat1"}:
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table!r})")}
        if table not in COLUMNS or not columns >= COLUMNS[table]:
            raise HistoryError(path, "damaged", f"the file is not a grains-edge chat history (table {table!r})")


class ConversationStore:
    """One SQLite file; safe to call from the UI thread and a generation thread.

    mode "write" opens (or creates) the file; "read" opens it read-only; "empty" stands in for a file
    that can't be opened at all with an empty read-only history in memory. Read-only stores refuse
    every write with a HistoryError.
    """

    def __init__(self, path: str | Path, clock: Callable[[], str] = now, mode: str = "write"):
        self.path = Path(path).expanduser()
        self.clock = clock
        self.mode = mode
        self._lock = threading.Lock()
        try:
            self._db = self._connect()
        except sqlite3.Error as error:
            raise HistoryError.from_sqlite(self.path, error) from None
        except OSError as error:  # the data folder could not be made
            raise HistoryError(self.path, "read-only", f"its folder cannot be made ({error.strerror})") from None

    def _connect(self) -> sqlite3.Connection:
        if self.mode == "empty":
            db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            db.executescript(SCHEMA)
        else:
            check_header(self.path)
            if self.mode == "write":
                self.path.parent.mkdir(parents=True, exist_ok=True)
                check_writable(self.path)
                target, uri = str(self.path), False
            else:
                target, uri = f"{self.path.absolute().as_uri()}?mode=ro", True
            # autocommit: each statement is its own transaction
            db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=BUSY_SECONDS, uri=uri)
            try:
                db.text_factory = decode
                check(db, self.path)
                if self.mode == "write":
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                    db.executescript(SCHEMA)
            except BaseException:
                db.close()
                raise
        db.text_factory = decode
        db.execute("PRAGMA foreign_keys=ON")
        if self.mode != "write":
            db.execute("PRAGMA query_only=ON")
        return db

    @property
    def writable(self) -> bool:
        return self.mode == "write"

    def _write(self, sql: str, parameters: tuple = ()) -> sqlite3.Cursor:
        if not self.writable:
            raise HistoryError(self.path, "read-only", "the chat opened it read-only, nothing new is saved")
        with self._lock:
            try:
                return self._db.execute(sql, parameters)
            except sqlite3.Error as error:
                raise HistoryError.from_sqlite(self.path, error) from None

    def _rows(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, parameters).fetchall()
            except sqlite3.Error as error:
                raise HistoryError.from_sqlite(self.path, error) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- conversations ---------------------------------------------------------------------

    def create_conversation(self, model: str, system_prompt: str = "", title: str = "") -> Conversation:
        created = self.clock()
        cursor = self._write(
            "INSERT INTO conversations (title, created, model, system_prompt) VALUES (?, ?, ?, ?)",
            (title, created, model, system_prompt),
        )
        return Conversation(cursor.lastrowid, title, created, model, system_prompt, created)

    def conversations(self) -> list[Conversation]:
        """All conversations, most recently active first."""
        return [conversation_from_row(row) for row in self._rows(LISTING)]

    def conversation(self, conversation_id: int) -> Conversation | None:
        return next((c for c in self.conversations() if c.id == conversation_id), None)

    def latest(self) -> Conversation | None:
        listing = self.conversations()
        return listing[0] if listing else None

    def set_system_prompt(self, conversation_id: int, system_prompt: str) -> None:
        self._write("UPDATE conversations SET system_prompt = ? WHERE id = ?", (system_prompt, conversation_id))

    def delete_conversation(self, conversation_id: int) -> None:
        self._write("DELETE FROM conversations WHERE id = ?", (conversation_id,))

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
        cursor = self._write(
            "INSERT INTO messages (conversation_id, role, content, profile, alpha, created, complete)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (conversation_id, role, content, profile, alpha, self.clock(), int(complete)),
        )
        return cursor.lastrowid

    def append_to_message(self, message_id: int, piece: str) -> None:
        """Add one streamed piece to a message: one statement, one commit."""
        self._write("UPDATE messages SET content = content || ? WHERE id = ?", (piece, message_id))

    def update_message(self, message_id: int, content: str, complete: bool | None = None) -> None:
        if complete is None:
            self._write("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))
        else:
            self._write(
                "UPDATE messages SET content = ?, complete = ? WHERE id = ?", (content, int(complete), message_id)
            )

    def finish_message(self, message_id: int) -> None:
        self._write("UPDATE messages SET complete = 1 WHERE id = ?", (message_id,))

    def delete_messages(self, message_ids: list[int]) -> None:
        marks = ",".join("?" * len(message_ids))
        self._write(f"DELETE FROM messages WHERE id IN ({marks})", tuple(message_ids))

    def messages(self, conversation_id: int) -> list[Message]:
        """The conversation's messages in order; rows of a role the chat doesn't know are left out."""
        rows = self._rows(
            "SELECT id, conversation_id, role, content, profile, alpha, created, complete"
            " FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation_id,),
        )
        return [message for message in map(message_from_row, rows) if message.role in ROLES]


def open_store(path: str | Path, clock: Callable[[], str] = now) -> tuple[ConversationStore, str]:
    """The history at `path` or, when it can't be used, the nearest store that can; and a one-line notice
    (what the chat does first, so a status bar that cuts it keeps the gist).

    A damaged file (or one that is not a grains-edge history) is kept untouched and a fresh file beside
    it is used, the same one on every start until the damaged file is moved away. A read-only or locked
    file, or a folder that can't be written, gives the history read-only (or an empty one when it can't
    even be read): nothing new could be saved, so the chat refuses to send rather than lose a reply.
    """
    path = Path(path).expanduser()
    try:
        return ConversationStore(path, clock), ""
    except HistoryError as error:
        problem = error
    if problem.kind == "damaged":
        for spare in spare_paths(path):
            try:
                store = ConversationStore(spare, clock)
                return store, f"history in {spare.name}: {path} kept untouched: {problem.reason}"
            except HistoryError as error:
                if error.kind != "damaged":
                    break
    notice = f"history read-only, sending is off: {path}: {problem.reason}; fix: {FIXES[problem.kind]}"
    if problem.kind != "damaged":
        try:
            return ConversationStore(path, clock, mode="read"), notice
        except HistoryError:
            pass
    return ConversationStore(path, clock, mode="empty"), notice
