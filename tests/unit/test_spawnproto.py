"""superd/spawnproto.py: the messages between superd and its spawner processes.

What both sides rely on: a message decodes to what was encoded, a reply batch keeps its order,
the sizes stay under the receive buffers, and a message that is not a well-formed batch is
refused with ValueError (superd then treats the spawner as dead instead of crashing a loop
callback: superd/spawners.py catches ValueError and nothing else).
"""

from __future__ import annotations

import marshal

import pytest

from superd import spawnproto
from superd.spawnproto import (
    MAX_FAILURE,
    MAX_REPLY,
    MAX_REQUEST,
    REPLIES_PER_MESSAGE,
    Exited,
    Request,
    Started,
    decode_replies,
    decode_request,
    encode_replies,
    encode_request,
    token_of,
)


def request(**changes) -> Request:
    base = Request(token=2**40 + 5, stderr="log", argv=(b"cat", b"-u", b"\xff\x00"),
                   program=(b"/bin/cat",), env=[b"PATH=/usr/bin:/bin", b"PROTO=TCP"],
                   cwd="/", gid=65534, groups=[65534, 100], uid=65534, umask=0o022)
    return base._replace(**changes)


@pytest.mark.parametrize("req", [
    request(),
    request(gid=None, groups=None, uid=None, umask=-1, stderr="null"),
    request(env=[], argv=(b"x",), cwd="/srv/ftp", stderr="socket"),
])
def test_a_request_decodes_to_what_was_sent(req):
    got = decode_request(encode_request(req))
    assert got == req and type(got) is Request


def test_a_reply_batch_keeps_its_replies_and_their_order():
    replies = [Started(1, 100, None), Exited(100, 0), Started(2, 0, "could not fork"),
               Started(3, 101, b"OSError:2:exec"), Exited(101, 127 << 8), Exited(7, 9)]
    got = decode_replies(encode_replies(replies))
    assert got == replies
    assert [type(r) for r in got] == [type(r) for r in replies]


def test_a_full_batch_fits_one_reply_buffer():
    big = [Started(2**31 + i, 4_194_304, None) if i % 2 else Exited(4_194_304, 0xFFFF)
           for i in range(REPLIES_PER_MESSAGE)]
    assert len(encode_replies(big)) <= MAX_REPLY


def test_a_reply_with_the_longest_failure_fits_alone():
    reply = Started(2**31, 4_194_304, b"\xff" * MAX_FAILURE)
    assert len(encode_replies([reply])) <= MAX_REPLY


def test_a_usual_request_is_far_under_the_request_buffer():
    req = request(env=[b"X" * 100] * 50, argv=tuple(b"a" * 50 for _ in range(40)))
    assert len(encode_request(req)) < MAX_REQUEST // 4


@pytest.mark.parametrize("data", [
    b"",
    b"\xff\xfe garbage",
    marshal.dumps(None),
    marshal.dumps([("S", 1, 2, None)]),  # a list, not a tuple
    marshal.dumps(("S", 1, 2, None)),  # one reply, not a batch of them
    marshal.dumps(((),)),
    marshal.dumps((("Q", 1, 2),)),  # unknown kind
    marshal.dumps((("S", 1, 2),)),  # a field short
    marshal.dumps((("X", 1, 2, 3),)),  # a field too many
    marshal.dumps((("X", 1, 0), "X")),  # a good one, then junk
    marshal.dumps(((1, 2, 3),)),
], ids=lambda d: repr(d[:12]))
def test_a_malformed_batch_is_refused_with_valueerror(data):
    with pytest.raises(ValueError):
        decode_replies(data)


@pytest.mark.parametrize("data", [b"", b"\xff\xfe garbage", b"\xe9\x01"])
def test_what_is_not_marshal_data_says_so(data):
    """The text goes into superd's log line: 'a spawner sent an unreadable reply (...)'."""
    with pytest.raises(ValueError, match=r"^not a reply message \("):
        decode_replies(data)


@pytest.mark.parametrize("first", [[], {}, {"S"}], ids=["list", "dict", "set"])
def test_an_unhashable_kind_is_refused_with_valueerror(first):
    with pytest.raises(ValueError):
        decode_replies(marshal.dumps(((first, 1, 2, None),)))


def test_the_token_of_a_request_that_does_not_decode():
    """The spawner answers `not started` for the token of a request it cannot read."""
    assert token_of(marshal.dumps((42, "log"))) == 42
    assert token_of(marshal.dumps(("x", 1))) == 0
    assert token_of(b"\x00not marshal") == 0
    assert token_of(marshal.dumps(7)) == 0


@pytest.mark.parametrize("fields", [(9, "log", (b"x",)), (*request(token=9), "extra")],
                         ids=["too-few", "too-many"])
def test_a_request_with_the_wrong_fields_does_not_decode_quietly(fields):
    """The spawner catches TypeError and answers with token_of() (superd/spawner.py)."""
    data = marshal.dumps(tuple(fields))
    with pytest.raises(TypeError):
        decode_request(data)
    assert token_of(data) == 9


def test_the_protocol_module_stays_stdlib_only():
    """The spawner process imports this module too: it must stay stdlib-only."""
    imports = [line for line in open(spawnproto.__file__).read().splitlines()
               if line.startswith(("import ", "from "))]
    assert imports == ["from __future__ import annotations", "import marshal", "import socket",
                       "from typing import NamedTuple"]
