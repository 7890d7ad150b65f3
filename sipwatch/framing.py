"""Sans-IO framing of SIP over a byte stream (RFC 3261 §18.3, RFC 5626 §3.5.1 keep-alives).

:class:`StreamFramer` takes the bytes of one TCP connection as they arrive and gives back whole
messages, each exactly its header section and ``Content-Length`` bytes of body, ready for the same
core that handles UDP datagrams. It never touches a socket and never reads a clock, so it is fuzzed
and tested on its own (tests/fuzz/framing_target.py).

Every limit holds whatever the peer sends:
* the header section must end within ``max_header`` bytes, and must start with a SIP start line;
* ``Content-Length`` is required (a stream cannot be framed without it), given once, and the whole
  message may be at most ``max_message`` bytes;
* so the buffer never holds more than ``max_message`` bytes plus one read;
* cost is linear in the bytes fed: the search for the end of the header section resumes where the
  last one stopped (a byte-at-a-time sender costs one short search per byte).

A stream that breaks a rule cannot be framed any more (where the next message starts is unknown):
:meth:`StreamFramer.feed` still returns the messages complete before the fault, then sets
``error`` (a :class:`FramingError` with the reason to count) and takes nothing more; the edge
closes the connection. Between messages, ``CRLFCRLF`` is a keep-alive ping, answered with ``CRLF``
(``pings`` counts the ones to answer); a lone ``CRLF`` (a pong, or padding) is skipped.
"""
from __future__ import annotations

import re
from typing import Callable, Final

from .sipmsg import _sipscan
from .stats import DROP_BAD_CONTENT_LENGTH, DROP_NOT_SIP, DROP_TOO_LARGE

MAX_MESSAGE = 65535  # bytes: the same cap as a UDP datagram, so one core serves both
MAX_HEADER = 16384  # bytes of start line and header fields
MAX_START_LINE = 4200  # bytes before the first line end (a request URI of up to 4096)

# a whole start line (matched up to its first LF): request line, or status line with any reason
_LINE_ENDS = re.compile(rb"[\r\n]+")  # a run of keep-alive bytes between messages
_PING = b"\r\n\r\n"
_START = re.compile(rb"(?:[A-Za-z]{1,32} [\x21-\x7e\x80-\xff]{1,4096} SIP/2\.0|SIP/2\.0 [0-9]{3}(?: [^\r\n]*)?)\r?\n")
# a Content-Length line (compact form ``l``), matched where a line starts; the value is checked
# apart. (One multi-line regex search over the whole header section was ~6% of the sidecar's CPU
# with SIP over TCP, perf at 1000 calls/s.)
_CLEN = re.compile(rb"(?:content-length|l)[ \t]*:[ \t]*([^\n]*)", re.IGNORECASE)


def _head_end(buf: bytearray, start: int) -> tuple[int, int]:
    """Where the header section ends: the first LF at or after ``start`` that begins LF CR LF
    (sep 3) or LF LF (sep 2), whatever line ends surround it, as sipmsg.parse cuts it; (-1, 0)
    without one. A bare LF LF counts only before the first LF CR LF: searching past it would scan
    every message queued behind this one, for each of them (quadratic in a read of many)."""
    e1 = buf.find(b"\n\r\n", start)
    e2 = buf.find(b"\n\n", start, e1 + 1) if e1 >= 0 else buf.find(b"\n\n", start)
    if e1 < 0 and e2 < 0:
        return -1, 0
    return (e1, 3) if e2 < 0 or 0 <= e1 < e2 else (e2, 2)


def _content_lengths(buf: bytearray, end: int) -> list[bytes]:
    """The values of the Content-Length lines in ``buf[:end]``, in order: what
    ``re.findall(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*([^\n]*)", buf[:end])`` gives, with
    one anchored match per line start instead of a search at every byte."""
    found: list[bytes] = []
    line = 0
    while line < end:
        m = _CLEN.match(buf, line, end)
        if m is not None:
            found.append(m.group(1))
        nl = buf.find(b"\n", line, end)
        if nl < 0:
            break
        line = nl + 1
    return found


# the same two scans in C, one pass each (sipwatch/_sipscan.c), where it was built: the Python
# ones above cost ~5 us a message compiled, most of it bytes.find of short needles
_c_head_end: Final[Callable[[bytearray, int], tuple[int, int]] | None] = \
    _sipscan.head_end if _sipscan is not None else None
_c_content_lengths: Final[Callable[[bytearray, int], list[bytes]] | None] = \
    _sipscan.content_lengths if _sipscan is not None else None


class FramingError(ValueError):
    """The stream cannot be framed any further; ``reason`` is a ``stats.DROP_*`` index."""

    def __init__(self, text: str, reason: int):
        super().__init__(text)
        self.reason = reason


