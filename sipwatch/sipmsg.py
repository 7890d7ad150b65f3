"""SIP message parsing on bytes (RFC 3261 §7, §20), built for a per-datagram hot path.

A message is split once into its start line, a list of raw header lines and the body. Header
lines the proxy does not touch are written back byte for byte; only the lines it edits (Via,
Max-Forwards, Route, Record-Route, the trace header) are rebuilt. Names are matched
case-insensitively and compact forms (``i:``, ``v:`` ...) are mapped to their long names.
Folded header lines are kept as one entry; bare-LF line ends are accepted.

Substring tests on bytes are written ``data.find(x) >= 0``, not ``x in data``: on CPython 3.11
``in`` first tries ``x`` as an integer and builds (then discards) a TypeError message, which
made it the single largest cost in the parser's profile.

The common message (CRLF line ends, a printable ASCII head, no folds, header names spelled as in
the name table) is cut by one call into the C scan ``_sipscan.split`` when that extension was
built; anything else, and every error, goes through the Python path below. ``SIPWATCH_NO_C=1``
in the environment leaves the extension unused (the tests run the parser both ways).
"""
from __future__ import annotations

import re
from typing import Callable, Final, Optional

from . import optional_c
from .stats import (
    DROP_BAD_CONTENT_LENGTH, DROP_BAD_VIA, DROP_CONTROL_BYTES, DROP_MALFORMED_HEADER, DROP_MISSING_HEADER,
    DROP_NOT_SIP, DROP_OUT_OF_RANGE, DROP_TOO_LARGE, DROP_TOO_MANY_HEADERS,
)

__all__ = [
    "SipParseError", "SipMessage", "Via", "parse", "parse_via", "split_values",
    "parse_params", "uri_hostport", "header_tag", "COMPACT_FORMS", "first_of",
]


KEEPALIVE_MAX = 64  # bytes: anything longer on a SIP port is a message (or junk), never a keep-alive
_KA_FILL = frozenset(b"\r\n\t \x00")
_KA_TOKEN = re.compile(rb"[\x21-\x7e]{1,16}[\r\n\x00 ]{0,4}\Z")
_STUN_COOKIE = b"\x21\x12\xa4\x42"


def is_sip_keepalive(p: bytes) -> bool:
    """A NAT keep-alive sent to or from a SIP port, not a SIP message and not an error: an empty
    datagram, CRLF / CRLFCRLF or NUL fill (RFC 5626 §3.5.1), one short word such as ``hello`` or
    ``jaK`` (what some phones send), or a STUN message (RFC 5626 §4.4.2: binding request, its
    response with the mapped address; RFC 5389 header with the magic cookie, length matching)."""
    n = len(p)
    if n > KEEPALIVE_MAX:
        return False
    if _KA_FILL.issuperset(p):
        return True
    if n >= 20 and p[4:8] == _STUN_COOKIE and not p[0] & 0xC0 and (p[2] << 8 | p[3]) == n - 20 \
            and not n & 3:
        return True
    return n <= 20 and _KA_TOKEN.match(p) is not None and not p.startswith(b"SIP/")


class SipParseError(ValueError):
    """The datagram is not a SIP message we can forward; the text says why and ``reason`` says
    which of :data:`sipwatch.stats.DROP_REASONS` it counts as."""

    def __init__(self, text: str, reason: int = DROP_MALFORMED_HEADER):
        super().__init__(text)
        self.reason = reason


COMPACT_FORMS = {
    b"i": b"call-id", b"v": b"via", b"f": b"from", b"t": b"to", b"m": b"contact",
    b"l": b"content-length", b"c": b"content-type", b"k": b"supported", b"s": b"subject",
    b"e": b"content-encoding", b"o": b"event", b"r": b"refer-to", b"u": b"allow-events",
    b"x": b"session-expires", b"y": b"identity", b"b": b"referred-by",
    b"a": b"accept-contact", b"j": b"reject-contact", b"d": b"request-disposition",
}

