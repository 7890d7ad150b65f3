"""Independent reference checks on SIP datagrams, written from RFC 3261 and not from sipwatch's
parser, so the fuzz target and the live fuzz test judge the proxy's output by a second opinion.

- The header section ends at the first empty line, whatever line ends (CRLF or bare LF) are used
  (RFC 3261 §7, §7.5); everything after it is the body.
- Over UDP the body is the first Content-Length bytes of what follows; bytes after it are
  discarded; without Content-Length the body runs to the end of the datagram (§18.3, §20.14).
  Two different Content-Length values, a non-numeric one, or one larger than what arrived leave
  the body undecidable: such a message must not be forwarded.
- What a proxy sends must be clean: CRLF line ends only, every header line ``token ":" value``
  (or a folded continuation), no control byte other than HT in the header section (§25.1).
"""
from __future__ import annotations

import ipaddress
import re

MAX_UDP_PAYLOAD = 65507  # IPv4 UDP: 65535 - 20 (IP) - 8 (UDP)
_END_OF_HEADERS = re.compile(rb"\n\r?\n")
# RFC 3261 §25.1 token characters
_TOKEN = re.compile(rb"[A-Za-z0-9\-.!%*_+`'~]+\Z")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control bytes except HT (CR/LF handled apart)
_REQUEST_LINE = re.compile(rb"([A-Za-z0-9\-.!%*_+`'~]+) (\S+) SIP/2\.0\Z")
_STATUS_LINE = re.compile(rb"SIP/2\.0 ([1-6][0-9][0-9]) [^\x00-\x08\x0a-\x1f\x7f]*\Z")
_COMPACT_CL = (b"content-length", b"l")
_CALL_ID = (b"call-id", b"i")


def split_message(data: bytes) -> tuple[bytes, bytes | None]:
    """(header section including the start line, rest after the first empty line); rest is None
    when the datagram has no empty line at all."""
    m = _END_OF_HEADERS.search(data)
    if m is None:
        return data, None
    end = m.start()
    if end and data[end - 1] == 13:  # the CR of the last header line's CRLF
        end -= 1
    return data[:end], data[m.end():]


def header_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(lowercase name, unfolded value) of each header field after the start line; lines
    without a colon are returned with name b"" so callers can tell."""
    lines = head.replace(b"\r\n", b"\n").split(b"\n")[1:]
    out: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and out:
            out[-1][1] = (out[-1][1] + b" " + line.strip()).strip()
            continue
        name, colon, value = line.partition(b":")
        out.append([name.strip().lower() if colon else b"", value.strip()])
    return [(n, v) for n, v in out]


def via_count(data: bytes) -> int:
    """Via values in the header section: every Via line's values (commas outside quotes and
    <> separate them; a Via value has neither, so commas are counted)."""
    head, _ = split_message(data)
    return sum(v.count(b",") + 1 for n, v in header_fields(head) if n in (b"via", b"v"))


def first_line(data: bytes) -> bytes:
    return data.split(b"\n", 1)[0].rstrip(b"\r")


def is_request(data: bytes) -> bool:
    return not data.startswith(b"SIP/2.0 ") and _REQUEST_LINE.match(first_line(data)) is not None


def is_response(data: bytes) -> bool:
    return data.startswith(b"SIP/2.0 ")


def call_ids(data: bytes) -> list[bytes]:
    head, _ = split_message(data)
    return [v for n, v in header_fields(head) if n in _CALL_ID]


class Declared:
    """What a datagram declares as its body: ``body`` (bytes) or ``problem`` (str)."""

    __slots__ = ("body", "problem")

    def __init__(self, body: bytes | None, problem: str | None):
        self.body, self.problem = body, problem


def declared_body(data: bytes) -> Declared:
    head, rest = split_message(data)
    if rest is None:
        rest = b""
    values = {v for n, v in header_fields(head) if n in _COMPACT_CL}
    if not values:
        return Declared(rest, None)
    if len(values) > 1:
        return Declared(None, f"conflicting Content-Length values {sorted(values)[:3]!r}")
    (v,) = values
    if not v.isdigit():
        return Declared(None, f"non-numeric Content-Length {v[:20]!r}")
    n = int(v)
    if n > len(rest):
        return Declared(None, f"Content-Length {n} > {len(rest)} bytes received")
    return Declared(rest[:n], None)


def output_problems(out: bytes) -> list[str]:
    """Why ``out`` is not a clean SIP datagram a proxy may put on the wire (empty: it is)."""
    problems = []
    if len(out) > MAX_UDP_PAYLOAD:
        problems.append(f"{len(out)} bytes > {MAX_UDP_PAYLOAD}")
    head, rest = split_message(out)
    if rest is None:
        return problems + ["no empty line after the headers"]
    if out[len(head):len(head) + 4] != b"\r\n\r\n":
        problems.append("header section not ended by CRLF CRLF")
    if b"\n" in head.replace(b"\r\n", b""):
        problems.append("bare LF in the header section")
    if b"\r" in head.replace(b"\r\n", b""):
        problems.append("bare CR in the header section")
    if _CTL.search(head.replace(b"\r\n", b"")):
        problems.append("control byte in the header section")
    start = first_line(out)
    if not (_REQUEST_LINE.match(start) or _STATUS_LINE.match(start)):
        problems.append(f"bad start line {start[:60]!r}")
    lines = head.split(b"\r\n")[1:]
    for i, line in enumerate(lines):
        if line[:1] in (b" ", b"\t"):
            if i == 0:
                problems.append("continuation before any header")
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not _TOKEN.match(name.rstrip(b" \t")):
            problems.append(f"bad header line {line[:40]!r}")
            break
    values = {v for n, v in header_fields(head) if n in _COMPACT_CL}
    if len(values) > 1:
        problems.append(f"conflicting Content-Length {sorted(values)[:3]!r}")
    elif values:
        (v,) = values
        if not v.isdigit() or int(v) != len(rest):
            problems.append(f"Content-Length {v[:20]!r} but {len(rest)} body bytes")
    return problems


def destination_problem(dest) -> str | None:
    """A destination must be an IP literal (nothing to resolve) and a port 1-65535."""
    if not (isinstance(dest, tuple) and len(dest) == 2):
        return f"destination {dest!r} is not (host, port)"
    host, port = dest
    if not isinstance(host, str) or not isinstance(port, int):
        return f"destination {dest!r} has wrong types"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"destination host {host[:60]!r} is not an IP literal"
    if not 0 < port < 65536:
        return f"destination port {port} out of range"
    return None
