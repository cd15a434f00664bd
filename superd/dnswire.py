"""The DNS message format (RFC 1035), as much of it as superd's resolver asks for.

superd asks three questions: A and AAAA (a host name's addresses) and PTR (an address's name).
It needs the TTL of every answer, which getaddrinfo() does not give, so it reads the messages
itself. A query carries an EDNS0 OPT record (RFC 6891) offering 1232-byte answers, so a long
address list still fits a datagram; an answer that is truncated anyway is not used.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

A, CNAME, SOA, PTR, AAAA, OPT = 1, 5, 6, 12, 28, 41
NOERROR, SERVFAIL, NXDOMAIN = 0, 2, 3
EDNS_PAYLOAD = 1232
MAX_POINTERS = 64  # compression pointers followed in one name; a loop is a broken message
NEGATIVE_TTL = 60  # for a "no such name" without an SOA to say how long


class BadMessage(ValueError):
    """The datagram is not an answer to our question (ignore it, keep waiting)."""


class Truncated(ValueError):
    """The answer did not fit a datagram: not used (superd does not ask again over TCP)."""


@dataclass(frozen=True)
class Answer:
    """What a name server said: `values` (addresses or names) and for how long it holds.

    `found` is False for "no such name" and "no such record" (both definite, cached for the
    negative TTL); a server failure raises BadMessage or is reported by the caller as such.
    """

    found: bool
    values: tuple[str, ...]
    ttl: int


def encode_name(name: str) -> bytes:
    """`host.example.com` as length-prefixed labels; ValueError for a name DNS cannot carry."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("idna") if not label.isascii() else label.encode()
        if not 0 < len(raw) < 64:
            raise ValueError(f"{name!r} is not a valid host name")
        out += bytes([len(raw)]) + raw
    if len(out) > 254:
        raise ValueError(f"{name!r} is too long for DNS")
    return bytes(out) + b"\0"


def reverse_name(ip: str) -> str:
    """The in-addr.arpa or ip6.arpa name of an address."""
    return ipaddress.ip_address(ip).reverse_pointer


def query(qid: int, name: str, qtype: int) -> bytes:
    """One question, recursion desired, with an EDNS0 OPT record."""
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1)
    opt = b"\0" + struct.pack("!HHIH", OPT, EDNS_PAYLOAD, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", qtype, 1) + opt


def parse(data: bytes, qid: int, name: str, qtype: int) -> tuple[int, Answer | None]:
    """(rcode, answer) for a reply to (qid, name, qtype); BadMessage if it is not one.

    The answer is None when the server failed (rcode other than NOERROR and NXDOMAIN).
    """
    if len(data) < 12:
        raise BadMessage("shorter than a DNS header")
    rid, flags, qd, an, ns, _ = struct.unpack_from("!HHHHHH", data)
    if rid != qid or not flags & 0x8000:
        raise BadMessage("not the answer to our query")
    rcode = flags & 0x000F
    offset = 12
    if qd != 1:
        raise BadMessage("not one question")
    qname, offset = read_name(data, offset)
    if len(data) < offset + 4:
        raise BadMessage("question cut short")
    got_type, _ = struct.unpack_from("!HH", data, offset)
    if qname.lower() != name.rstrip(".").lower() or got_type != qtype:
        raise BadMessage("answer to another question")
    offset += 4
    if flags & 0x0200:
        raise Truncated("truncated answer")
    records, offset = _records(data, offset, an)
    authority, _ = _records(data, offset, ns)
    if rcode not in (NOERROR, NXDOMAIN):
        return rcode, None
    values, ttl = _follow(records, qname.lower(), qtype)
    if values and rcode == NOERROR:
        return rcode, Answer(True, values, ttl)
    return rcode, Answer(False, (), _negative_ttl(authority))


def _records(data: bytes, offset: int, count: int) -> tuple[list[tuple[str, int, int, str]],
                                                            int]:
    """`count` resource records from `offset`: (owner, type, ttl, value) each."""
    out = []
    for _ in range(count):
        owner, offset = read_name(data, offset)
        if len(data) < offset + 10:
            raise BadMessage("record cut short")
        rtype, _, ttl, length = struct.unpack_from("!HHIH", data, offset)
        offset += 10
        end = offset + length
        if end > len(data):
            raise BadMessage("record data cut short")
        value = _rdata(data, offset, length, rtype)
        out.append((owner.lower(), rtype, min(ttl, 0x7FFFFFFF), value))
        offset = end
    return out, offset


def _rdata(data: bytes, offset: int, length: int, rtype: int) -> str:
    if rtype == A and length == 4:
        return str(ipaddress.IPv4Address(data[offset:offset + 4]))
    if rtype == AAAA and length == 16:
        return str(ipaddress.IPv6Address(data[offset:offset + 16]))
    if rtype in (CNAME, PTR):
        return read_name(data, offset)[0]
    if rtype == SOA:
        _, at = read_name(data, offset)
        _, at = read_name(data, at)
        if at + 20 > offset + length:
            raise BadMessage("SOA cut short")
        return str(struct.unpack_from("!I", data, at + 16)[0])  # MINIMUM
    return ""


def _follow(records: list[tuple[str, int, int, str]], name: str,
            qtype: int) -> tuple[tuple[str, ...], int]:
    """The values for `name` after its CNAME chain, and the smallest TTL on the way."""
    ttl = 0x7FFFFFFF
    for _ in range(16):  # a chain longer than this is a loop
        cname = [(t, v) for owner, rtype, t, v in records if owner == name and rtype == CNAME]
        if not cname or qtype == CNAME:
            break
        ttl = min(ttl, cname[0][0])
        name = cname[0][1].lower()
    found = [(t, v) for owner, rtype, t, v in records if owner == name and rtype == qtype]
    if not found:
        return (), 0
    values = tuple(dict.fromkeys(v for _, v in found))
    return values, min(ttl, *(t for t, _ in found))


def _negative_ttl(authority: list[tuple[str, int, int, str]]) -> int:
    """RFC 2308: a negative answer holds for min(SOA TTL, SOA MINIMUM)."""
    for _, rtype, ttl, value in authority:
        if rtype == SOA and value.isdigit():
            return min(ttl, int(value))
    return NEGATIVE_TTL


def read_name(data: bytes, offset: int) -> tuple[str, int]:
    """A (possibly compressed) name at `offset`: (name, offset after it)."""
    labels: list[str] = []
    end = -1
    for _ in range(MAX_POINTERS):
        if offset >= len(data):
            raise BadMessage("name runs past the message")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise BadMessage("pointer cut short")
            if end < 0:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length & 0xC0:
            raise BadMessage("unknown label type")
        if length == 0:
            return ".".join(labels), (end if end >= 0 else offset + 1)
        label = data[offset + 1:offset + 1 + length]
        if len(label) != length:
            raise BadMessage("label cut short")
        labels.append(label.decode("ascii", "replace"))
        offset += 1 + length
    raise BadMessage("too many compression pointers")
