"""The C scan of the common message head (sipwatch/_sipscan.c) changes nothing but the cost.

``sipmsg.parse`` asks ``_sipscan.split`` first and takes its Python path when it answers None, so
the accelerator may only answer for messages the Python path reads the same way without an
error. The property test builds messages that mix every shape the Python path treats specially
(bare LF and CR, folds, control bytes, non-ASCII, odd or unknown header spellings, colons, empty
values, more lines than allowed) and parses each with the accelerator and without it. The
messages real peers send (SIPp, the sidecar; the recorded fixtures) must take the C path, or it
would be dead weight.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from capture.analyze import looks_like_sip
from capture.pcapfile import read_packets
from sipwatch import sipmsg
from sipwatch.sipmsg import MAX_HEADER_LINES, SipParseError, parse

try:
    from sipwatch._sipscan import split
except ImportError:
    split = None

pytestmark = pytest.mark.skipif(split is None, reason="the C extension sipwatch._sipscan is not built")
# the parser's own use of the scan (sipmsg._c_split), which SIPWATCH_NO_C=1 turns off while the
# module itself stays importable (its own tests here still run)
parser_uses_c = pytest.mark.skipif(sipmsg._c_split is None, reason="SIPWATCH_NO_C=1: the parser runs without the scan")

ROOT = Path(__file__).resolve().parents[1]
PCAPS = ROOT / "pcaps"

# RFC 3261 §24.2, F1 (the Content-Length given for its SDP body)
RFC_F1 = (b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
          b"Via: SIP/2.0/TCP client.atlanta.example.com:5060;branch=z9hG4bK74bf9\r\n"
          b"Max-Forwards: 70\r\n"
          b"From: Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl\r\n"
          b"To: Bob <sip:bob@biloxi.example.com>\r\n"
          b"Call-ID: 3848276298220188511@atlanta.example.com\r\n"
          b"CSeq: 1 INVITE\r\n"
          b"Contact: <sip:alice@client.atlanta.example.com;transport=tcp>\r\n"
          b"Content-Type: application/sdp\r\n"
          b"Content-Length: 151\r\n"
          b"\r\n"
          b"v=0\r\no=alice 2890844526 2890844526 IN IP4 client.atlanta.example.com\r\ns=-\r\n"
          b"c=IN IP4 192.0.2.101\r\nt=0 0\r\nm=audio 49172 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def test_rfc_example_is_split_into_its_parts():
    start, lines, names, body = split(RFC_F1, sipmsg._NAME_CACHE, MAX_HEADER_LINES)
    assert start == b"INVITE sip:bob@biloxi.example.com SIP/2.0"
    assert lines[0] == b"Via: SIP/2.0/TCP client.atlanta.example.com:5060;branch=z9hG4bK74bf9"
    assert lines[-1] == b"Content-Length: 151"
    assert names == [b"via", b"max-forwards", b"from", b"to", b"call-id", b"cseq", b"contact",
                     b"content-type", b"content-length"]
    assert len(body) == 151 and body.startswith(b"v=0\r\n") and body.endswith(b"PCMU/8000\r\n")


@pytest.mark.parametrize("data", [
    RFC_F1.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\n"),  # a bare LF
    RFC_F1.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\r"),  # a bare CR
    RFC_F1.replace(b"To: Bob", b"To: B\x00b"),  # NUL
    RFC_F1.replace(b"To: Bob", b"To: B\x7fb"),  # DEL
    RFC_F1.replace(b"To: Bob", "To: Bøb".encode()),  # non-ASCII (valid UTF-8)
    RFC_F1.replace(b"To: Bob", b"To: B\xffb"),  # not UTF-8
    RFC_F1.replace(b"To: Bob <sip:", b"To: Bob\r\n <sip:"),  # folded
    RFC_F1.replace(b"To: Bob <sip:", b"To: Bob\r\n\t<sip:"),  # folded with HT
    RFC_F1.replace(b"Max-Forwards:", b"max-FORWARDS:"),  # spelling not in the table
    RFC_F1.replace(b"Max-Forwards:", b"Max-Forwards :"),  # SP before the colon
    RFC_F1.replace(b"Max-Forwards: 70", b"Max-Forwards 70"),  # no colon
    RFC_F1.replace(b"Max-Forwards: 70", b": 70"),  # no name
    RFC_F1.replace(b"\r\n\r\n", b"\r\n"),  # no empty line
    RFC_F1.replace(b"\r\n\r\n", b"\n\n"),  # the empty line in bare LFs
    RFC_F1[:60],  # cut short
    b"",
    RFC_F1.replace(b"CSeq: 1 INVITE\r\n", b"CSeq: 1 INVITE\r\n" + b"To: x\r\n" * MAX_HEADER_LINES),
])
def test_unusual_shapes_are_left_to_the_python_path(data):
    """On the table as it starts: the Python path adds the spellings it meets (``Max-Forwards :``
    among them, from any test run before this one), and a learnt spelling takes the fast path."""
    assert split(data, pristine_table(), MAX_HEADER_LINES) is None


def pristine_table() -> dict:
    """The name table as the module builds it, before any spelling was learnt."""
    names = sipmsg._COMMON_NAMES + tuple(sipmsg.COMPACT_FORMS)
    table = {s + b":": sipmsg._canonical_name(s) for n in names for s in (n, n.lower())}
    assert all(sipmsg._NAME_CACHE.get(k) == v for k, v in table.items())
    return table


def test_line_limit_counts_the_start_line_as_the_python_path_does():
    head = [b"OPTIONS sip:a@b SIP/2.0"] + [b"To: x"] * (MAX_HEADER_LINES - 1)
    at_limit = b"\r\n".join(head) + b"\r\n\r\n"
    assert len(split(at_limit, sipmsg._NAME_CACHE, MAX_HEADER_LINES)[1]) == MAX_HEADER_LINES - 1
    assert len(parse(at_limit).lines) == MAX_HEADER_LINES - 1
    over = b"\r\n".join(head + [b"To: x"]) + b"\r\n\r\n"
    assert split(over, sipmsg._NAME_CACHE, MAX_HEADER_LINES) is None
    with pytest.raises(SipParseError, match="too many header lines"):
        parse(over)


def test_tab_inside_values_is_the_common_shape():
    """HT is no control byte for the strict mode (only a fold when it starts a line)."""
    data = RFC_F1.replace(b"CSeq: 1 INVITE", b"CSeq:\t1\tINVITE")
    assert split(data, sipmsg._NAME_CACHE, MAX_HEADER_LINES) is not None
    assert parse(data).get(b"cseq") == b"1\tINVITE"


@pytest.mark.parametrize("name", sorted(p.stem for p in PCAPS.glob("*.pcap")))
def test_what_real_peers_send_takes_the_c_path(name):
    """SIPp's and the sidecar's messages in the recorded fixtures, all of them (tshark counted
    them for the facts file), once the parser has seen their header spellings (it adds a new
    one such as ``X-Auth-Seen:`` to its table the first time, on its Python path)."""
    pcap = PCAPS / f"{name}.pcap"
    count = json.loads(pcap.with_suffix(".facts.json").read_text())["sip_messages"]
    payloads = [p.payload for p in read_packets(str(pcap)) if looks_like_sip(p.payload)]
    assert len(payloads) == count
    for data in payloads:
        parse(data)
        got = split(data, sipmsg._NAME_CACHE, MAX_HEADER_LINES)
        assert got is not None, data[:200]
        assert got[0] + b"\r\n" + b"\r\n".join(got[1]) + b"\r\n\r\n" + got[3] == data


# -- differential: parse with and without the accelerator ---------------------------------------

START = st.sampled_from([b"INVITE sip:bob@b SIP/2.0", b"SIP/2.0 200 OK", b"SIP/2.0 500", b"BYE sip:x SIP/2.0",
                         b"INVITE  sip:b SIP/2.0", b"SIP/2.0 99 X", b"GET / HTTP/1.1", b"", b" INVITE sip:b SIP/2.0",
                         b"INVITE sip:a\tb SIP/2.0", b"\xc3\xa9 sip:b SIP/2.0", b"OPTIONS sip:b:5060 SIP/2.0"])
NAME = st.sampled_from([b"Via", b"via", b"VIA", b"v", b"V", b"Call-ID", b"call-id", b"i", b"CSeq", b"Content-Length",
                        b"content-length", b"l", b"To", b"From", b"X-Odd", b"Via ", b"Via\t", b"Bad Name", b"",
                        b"\xc3\xbc", b"traceparent", b"Max-Forwards", b"Subject", b"Via:", b"x^y"])
PIECE = st.sampled_from([b"SIP/2.0/UDP h;branch=z9hG4bK1", b"1 INVITE", b"0", b"3", b"abc", b"", b" ", b"\t", b":",
                         b"\x00", b"\x7f", b"\x01", b"\r", b"\n", b"\xc3\xa9", b"\xff", b"a,b", b"<sip:x>", b"12345678"])
EOL = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])
LINE = st.one_of(
    st.tuples(NAME, st.sampled_from([b":", b": ", b":", b""]), st.lists(PIECE, max_size=4).map(b"".join), EOL)
    .map(b"".join),
    st.tuples(st.sampled_from([b" ", b"\t"]), st.lists(PIECE, max_size=3).map(b"".join), EOL).map(b"".join),
)


@st.composite
def mixed_messages(draw):
    lines = draw(st.lists(LINE, max_size=12))
    if draw(st.integers(0, 9)) == 0:  # around the line limit
        lines += [b"To: x\r\n"] * draw(st.sampled_from([MAX_HEADER_LINES - 2, MAX_HEADER_LINES - 1, MAX_HEADER_LINES]))
    blank = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"", b"\r\n\r\n"]))
    body = draw(st.binary(max_size=40) | st.sampled_from([b"abc", b"\r\n\r\nx", b"\n\nHdr: y\r\n"]))
    return draw(START) + draw(EOL) + b"".join(lines) + blank + body


GOOD_NAME = st.sampled_from([b"Via", b"v", b"Call-ID", b"CSeq", b"Content-Length", b"content-length", b"l", b"To",
                             b"From", b"Max-Forwards", b"Contact", b"traceparent", b"Subject"])
CLEAN = st.sampled_from([b"SIP/2.0/UDP h;branch=z9hG4bK1", b"1 INVITE", b"0", b"3", b"abc", b"", b" ", b"\t", b":",
                         b"a,b", b"<sip:x>", b"12345678"])
NEAR_MISS = st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n ", b"\r\n\t", b"\x00", b"\x7f", b"\x1f", b"\xc3\xa9", b"\x80",
                             b":", b" ", b"\t", b"\r\n\r\n", b"\n\n", b"\r\nX-New: 1", b"\r\nno colon"])


@st.composite
def near_plain_messages(draw):
    """A message of the common shape, then up to two insertions of the bytes the shape turns on."""
    lines = [draw(GOOD_NAME) + draw(st.sampled_from([b": ", b":"])) + draw(st.lists(CLEAN, max_size=3).map(b"".join))
             for _ in range(draw(st.integers(0, 10)))]
    start = draw(st.sampled_from([b"INVITE sip:bob@b SIP/2.0", b"SIP/2.0 200 OK", b"SIP/2.0 180 Ringing"]))
    data = b"\r\n".join([start, *lines]) + b"\r\n\r\n" + draw(st.binary(max_size=20))
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(NEAR_MISS) + data[at:]
    return data


messages = st.one_of(mixed_messages(), near_plain_messages())


def outcome(data: bytes, check_length: bool):
    try:
        m = parse(data, check_length)
    except SipParseError as e:
        return ("SipParseError", e.reason)
    assert all(type(x) is bytes for x in (m.start, m.body, *m.lines, *m.names))
    return (m.start, m.method, m.uri, m.status, m.lines, m.names, m.body, m.truncated)


def plain_shape(data: bytes) -> bool:
    """RFC 3261 §7 read plainly: a head ended by the first CRLF CRLF, CRLF line ends, printable
    ASCII or HT, no continuation lines, each header named as in the table, within the line limit."""
    i = data.find(b"\r\n\r\n")
    if i < 0:
        return False
    lines = data[:i].split(b"\r\n")
    if len(lines) > MAX_HEADER_LINES or any(line[:1] in (b" ", b"\t") for line in lines[1:]):
        return False
    if any((c < 32 and c != 9) or c > 126 for line in lines for c in line):
        return False
    return all(line.find(b":") > 0 and line[:line.find(b":") + 1] in sipmsg._NAME_CACHE for line in lines[1:])


@pytest.fixture(scope="module")
def name_table():
    """The Python path adds spellings it meets to the table; the other tests get it back as it was."""
    saved = dict(sipmsg._NAME_CACHE)
    yield sipmsg._NAME_CACHE
    sipmsg._NAME_CACHE.clear()
    sipmsg._NAME_CACHE.update(saved)


def _assert_same_both_ways(data: bytes) -> None:
    """``parse`` in both modes gives the same outcome with the accelerator as without it."""
    c_split = sipmsg._c_split
    for check_length in (True, False):
        try:
            sipmsg._c_split = None
            want = outcome(data, check_length)
        finally:
            sipmsg._c_split = c_split
        assert outcome(data, check_length) == want


# 3000 in the pure-Python run, which compares the C scan with the Python split; the compiled run
# (tests/test_compiled.py) repeats it for mypyc's type checks, which a tenth of the inputs reach
@settings(max_examples=300 if os.environ.get("SIPWATCH_EXPECT_COMPILED") == "1" else 3000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(messages)
@parser_uses_c
def test_parse_is_the_same_with_and_without_the_accelerator(name_table, data):
    assert (split(data, name_table, MAX_HEADER_LINES) is not None) == plain_shape(data)
    assert sipmsg._c_split is not None
    _assert_same_both_ways(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
@parser_uses_c
def test_any_bytes_parse_the_same_with_and_without_the_accelerator(data):
    _assert_same_both_ways(data)


NO_C_TESTS = ["tests/test_core.py", "tests/test_hardening.py", "tests/test_hotpath.py", "tests/test_fixtures.py"]


@pytest.mark.pure_python  # once, from the pure-Python run (the compiled run leaves pure_python out)
@pytest.mark.long
def test_parser_tests_pass_without_the_accelerator():
    env = {**os.environ, "SIPWATCH_NO_C": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NO_C_TESTS], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.strip().splitlines()[-1]
