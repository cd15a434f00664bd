"""superd.log.clean: every message one printable line of at most MAX_MESSAGE bytes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from superd.log import CUT, MAX_MESSAGE, clean


def test_control_characters_are_escaped_as_rsyslog_does():
    assert clean("a\0b") == "a#000b"
    assert clean("\x1b[31mred") == "#033[31mred"
    assert clean("one\ntwo\r\n") == "one#012two#015#012"
    assert clean("tab\there") == "tab#011here"
    assert clean("del\x7f") == "del#177"
    assert clean("c1 \x85 \x9b") == "c1 #302#205 #302#233"  # as the bytes of their UTF-8
    assert clean("ls \u2028 ps \u2029") == "ls #342#200#250 ps #342#200#251"


def test_printable_text_is_left_as_it_is():
    for text in ("START: hello pid=4242 from=192.0.2.7", "ünïcödé ✓ 日本", "#033 is text",
                 "non-breaking\u00a0space", ""):
        assert clean(text) == text


def test_a_long_message_is_cut_and_marked():
    assert clean("x" * MAX_MESSAGE) == "x" * MAX_MESSAGE
    out = clean("x" * (MAX_MESSAGE + 1))
    assert out.endswith(CUT) and len(out.encode()) == MAX_MESSAGE
    out = clean("é" * MAX_MESSAGE)  # never half a character
    assert out.endswith("é" + CUT) and len(out.encode()) <= MAX_MESSAGE
    out = clean("\0" * MAX_MESSAGE)  # escaping counts
    assert out.endswith(CUT) and len(out.encode()) <= MAX_MESSAGE


@given(st.text())
def test_never_a_record_separator_and_never_too_long(text):
    out = clean(text)
    assert not any(c in out for c in "\0\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in out)
    assert len(out.encode("utf-8", "replace")) <= MAX_MESSAGE