_SIP20: Final = b"SIP/2.0"
CSEQ_LIMIT: Final = 1 << 31
MAX_MESSAGE: Final = 65535


# The C versions of the header accessors below (one C call each instead of several bytes-method
# calls); each answers exactly as the Python function it stands for, or None where that raises.
# Final, so that compiled code reads them as C statics rather than module attributes.
_sipscan = optional_c("_sipscan")  # (without it the Python path does it all)
_c_index: Final[Callable[[list[bytes], bytes, int], int] | None] = _sipscan.index if _sipscan else None
_c_value: Final[Callable[[bytes], bytes] | None] = _sipscan.value if _sipscan else None
_c_get: Final[Callable[[list[bytes], list[bytes], bytes], bytes | None] | None] = _sipscan.get if _sipscan else None
_c_split_values: Final[Callable[[bytes, int], list[bytes] | None] | None] = \
    _sipscan.split_values if _sipscan else None
_c_parse_params: Final[Callable[[bytes], dict[bytes, bytes | None]] | None] = \
    _sipscan.parse_params if _sipscan else None
_c_header_tag: Final[Callable[[bytes | None], bytes | None] | None] = _sipscan.header_tag if _sipscan else None
_c_cseq: Final[Callable[[bytes], tuple[int, bytes] | None] | None] = _sipscan.cseq if _sipscan else None
_c_serialize: Final[Callable[[bytes, list[bytes], bytes], bytes | None] | None] = \
    _sipscan.serialize if _sipscan else None
_Parts = tuple[bytes, bytes, Optional[int], dict[bytes, Optional[bytes]]]
_c_via: Final[Callable[[bytes], _Parts | None] | None] = _sipscan.via if _sipscan else None


class SipMessage:
    """One parsed SIP message. ``lines``/``names`` are parallel lists (raw line, lowercase name)."""

    __slots__ = ("start", "method", "uri", "status", "lines", "names", "body", "truncated")

    def __init__(self, start, method, uri, status, lines, names, body):
        self.start: bytes = start
        self.method: bytes | None = method  # None for responses
        self.uri: bytes | None = uri
        self.status: int = status  # 0 for requests
        self.lines: list[bytes] = lines
        self.names: list[bytes] = names
        self.body: bytes = body
        self.truncated = False  # bytes past Content-Length were discarded (UDP, RFC 3261 18.3)

    @property
    def is_request(self) -> bool:
        return self.method is not None

    # -- header access -------------------------------------------------------------------
    def index(self, name: bytes, start: int = 0) -> int:
        """Index of the first header line called ``name`` (lowercase long form) from ``start`` on,
        or -1: one C call, cheaper than ``name in names`` and ``names.index(name)``."""
        return _name_index(self.names, name, start)

    def value_at(self, i: int) -> bytes:
        if _c_value is not None:
            return _c_value(self.lines[i])
        return _line_value_py(self.lines[i])

    def get(self, name: bytes) -> bytes | None:
        """Value of the first header line called ``name`` (lowercase long form)."""
        if _c_get is not None:
            return _c_get(self.lines, self.names, name)
        try:
            line = self.lines[self.names.index(name)]
        except ValueError:
            return None
        return _line_value_py(line)

    def get_all(self, name: bytes) -> list[bytes]:
        """All comma-separated values of every ``name`` header, in order."""
        out: list[bytes] = []
        for i, n in enumerate(self.names):
            if n == name:
                out.extend(split_values(self.value_at(i)))
        return out

    def call_id(self) -> bytes:
        v = self.get(b"call-id")
        if not v:
            raise SipParseError("missing Call-ID", DROP_MISSING_HEADER)
        return v

    def cseq(self) -> tuple[int, bytes]:
        v = self.get(b"cseq")
        if v is None:
            raise SipParseError("missing CSeq", DROP_MISSING_HEADER)
        if _c_cseq is not None:
            got = _c_cseq(v)
            if got is not None:
                return got
        return _cseq_py(v)

    def top_via(self) -> "Via":
        i = self.index(b"via")
        if i < 0:
            raise SipParseError("missing Via", DROP_MISSING_HEADER)
        return parse_via(split_values(self.value_at(i))[0])

    # -- serialisation -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        if _c_serialize is not None:
            out = _c_serialize(self.start, self.lines, self.body)
            if out is not None:
                return out
        return b"".join((self.start, b"\r\n", b"\r\n".join(self.lines), b"\r\n\r\n", self.body))