class StreamFramer:
    """Bytes of one connection in, whole SIP messages out."""

    __slots__ = ("buf", "scan", "started", "need", "pings", "keepalives", "idle_bytes", "max_message",
                 "max_header", "error")

    def __init__(self, max_message: int = MAX_MESSAGE, max_header: int = MAX_HEADER):
        self.buf = bytearray()
        self.scan = 0  # where the search for the end of the header section resumes
        self.started = False  # the current message's start line was read and checked
        self.need = 0  # total length of the message being received, once its header is read
        self.pings = 0  # CRLFCRLF keep-alives seen and not yet answered (the edge answers, resets)
        self.keepalives = 0  # every keep-alive seen
        # bytes of line ends between messages not yet charged (pings, pongs, stray CR or LF: the
        # edge charges them to the connection's junk budget, four bytes a ping, and resets)
        self.idle_bytes = 0
        self.max_message = max_message
        self.max_header = min(max_header, max_message)
        self.error: FramingError | None = None  # set once the stream cannot be framed any more

    @property
    def partial(self) -> bool:
        """Whether part of a message is waiting for more bytes (a slow sender's state)."""
        return bool(self.buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return every message now complete, in order. After a fault (see
        ``error``) nothing more is taken."""
        out: list[bytes] = []
        if self.error is not None:
            return out
        buf = self.buf
        buf += data
        try:
            self._frame(buf, out)
        except FramingError as exc:
            self.error = exc
            buf.clear()
        return out

    def _frame(self, buf: bytearray, out: list[bytes]) -> None:
        while buf:
            if self.need:
                if len(buf) < self.need:
                    break
                out.append(bytes(buf[:self.need]))
                del buf[:self.need]
                self.need = 0
                continue
            c = buf[0]
            if c == 13 or c == 10:  # between messages: keep-alives
                self._line_ends(buf)
                if buf and buf[0] in (13, 10):
                    break  # maybe the start of a ping: wait for the rest
                continue
            self._frame_header(buf)
            if not self.need:
                break  # the header section is not complete yet

    def _line_ends(self, buf: bytearray) -> None:
        """Take the run of CR and LF at the buffer's start in one pass (a byte a step made a
        stream of line ends cost the loop ~0.27 µs a byte): its CRLFCRLF pings (leftmost first),
        the CRLF pongs left between them, stray bytes. A run that reaches the end of what came
        keeps its last bytes when they may start a ping the next read completes."""
        m = _LINE_ENDS.match(buf)
        run = m.end() if m is not None else 0
        seg = bytes(buf[:run])
        keep = 0
        if run == len(buf):  # what the pings leave at the end may start one: it waits
            if seg.endswith(b"\r"):  # (a CR alone waits for its LF)
                keep = 1
            pairs = seg[:run - keep]
            if pairs.endswith(b"\n"):
                # the CRLF pairs at the end, read from the first of them: pings two by two,
                # and one pair left over when they are odd (it may be a ping's first half)
                tail = len(pairs) - 1 - max(pairs.rfind(b"\r\r"), pairs.rfind(b"\n\n"))
                if tail // 2 % 2:
                    keep += 2
        take = run - keep
        if take <= 0:
            return
        seg = seg[:take]
        del buf[:take]
        pings = seg.count(_PING)
        self.pings += pings
        self.keepalives += pings + seg.count(b"\r\n") - 2 * pings
        self.idle_bytes += take

    def _frame_header(self, buf: bytearray) -> None:
        """Read the header section once it is complete and set ``need`` to the message's size."""
        start = max(0, self.scan - 3)
        if not self.started:  # the start line is checked once, as soon as it is complete
            nl = buf.find(b"\n", start)
            limit = min(MAX_START_LINE, self.max_header)
            if nl < 0 and len(buf) > limit or nl > limit:
                if limit == self.max_header:
                    raise FramingError(f"start line longer than {limit} bytes", DROP_TOO_LARGE)
                raise FramingError("no SIP start line", DROP_NOT_SIP)
            if nl < 0:
                self.scan = len(buf)
                return
            if _START.match(buf, 0, nl + 1) is None:
                raise FramingError("not a SIP start line", DROP_NOT_SIP)
            self.started = True
            start = max(0, nl - 1)
        end, sep = _c_head_end(buf, start) if _c_head_end is not None else _head_end(buf, start)
        if end < 0:
            if len(buf) > self.max_header:
                raise FramingError(f"no end of the header section in {len(buf)} bytes", DROP_TOO_LARGE)
            self.scan = len(buf)
            return
        self.scan = 0
        self.started = False
        if end + sep > self.max_header:  # (the same test, however the bytes were cut)
            raise FramingError(f"header section of {end + sep} bytes", DROP_TOO_LARGE)
        found = _c_content_lengths(buf, end) if _c_content_lengths is not None else _content_lengths(buf, end)
        if not found:
            raise FramingError("no Content-Length (required on streams)", DROP_BAD_CONTENT_LENGTH)
        if len(found) > 1:
            raise FramingError("more than one Content-Length", DROP_BAD_CONTENT_LENGTH)
        value = found[0]
        if value.endswith(b"\r"):
            value = value[:-1]
        value = value.rstrip(b" \t")  # the whole line: a stray CR or byte in it is refused
        if not value.isdigit() or len(value) > 9:
            raise FramingError(f"bad Content-Length {value[:20]!r}", DROP_BAD_CONTENT_LENGTH)
        total = end + sep + int(value)
        if total > self.max_message:
            raise FramingError(f"message of {total} bytes", DROP_TOO_LARGE)
        self.need = total


__all__ = ["FramingError", "StreamFramer", "MAX_MESSAGE", "MAX_HEADER"]
