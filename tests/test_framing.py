"""The SIP-over-TCP framer (sans-IO): messages out of a byte stream however it is cut, every
limit holding against a hostile stream."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st

from sipwatch import framing
from sipwatch.framing import MAX_MESSAGE, StreamFramer, _content_lengths, _head_end
from sipwatch.sipmsg import _sipscan, parse
from sipwatch.stats import DROP_BAD_CONTENT_LENGTH, DROP_NOT_SIP, DROP_TOO_LARGE

from test_core import invite

OK = (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bK1\r\nFrom: <sip:a@x>;tag=1\r\n"
      b"To: <sip:b@y>;tag=2\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")


def test_messages_keepalives_and_pong():
    f = StreamFramer()
    stream = b"\r\n\r\n" + invite() + OK + b"\r\n" + invite(body=b"") + b"\r\n\r\n"
    out = f.feed(stream)
    assert out == [invite(), OK, invite(body=b"")]
    assert f.pings == 2 and f.keepalives == 3 and not f.partial and f.error is None
    assert parse(out[0]).body == parse(invite()).body


def _keepalives_a_byte_a_step(run: bytes) -> tuple[int, int]:
    """(pings, pongs) of a run of CR/LF read as RFC 5626 says, a step at a time: CRLFCRLF is a
    ping, a CRLF not starting one a pong, anything else a stray byte."""
    pings = pongs = i = 0
    while i < len(run):
        if run.startswith(b"\r\n\r\n", i):
            pings, i = pings + 1, i + 4
        elif run.startswith(b"\r\n", i):
            pongs, i = pongs + 1, i + 2
        else:
            i += 1
    return pings, pongs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=12).map(lambda b: bytes(b"\r\n"[x % 2] for x in b)),
                min_size=1, max_size=6))
def test_line_ends_between_messages_are_read_as_a_step_at_a_time_would(runs):
    """Runs of line ends are taken in one pass now (a byte a step cost ~0.27 µs a byte of the
    loop); the pings, pongs and messages are the same as the step-at-a-time reading's."""
    f = StreamFramer()
    stream = b"".join(r + OK for r in runs)
    assert f.feed(stream) == [OK] * len(runs) and f.error is None
    want = [_keepalives_a_byte_a_step(r) for r in runs]
    assert f.pings == sum(p for p, _ in want)
    assert f.keepalives == sum(p + q for p, q in want)
    assert f.idle_bytes == sum(map(len, runs))


@pytest.mark.pure_python
def test_a_long_run_of_line_ends_is_one_step():
    f = StreamFramer()
    steps = []
    orig = f._line_ends
    f_cls = type(f)
    try:
        f_cls._line_ends = lambda self, buf: (steps.append(len(buf)), orig.__func__(self, buf))[1]
        assert f.feed(b"\n" * 100_000 + OK + b"\r" * 100_000) == [OK]
    finally:
        f_cls._line_ends = orig.__func__
    # the last CR waits: it may start a ping the next read completes
    assert len(steps) <= 3 and f.idle_bytes == 199_999 and f.keepalives == 0 and bytes(f.buf) == b"\r", steps


def test_keepalives_do_not_depend_on_where_a_run_of_line_ends_is_cut():
    """Every run of CR and LF up to 8 bytes before a message, cut at every place: the pings and
    keep-alives are the whole stream's (the fuzzer found two pings cut after the first and a
    half read as a ping and two pongs)."""
    import itertools
    msg = b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 0\r\n\r\n"
    for n in range(1, 9):
        for run in itertools.product(b"\r\n", repeat=n):
            stream = bytes(run) + msg
            whole = StreamFramer()
            assert whole.feed(stream) == [msg]
            for cut in range(1, n + 1):
                f = StreamFramer()
                out = f.feed(stream[:cut]) + f.feed(stream[cut:])
                assert out == [msg] and (f.pings, f.keepalives) == (whole.pings, whole.keepalives), (stream, cut)


def test_a_ping_cut_across_reads_is_still_a_ping():
    for first, second in ((b"\r\n\r", b"\n"), (b"\n\r\n", b"\r\n"), (b"\r", b"\n\r\n"), (b"\r\n\r\n", b"")):
        f = StreamFramer()
        f.feed(first)
        f.feed(second)
        assert f.pings == 1, (first, second)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 97), min_size=1, max_size=80))
def test_any_cut_gives_the_same_messages(sizes):
    stream = (invite() + OK) * 3
    f = StreamFramer()
    out, pos, i = [], 0, 0
    while pos < len(stream):
        n = sizes[i % len(sizes)]
        out += f.feed(stream[pos:pos + n])
        pos, i = pos + n, i + 1
    assert out == [invite(), OK] * 3 and f.error is None and not f.partial


class CountingBuffer(bytearray):
    """The framer's buffer, counting the bytes its searches look at (up to the match, or to the
    end of the range searched): work counted without a clock."""
    scanned = 0

    def find(self, sub, start=0, end=None):
        at = super().find(sub, start, end)
        stop = (len(self) if end is None else min(end, len(self))) if at < 0 else at + len(sub)
        CountingBuffer.scanned += max(0, stop - max(start, 0))
        return at