def _line_value_py(line: bytes) -> bytes:
    """The value of a header line, stripped, folded lines joined with one SP (the reference
    for the C ``value``)."""
    v = line[line.index(b":") + 1:]
    if v.find(b"\n") >= 0:  # folded: continuation lines join with a single space
        v = b" ".join(part.strip() for part in v.replace(b"\r\n", b"\n").split(b"\n"))
    return v.strip()


def _cseq_py(v: bytes) -> tuple[int, bytes]:
    """Number and method of a CSeq value (the reference for the C ``cseq``, and what raises)."""
    parts = v.split()
    if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isalpha():
        raise SipParseError(f"bad CSeq {v[:40]!r}", DROP_MISSING_HEADER)
    if len(parts[0]) > 10 or int(parts[0]) >= CSEQ_LIMIT:  # RFC 3261 §8.1.1.5: < 2**31
        raise SipParseError(f"CSeq out of range {v[:40]!r}", DROP_OUT_OF_RANGE)
    return int(parts[0]), parts[1].upper()


# The lowercase long names the proxy asks for, as literals: compiled, a module's bytes literals
# are the same objects as the other compiled modules' equal literals, so ``b"via" in msg.names``
# there finds its match by identity, without comparing bytes.
_KNOWN_NAMES = (
    b"via", b"max-forwards", b"from", b"to", b"call-id", b"cseq", b"contact", b"content-type",
    b"content-length", b"route", b"record-route", b"traceparent", b"x-traceparent",
)
_INTERNED: dict[bytes, bytes] = {n: n for n in _KNOWN_NAMES + tuple(COMPACT_FORMS.values())}


def _canonical_name(raw: bytes) -> bytes:
    """Lowercase long form of a header name as written (``raw`` without the colon)."""
    name = raw.strip().lower()
    if len(name) == 1:
        name = COMPACT_FORMS.get(name, name)
    return _INTERNED.get(name, name)


# Header names as they are commonly written, *including the colon*, mapped to their canonical
# form. The colon in the key makes a line without one (``key == b""``), a folded continuation
# (key starts with SP/HT) or an empty line miss the table, so every such line still takes the
# general path in :func:`_header_lines`. Spellings seen at run time are added there, up to
# _NAME_CACHE_MAX entries, so a flood of odd names cannot grow it without bound; when it is full,
# what was learnt is forgotten and learning starts again (it used to stop: two datagrams of 600
# made-up names filled it for the life of the process, and every later message with a name not
# below, a carrier's Diversion or P-Charging-Vector, took the general path, 1.7x the cost).
_COMMON_NAMES = (
    b"Via", b"Max-Forwards", b"From", b"To", b"Call-ID", b"Call-Id", b"CSeq", b"Contact",
    b"Content-Type", b"Content-Length", b"Route", b"Record-Route", b"User-Agent", b"Server",
    b"Allow", b"Supported", b"Require", b"Accept", b"Expires", b"Session-Expires", b"Min-SE",
    b"Authorization", b"Proxy-Authorization", b"WWW-Authenticate", b"Proxy-Authenticate",
    b"P-Asserted-Identity", b"Event", b"Subscription-State", b"Allow-Events", b"Date",
    b"Reason", b"RSeq", b"RAck", b"Refer-To", b"Referred-By", b"Privacy", b"Subject",
    b"Content-Disposition", b"Accept-Language", b"Accept-Encoding", b"traceparent",
    b"Traceparent", b"X-Traceparent", b"X-traceparent",
    # carriers', IMS and other RFCs' names a gateway commonly passes
    b"Diversion", b"History-Info", b"Remote-Party-ID", b"P-Preferred-Identity", b"P-Called-Party-ID",
    b"P-Charging-Vector", b"P-Charging-Function-Addresses", b"P-Access-Network-Info",
    b"P-Visited-Network-ID", b"P-Early-Media", b"Identity", b"Path", b"Service-Route", b"Min-Expires",
    b"Unsupported", b"Proxy-Require", b"Retry-After", b"Warning", b"Timestamp", b"Organization",
    b"Priority", b"Alert-Info", b"Call-Info", b"Error-Info", b"Replaces", b"Session-ID", b"Session-Id",
    b"X-CID", b"Geolocation", b"Resource-Priority", b"MIME-Version", b"Content-Encoding",
    b"Content-Language", b"Accept-Contact", b"Security-Client", b"Security-Server", b"Security-Verify",
    b"Reply-To", b"In-Reply-To", b"Refer-Sub", b"Target-Dialog", b"Feature-Caps", b"Recv-Info",
    b"Info-Package", b"Max-Breadth", b"Authentication-Info",
)
_NAME_CACHE: dict[bytes, bytes] = {}  # (not Final, unlike the limits below: the tests swap it and its bound)
for _n in _COMMON_NAMES + tuple(COMPACT_FORMS):
    for _spelling in (_n, _n.lower()):
        _NAME_CACHE[_spelling + b":"] = _canonical_name(_spelling)
