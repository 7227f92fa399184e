"""printable: what reaches the terminal carries no control character, and ordinary text passes unchanged."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from grains_edge.safe_text import printable

# every character a terminal may act on: C0 but tab and newline, DEL, C1, bidi controls, lone surrogates
ACTIVE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def test_escape_sequences_become_visible_stand_ins():
    assert printable("\x1b[2J") == "␛[2J"
    assert printable("\x1b]0;pwned\x07") == "␛]0;pwned␇"
    assert printable("\x9b31m") == "␛[31m"  # the one-byte C1 CSI is ESC [
    assert printable("\x9d8;;http://x\x9c") == "␛]8;;http://x␛\\"
    assert printable("a\x00b\x7fc\rd") == "a␀b␡c␍d"
    assert printable("abc\u202edcba") == "abc<U+202E>dcba"


def test_ordinary_text_is_unchanged():
    text = "Ça va? 日本語 🎉 مرحبا\tcolumns\nnew line [bold]not markup[/] `code` **bold**"
    assert printable(text) == text
    assert printable("windows\r\nline") == "windows\nline"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=200))
def test_nothing_active_survives_and_ordinary_characters_do(text):
    shown = printable(text)
    assert not ACTIVE.search(shown)
    assert printable(shown) == shown  # stand-ins are themselves printable
    inert = ACTIVE.sub("", text)
    assert printable(inert) == inert  # what the terminal can't act on is left as it is
    assert shown.count("\n") == text.replace("\r\n", "\n").count("\n")  # and the lines stay the lines
