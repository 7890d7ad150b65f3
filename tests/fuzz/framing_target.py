"""One fuzz input -> the SIP-over-TCP stream framer (sipwatch.framing), fed whole and in pieces.

The first byte picks how the rest is cut into reads (as a byte-at-a-time sender or a busy
kernel would deliver it); the rest is the stream. Properties (an AssertionError names the one
that broke; anything else raised is a finding too):
- the framer raises nothing: a fault is reported in ``error`` with one of the fixed drop reasons;
- how the stream is cut into reads changes nothing: the same messages, the same keep-alive count
  and the same fault as when it arrives in one read;
- no byte is invented or reordered: the messages appear in the stream in order, each one where the
  last one (plus keep-alive line ends) ended;
- every message starts with a SIP start line, and its length is its header section (up to the
  first empty line, as ``sipmsg.parse`` cuts it) plus the one Content-Length it declares, at most
  ``max_message`` bytes;
- the buffer never holds more than ``max_message`` bytes plus one read;
- the framer's C scans (where built) answer as its Python ones on the stream, from a start and up
  to an end the first byte picks.
"""
from __future__ import annotations

import re

from sipwatch.framing import StreamFramer, _content_lengths, _head_end
from sipwatch.sipmsg import _sipscan
from sipwatch.stats import DROP_BAD_CONTENT_LENGTH, DROP_NOT_SIP, DROP_TOO_LARGE

MAX_MESSAGE = 4096  # small caps, so the fuzzer reaches them
MAX_HEADER = 1024
_CLEN = re.compile(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*([0-9]+)[ \t]*\r?$")
_START = re.compile(rb"[A-Za-z]+ \S+ SIP/2\.0\r?\n|SIP/2\.0 [0-9]{3}[ \r\n]")


def _cuts(seed: int, n: int) -> list[int]:
    """Read sizes from a small deterministic generator: 1 byte at a time, fixed sizes, or mixed."""
    if seed < 32:
        return [1] * n
    sizes, x = [], seed
    while sum(sizes) < n:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        sizes.append(1 + x % (seed if seed < 128 else 700))
    return sizes


def feed_all(stream: bytes, sizes: list[int]) -> tuple[list[bytes], StreamFramer, int]:
    f = StreamFramer(MAX_MESSAGE, MAX_HEADER)
    out: list[bytes] = []
    pos = 0
    most = 0
    for n in sizes:
        chunk = stream[pos:pos + n]
        pos += n
        out += f.feed(chunk)
        most = max(most, len(f.buf))
        assert len(f.buf) <= MAX_MESSAGE + len(chunk), "buffer over its cap"
        if not chunk:
            break
    return out, f, most


def run_one_framing(data: bytes) -> None:
    if not data:
        return
    seed, stream = data[0], data[1:]
    if _sipscan is not None:
        buf, k = bytearray(stream), seed * len(stream) // 255
        assert _sipscan.head_end(buf, k) == _head_end(buf, k), "C and Python ends of a header differ"
        assert _sipscan.content_lengths(buf, k) == _content_lengths(buf, k), "C and Python Content-Lengths differ"
    whole, fw, _ = feed_all(stream, [len(stream)])
    parts, fp, _ = feed_all(stream, _cuts(seed, len(stream)))
    assert whole == parts, "messages depend on how the stream was cut"
    assert fw.keepalives == fp.keepalives, "keep-alives depend on how the stream was cut"
    assert (fw.error is None) == (fp.error is None), "a fault depends on how the stream was cut"
    if fw.error is not None:
        assert fw.error.reason == fp.error.reason, "fault reason depends on the cuts"
        assert fw.error.reason in (DROP_BAD_CONTENT_LENGTH, DROP_NOT_SIP, DROP_TOO_LARGE)
    pos = 0
    for m in whole:
        at = stream.find(m, pos)
        assert at >= 0, "a message not in the stream"
        assert set(stream[pos:at]) <= {13, 10}, "bytes skipped that were not line ends"
        pos = at + len(m)
        assert _START.match(m), "a message without a SIP start line"
        i, j = m.find(b"\n\r\n"), m.find(b"\n\n")
        end, sep = (i, 3) if j < 0 or 0 <= i < j else (j, 2)
        assert end >= 0, "a message without an end of its header section"
        found = _CLEN.findall(m[:end])
        assert len(found) == 1, "a message without exactly one Content-Length"
        assert len(m) == end + sep + int(found[0]) <= MAX_MESSAGE, "a message of the wrong length"
