"""Text made safe to show on a terminal: control characters become visible stand-ins.

A terminal obeys control characters and escape sequences in what it prints: ESC[2J clears the screen,
an OSC sequence retitles the window or writes the clipboard, the one-byte C1 CSI (U+009B) starts a
sequence on its own. Model text, stored history and profile files are not ours, so everything shown
goes through `printable` first. Each dangerous character is replaced on its own, without parsing the
sequence it starts: without its ESC (or C1 introducer) the rest of a sequence is plain text, and a
sequence split across two streamed pieces is neutralised piece by piece just the same.
"""

from __future__ import annotations

import re

CONTROL_PICTURES = 0x2400  # U+2400 ␀ … U+241F ␟: the C0 controls, one visible glyph each
DELETE_PICTURE = "\u2421"  # ␡
ESCAPE_PICTURE = "\u241b"  # ␛
REPLACEMENT = "\ufffd"  # a lone surrogate cannot be encoded for the terminal at all

# C0 except tab and newline, DEL, C1, bidirectional embeddings/overrides/isolates, lone surrogates
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def stand_in(character: str) -> str:
    """The visible stand-in of one unsafe character."""
    code = ord(character)
    if code < 0x20:
        return chr(CONTROL_PICTURES + code)
    if code == 0x7F:
        return DELETE_PICTURE
    if code <= 0x9F:
        return ESCAPE_PICTURE + chr(code - 0x40)  # a C1 control is ESC + one character: U+009B CSI is ESC [
    if 0xD800 <= code <= 0xDFFF:
        return REPLACEMENT
    return f"<U+{code:04X}>"  # a bidi control reorders what follows it (Trojan Source): shown by its name


def printable(text: str) -> str:
    """`text` with every control character but tab and newline replaced by a visible stand-in.

    CR LF becomes LF first: a Windows line end is a line end, not a control to show.
    """
    return UNSAFE.sub(lambda match: stand_in(match.group()), text.replace("\r\n", "\n"))