_NAME_CACHE_MAX = 1024
_FIXED_NAMES: Final = dict(_NAME_CACHE)  # what the table holds before it learns anything

_Split = Callable[[bytes, dict[bytes, bytes], int], Optional[tuple[bytes, list[bytes], list[bytes], bytes]]]
_Parse = Callable[[bytes, dict[bytes, bytes], int, int, bool], Optional[
    tuple[bytes, Optional[bytes], Optional[bytes], int, list[bytes], list[bytes], bytes, bool]]]
# _c_split is the switch of the C scan of a plain message (the tests set it to None to compare):
# parse asks _c_parse, which also checks the start line and Content-Length, only while it is set.
_c_split: _Split | None = None
_c_parse: Final[_Parse | None] = _sipscan.parse if _sipscan else None
if _sipscan is not None:
    _c_split = _sipscan.split


# A header name is an RFC 3261 §25.1 token (no "^" or "|", unlike HTTP); the caller cut it at the colon.
_TOKEN = re.compile(rb"[A-Za-z0-9!%'*+\-._`~]+")
# Unfolding: blanks, a line end, blanks, as one SP. Written so that a match starts only where a
# run of blanks does (the look-behind) or at a line end (right after the last fold's blanks):
# "[ \t]*\r?\n[ \t]+" alone was tried again at every blank of a run no line end follows, n^2
# in the run's length (a 60-KB run beside one fold: ~18 s for one datagram). Same matches.
_FOLD = re.compile(rb"(?<![ \t])[ \t]*\r?\n[ \t]+|\r?\n[ \t]+")
_FOLD_START = re.compile(rb"\n[ \t]")  # one pass; bytes.find of "\n " is slow (SP is everywhere)
# Control bytes (HT excepted): in a header section only the CR and LF of line ends may appear.
_CONTROLS = bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f"
MAX_HEADER_LINES: Final = 1000  # a 64 KB datagram of tiny headers stays bounded in list sizes
MAX_CONTENT_LENGTH_DIGITS: Final = 7