@pytest.fixture
def python_scans(monkeypatch):
    """The framer's Python scans, whose searches a CountingBuffer sees (the C ones are single
    passes that stop at their match, held to the Python ones by the properties below)."""
    monkeypatch.setattr(framing, "_c_head_end", None)
    monkeypatch.setattr(framing, "_c_content_lengths", None)


def counted_framer() -> StreamFramer:
    CountingBuffer.scanned = 0
    f = StreamFramer()
    f.buf = CountingBuffer()
    return f


@pytest.mark.pure_python
def test_byte_at_a_time_costs_linear_work(python_scans):
    """A slowloris sender: each byte is one short search from where the last one stopped."""
    f = counted_framer()
    msg = invite(extra=b"X-Pad: " + b"p" * 8000)
    out = []
    for b in msg:
        out += f.feed(bytes([b]))
    assert out == [msg]
    assert len(msg) // 2 <= CountingBuffer.scanned <= 16 * len(msg)  # (~8: a few bytes behind each new one, twice)


@pytest.mark.pure_python
def test_a_read_full_of_small_messages_costs_linear_work(python_scans):
    """300 messages in one read: each one's searches stop within it (a search for the end of the
    header section that ran to the end of the buffer made this quadratic: ~150x the bytes)."""
    f = counted_framer()
    stream = OK * 300
    assert f.feed(stream) == [OK] * 300 and f.error is None
    assert len(stream) // 2 <= CountingBuffer.scanned <= 4 * len(stream)  # (~2)


def test_faults_close_the_stream_after_the_good_messages():
    cases = [
        (OK.replace(b"Content-Length: 0\r\n", b""), DROP_BAD_CONTENT_LENGTH),  # required on streams
        (OK.replace(b"Content-Length: 0", b"Content-Length: 0\r\nl: 0"), DROP_BAD_CONTENT_LENGTH),
        (OK.replace(b"Content-Length: 0", b"Content-Length: x"), DROP_BAD_CONTENT_LENGTH),
        (OK.replace(b"Content-Length: 0", b"Content-Length: %d" % (MAX_MESSAGE + 1)), DROP_TOO_LARGE),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", DROP_NOT_SIP),
        (b"OPTIONS sip:x SIP/2.0\r\n" + b"X-A: b\r\n" * 5000, DROP_TOO_LARGE),  # endless headers
        (b"\x16\x03\x01" + b"\x00" * 5000, DROP_NOT_SIP),  # a TLS hello on the SIP port
    ]
    for bad, reason in cases:
        f = StreamFramer()
        assert f.feed(OK + bad + OK) == [OK]
        assert f.error is not None and f.error.reason == reason, bad[:40]
        assert f.feed(OK) == [] and len(f.buf) == 0  # nothing more is taken


def test_buffer_stays_bounded():
    f = StreamFramer()
    head = b"INVITE sip:x SIP/2.0\r\nContent-Length: 60000\r\n\r\n"
    out = f.feed(head)
    for _ in range(60):
        out += f.feed(b"y" * 1000)
        assert len(f.buf) <= MAX_MESSAGE
    assert out == [head + b"y" * 60000] and f.error is None and not f.partial


# the Content-Length lines as RFC 3261 §7.3.1 names them, found by the framer without a regex
# search over the whole header section (sipwatch.framing._content_lengths): the same values, in
# the same order, as this multi-line search, whatever the case, line ends and near misses
_CLEN_SEARCH = re.compile(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*([^\n]*)")
_PIECES = st.sampled_from([b"\n", b"\r\n", b"\r", b"l", b"L", b"content-length", b"Content-Length",
                           b"CONTENT-length", b"content-lengt", b":", b" ", b"\t", b"7", b"12", b"x",
                           b"\x80", b"lo", b"\nl", b"Via: a", b"\x00"])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PIECES, max_size=40), st.integers(0, 400))
def test_content_length_lines_are_what_a_multiline_search_finds(parts, cut):
    buf = bytearray(b"".join(parts))
    end = min(cut, len(buf))
    want = _CLEN_SEARCH.findall(buf, 0, end)
    assert _content_lengths(buf, end) == want
    if _sipscan is not None:
        assert _sipscan.content_lengths(buf, end) == want


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from([b"\n", b"\r", b"\r\n", b"\n\n", b"\n\r\n", b"x", b"ab", b" "]), max_size=30),
       st.integers(0, 120))
def test_the_end_of_a_header_section_is_found_alike_in_c_and_python(parts, start):
    """The first LF LF or LF CR LF at or after ``start``, as two bounded bytes.find give it."""
    buf = bytearray(b"".join(parts))
    e1 = bytes(buf).find(b"\n\r\n", start)
    e2 = bytes(buf).find(b"\n\n", start)
    want = (-1, 0) if e1 < 0 and e2 < 0 else (e1, 3) if e2 < 0 or 0 <= e1 < e2 else (e2, 2)
    assert _head_end(buf, start) == want
    if _sipscan is not None:
        assert _sipscan.head_end(buf, start) == want