def _header_lines(raw: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """General path over the header lines: folding, unusual names, errors."""
    lines: list[bytes] = []
    names: list[bytes] = []
    cache = _NAME_CACHE
    for line in raw:
        if not line:
            raise SipParseError("empty line inside the header section")
        c0 = line[0]
        if c0 == 32 or c0 == 9:  # folded continuation (space / tab)
            if not lines:
                raise SipParseError("continuation line before any header")
            lines[-1] = lines[-1] + b"\r\n" + line
            continue
        colon = line.find(b":")
        if colon <= 0:
            raise SipParseError(f"header line without name {line[:40]!r}")
        key = line[:colon + 1]
        name = cache.get(key)
        if name is None:
            raw_name = line[:colon].rstrip(b" \t")
            if not _TOKEN.fullmatch(raw_name):
                raise SipParseError(f"bad header name {raw_name[:40]!r}")
            name = _canonical_name(raw_name)
            if len(cache) >= _NAME_CACHE_MAX:  # (in place: the C scan is handed this dict)
                cache.clear()
                cache.update(_FIXED_NAMES)
            cache[key] = name
        lines.append(line)
        names.append(name)
    return lines, names


def _split_head_body(data: bytes) -> tuple[bytes, bytes]:
    """Cut at the first empty line, whatever line ends surround it (CRLF or bare LF): the body
    is never searched for header lines."""
    i = data.find(b"\n\r\n")
    j = data.find(b"\n\n")
    if i < 0 and j < 0:
        return data.rstrip(b"\r\n"), b""
    if j < 0 or 0 <= i < j:
        head, body = data[:i], data[i + 3:]
    else:
        head, body = data[:j], data[j + 2:]
    if head.endswith(b"\r"):
        head = head[:-1]
    return head, body


def _split_general(data: bytes, check_length: bool) -> tuple[bytes, list[bytes], list[bytes] | None, bytes]:
    """Start line, header lines, their names (None unless every name is spelled as in the table:
    then :func:`_header_lines` decides, after the start line is checked) and body of any message;
    raises for the errors of the header section before its names (see :func:`parse`)."""
    # Lines end in CRLF or bare LF. Splitting on CRLF is right when every LF has its CR, which
    # the counts tell without the copy a replace() of CRLF by LF would make. The common message
    # is cut at its first CRLF CRLF: when every LF before it has its CR, no earlier empty line
    # (a bare LF LF, or LF CRLF) can exist, so that cut is the one _split_head_body would make.
    i = data.find(b"\r\n\r\n")
    head = data[:i] if i >= 0 else data
    n_lf = head.count(b"\n")
    raw = head.split(b"\r\n")
    crlf_only = len(raw) == n_lf + 1
    if i >= 0 and crlf_only:
        body = data[i + 4:]
    else:
        head, body = _split_head_body(data)
        n_lf = head.count(b"\n")
        raw = head.split(b"\r\n")
        crlf_only = len(raw) == n_lf + 1
    if check_length:
        # The only control bytes allowed are the line ends (HT is not one here): deleting every
        # control byte (one C pass) must remove exactly the LFs and the CRs paired with them.
        n_ctl = len(head) - len(head.translate(None, _CONTROLS))
        if n_ctl != (2 * n_lf if crlf_only else n_lf + head.count(b"\r\n")):
            raise SipParseError("control byte in the header section", DROP_CONTROL_BYTES)
        # Bytes past 0x7f are not checked for UTF-8: a Latin-1 display name or Subject from an
        # older phone is a component the proxy neither reads nor rewrites, which RFC 3261 §16.3
        # (step 1) says to leave unchanged, and Kamailio forwards it. What reads such text
        # (masking, spans, logs) decodes it with replacement.
    if not crlf_only:
        raw = head.replace(b"\r\n", b"\n").split(b"\n")
    if len(raw) > 1 and _FOLD_START.search(head) is not None:
        # folded lines (RFC 3261 §7.3.1): unfolded in one C pass, each fold becoming the single
        # SP it stands for, so no Python loop runs per continuation line
        head = _FOLD.sub(b" ", head)
        raw = head.replace(b"\r\n", b"\n").split(b"\n")
    if len(raw) > MAX_HEADER_LINES:
        raise SipParseError("too many header lines", DROP_TOO_MANY_HEADERS)
    start = raw[0]
    del raw[0]
    # fast path: every line is "Name: value" with a name spelled as in the table
    get = _NAME_CACHE.get
    found = [get(line[:line.find(b":") + 1]) for line in raw]
    if None in found:
        return start, raw, None, body
    return start, raw, found, body  # type: ignore[return-value]  # (no None in it)


_c_first_of: Final[Callable[[list[bytes], tuple[bytes, ...]], int] | None] = _sipscan.first_of if _sipscan else None


def first_of(names: list[bytes], wanted: tuple[bytes, ...]) -> int:
    """The first index of ``names`` holding one of ``wanted``, or -1: one C call for "is any of
    these headers there" (a set test hashes every name of the message)."""
    if _c_first_of is not None:
        return _c_first_of(names, wanted)
    for i, n in enumerate(names):
        if n in wanted:
            return i
    return -1


def _name_index(names: list[bytes], name: bytes, start: int) -> int:
    """``names.index(name, start)``, or -1."""
    if _c_index is not None:
        return _c_index(names, name, start)
    try:
        return names.index(name, start)
    except ValueError:
        return -1


def parse(data: bytes, check_length: bool = True) -> SipMessage:
    """Parse one SIP datagram. Raises :class:`SipParseError` with a reason for anything else.

    Strict by default, because the proxy forwards what this accepts: no control bytes in the
    header section (bytes past 0x7f pass: see _split_general), every header line a token name
    and a colon, one Content-Length no larger than the body (a longer body is cut to it, RFC 3261
    §18.3, and ``truncated`` set). ``check_length=False`` is the passive observer's mode: it
    still wants to count a message the proxy would refuse, so only the structure is required.
    """
    if check_length and len(data) > MAX_MESSAGE:  # the observer gets TCP messages capped by its reader
        raise SipParseError("datagram larger than 65535 bytes", DROP_TOO_LARGE)
    if _c_split is not None and _c_parse is not None:  # the common message, parsed in one C call
        parsed = _c_parse(data, _NAME_CACHE, MAX_HEADER_LINES, MAX_CONTENT_LENGTH_DIGITS, check_length)
        if parsed is not None:
            msg = SipMessage(parsed[0], parsed[1], parsed[2], parsed[3], parsed[4], parsed[5], parsed[6])
            msg.truncated = parsed[7]
            return msg
    names: list[bytes] | None
    split = _c_split(data, _NAME_CACHE, MAX_HEADER_LINES) if _c_split is not None else None
    if split is not None:  # the common message, already cut and its names looked up
        start, raw, names, body = split
    else:
        start, raw, names, body = _split_general(data, check_length)
    # RFC 3261 §7.1/§7.2: single spaces between the parts, nothing else around them
    if start.startswith(_SIP20):
        parts = start.split(b" ", 2)
        if len(parts) < 2 or parts[0] != _SIP20 or len(parts[1]) != 3 or not parts[1].isdigit():
            raise SipParseError(f"bad status line {start[:60]!r}", DROP_NOT_SIP)
        status = int(parts[1])
        if status < 100:
            raise SipParseError(f"bad status code {status}", DROP_OUT_OF_RANGE)
        if len(parts) == 2:
            # "SIP/2.0 500": the reason phrase may be empty, but the SP before it is required
            # (RFC 3261 §7.2); a peer that left it out gets its response through, repaired
            start += b" "
        method = uri = None
    else:
        parts = start.split(b" ")
        if len(parts) != 3 or parts[2] != _SIP20 or not parts[1] or parts[1].find(b"\t") >= 0:
            raise SipParseError(f"not a SIP request line {start[:60]!r}", DROP_NOT_SIP)
        method, uri, status = parts[0], parts[1], 0
        if not (method.isalpha() and method.isascii()):
            raise SipParseError(f"bad method {method[:20]!r}", DROP_NOT_SIP)
    if names is None:
        raw, names = _header_lines(raw)
    msg = SipMessage(start, method, uri, status, raw, names, body)
    i = _name_index(names, b"content-length", 0) if check_length else -1
    if i >= 0:
        if _name_index(names, b"content-length", i + 1) >= 0:
            raise SipParseError("more than one Content-Length", DROP_BAD_CONTENT_LENGTH)
        cl = msg.value_at(i)
        if not cl.isdigit() or len(cl) > MAX_CONTENT_LENGTH_DIGITS:
            raise SipParseError(f"bad Content-Length {cl[:20]!r}", DROP_BAD_CONTENT_LENGTH)
        n = int(cl)
        if n > len(body):
            raise SipParseError(f"Content-Length {n} exceeds the {len(body)} body bytes received",
                                DROP_BAD_CONTENT_LENGTH)
        if n < len(body):
            msg.body = body[:n]
            msg.truncated = True
    return msg


# One comma-separated element, after any run of separators (commas, whitespace): runs of quoted
# strings, <...> and other bytes but a comma. Possessive, and each branch starts with a different
# byte, so matching is linear in the value and a comma flood costs one C call.
_ELEMENT = re.compile(rb'[\s,]*+((?:"(?:[^"\\]|\\.)*+"|<[^>]*+>|[^,"<])++)')
_SEPARATORS = re.compile(rb"[\s,]*+")


def split_values(value: bytes, limit: int = 0) -> list[bytes]:
    """Split a comma-separated header value, ignoring commas in quotes and <...>.

    Linear in the value. An unclosed quote or ``<`` raises, so nothing can hide a comma from the
    splitter. With ``limit``, raises :class:`SipParseError` (too many headers) as soon as there
    are more values than that."""
    if _c_split_values is not None:
        out = _c_split_values(value, limit)
        if out is not None:
            return out
    return _split_values_py(value, limit)


def _split_values_py(value: bytes, limit: int = 0) -> list[bytes]:
    """:func:`split_values` in Python (the scanning is a regex in C): the reference for the C
    split, and the path that raises."""
    if value.find(b",") < 0:
        return [value]
    out: list[bytes] = []
    pos = 0
    n = len(value)
    match = _ELEMENT.match
    while pos < n:
        m = match(value, pos)
        if m is None:
            rest = _SEPARATORS.match(value, pos)  # (always matches: the pattern may be empty)
            if rest is not None and rest.end() == n:  # only separators left
                break
            raise SipParseError(f"unbalanced quote or <> in {value[:40]!r}")
        end = m.end()
        if end < n and value[end] != 44:  # stopped at a quote or < that never closes
            raise SipParseError(f"unbalanced quote or <> in {value[:40]!r}")
        v = m.group(1).strip()
        if v:
            out.append(v)
            if limit and len(out) > limit:
                raise SipParseError("too many values in one header", DROP_TOO_MANY_HEADERS)
        pos = end + 1  # past the comma (or the end)
    return out


def parse_params(s: bytes) -> dict[bytes, bytes | None]:
    """``;a=1;b;c=2`` → {b'a': b'1', b'b': None, b'c': b'2'} (names lowercased)."""
    if _c_parse_params is not None:
        return _c_parse_params(s)
    return _parse_params_py(s)


def _parse_params_py(s: bytes) -> dict[bytes, bytes | None]:
    out: dict[bytes, bytes | None] = {}
    for p in s.split(b";"):
        # stripping the name and value separately is the same as stripping ``p`` first
        k, eq, v = p.partition(b"=")
        if eq:
            out[k.strip().lower()] = v.strip()
        else:
            k = k.strip()
            if k:
                out[k.lower()] = None
    return out


class Via:
    """One Via value: transport, sent-by host/port and parameters."""

    __slots__ = ("transport", "host", "port", "params", "raw")

    def __init__(self, transport: bytes, host: bytes, port: int | None, params: dict, raw: bytes):
        self.transport = transport
        self.host = host
        self.port = port
        self.params = params
        self.raw = raw

    @property
    def branch(self) -> bytes | None:
        return self.params.get(b"branch")

    def reply_address(self) -> tuple[str, int]:
        """Where a response to this Via goes over UDP: received/rport first (RFC 3261 §18.2.2, RFC 3581)."""
        host = self.params.get(b"received") or self.params.get(b"maddr") or self.host
        rport = self.params.get(b"rport")
        if rport and rport.isdigit():
            port = int(rport)
        else:
            port = self.port or 5060
        return host.decode("ascii", "replace").strip("[]"), port


def parse_via(value: bytes) -> Via:
    """One Via value (``SIP/2.0/UDP host:port;params``, spacing around the slashes tolerated)."""
    if _c_via is not None:
        parts = _c_via(value)
        if parts is not None:
            return Via(parts[0], parts[1], parts[2], parts[3], value)
    return _parse_via_py(value)


def _parse_via_py(value: bytes) -> Via:
    proto, _, rest = value.partition(b" ")
    rest = rest.strip()
    if not rest or not (proto.startswith(b"SIP/2.0/") or proto.upper().startswith(b"SIP/2.0/")):
        # tolerate "SIP / 2.0 / UDP" spacing
        compact = value.replace(b" ", b"").replace(b"\t", b"")
        if not compact.upper().startswith(b"SIP/2.0/"):
            raise SipParseError(f"bad Via {value[:60]!r}", DROP_BAD_VIA)
        slash = compact.rfind(b"/")
        j = slash + 1
        while j < len(compact) and compact[j:j + 1].isalpha():
            j += 1
        proto, rest = compact[:j], compact[j:]
    transport = proto[8:]
    if transport != b"UDP":
        transport = transport.upper()
    semi = rest.find(b";")
    if semi < 0:
        sent_by, params = rest.strip(), {}
    else:
        sent_by, params = rest[:semi].strip(), parse_params(rest[semi:])
    host, port = split_hostport(sent_by)
    if not host:
        raise SipParseError(f"Via without sent-by {value[:60]!r}", DROP_BAD_VIA)
    return Via(transport, host, port, params, value)


def split_hostport(hp: bytes) -> tuple[bytes, int | None]:
    if hp.startswith(b"["):
        end = hp.find(b"]")
        host = hp[: end + 1]
        rest = hp[end + 1:]
        port = rest[1:] if rest.startswith(b":") else b""
    else:
        host, _, port = hp.partition(b":")
    if port:
        n = int(port) if port.isdigit() and len(port) <= 5 else 0
        if not 0 < n < 65536:
            raise SipParseError(f"bad port in {hp[:60]!r}", DROP_OUT_OF_RANGE)
        return host, n
    return host, None


def uri_hostport(uri: bytes) -> tuple[bytes, int | None, dict]:
    """Host, port and parameters of a sip:/sips: URI, with or without <>/display name."""
    lt = uri.find(b"<")
    if lt >= 0:
        gt = uri.find(b">", lt)
        uri = uri[lt + 1: gt if gt > 0 else None]
    scheme, colon, rest = uri.partition(b":")
    if not colon or scheme.lower() not in (b"sip", b"sips"):
        raise SipParseError(f"unsupported URI {uri[:60]!r}")
    rest = rest.split(b"?", 1)[0]
    at = rest.rfind(b"@")
    if at >= 0:
        rest = rest[at + 1:]
    semi = rest.find(b";")
    hp = rest if semi < 0 else rest[:semi]
    params = parse_params(rest[semi:]) if semi >= 0 else {}
    host, port = split_hostport(hp)
    return host, port, params


def header_tag(value: bytes | None) -> bytes | None:
    """The ``tag`` parameter of a From/To value (parameters after the closing ``>``)."""
    if _c_header_tag is not None:
        return _c_header_tag(value)
    return _header_tag_py(value)


def _header_tag_py(value: bytes | None) -> bytes | None:
    if not value:
        return None
    gt = value.rfind(b">")
    tail = value[gt + 1:] if gt >= 0 else value
    i = tail.lower().find(b";tag=")
    if i < 0:
        return None
    tag = tail[i + 5:]
    semi = tag.find(b";")
    return (tag if semi < 0 else tag[:semi]).strip() or None
