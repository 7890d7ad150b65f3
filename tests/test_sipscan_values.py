"""The C header accessors of sipwatch/_sipscan.c give what their Python references give.

``sipmsg`` asks C first for a header's value, its comma-separated parts, its parameters, a tag,
a CSeq and a Via, and runs the Python function (the reference, kept in the module) when C is not
built, when ``SIPWATCH_NO_C=1`` is set, or when C answers None: C says None exactly where the
Python function raises, and must never say anything else than it does. The values generated
here are built from the bytes those functions turn on (quotes, backslashes before anything
including LF, <>, commas, semicolons, every ASCII whitespace byte, colons, brackets, digits,
letters in both cases, NUL, non-ASCII) and include floods and huge values.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sipwatch import core, sipmsg
from sipwatch.sipmsg import SipMessage, SipParseError, parse

from leakcheck import kept_by

try:
    from sipwatch import _sipscan
except ImportError:
    _sipscan = None

pytestmark = pytest.mark.skipif(_sipscan is None, reason="the C extension sipwatch._sipscan is not built")

PIECES = [b'"', b"\\", b"\\\"", b"\\\n", b"<", b">", b",", b", ", b";", b"=", b":", b" ", b"\t", b"\n", b"\r",
          b"\r\n", b"\x0b", b"\x0c", b"\x00", b"\x1c", b"\xff", b"\xc3\xa9", b"[", b"]", b"[::1]", b"a", b"Z", b"0",
          b"9", b"5060", b"65536", b"00001", b"tag", b"TaG", b";tag=", b";TAG=", b"<sip:a@b>", b"\"A, B\"",
          b"SIP/2.0/UDP ", b"SIP/2.0/tcp ", b"sip/2.0/UDP ", b"SIP / 2.0 / UDP ", b"host", b"branch=z9hG4bK",
          b"rport", b"received=1.2.3.4", b"INVITE", b"ack", b"1", b"2147483647", b"2147483648", b"4294967296"]
VALUE = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=24).map(b"".join),
    st.binary(max_size=40),
    st.tuples(st.sampled_from(PIECES), st.integers(1, 3000)).map(lambda t: t[0] * t[1]),  # floods
)
# 1500 examples per function in the suite (a few seconds each); the atheris core target parses
# every input both ways for longer runs (make fuzz)
SETTINGS = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.data_too_large])


def outcome(f, *args):
    try:
        got = f(*args)
    except SipParseError as e:
        return ("SipParseError", e.reason)
    except (ValueError, IndexError) as e:
        return (type(e).__name__, str(e))
    return got


@SETTINGS
@given(VALUE, st.sampled_from([0, 1, 2, 3, 10, -1]))
def test_split_values(value, limit):
    want = outcome(sipmsg._split_values_py, value, limit)
    got = _sipscan.split_values(value, limit)
    if got is None:
        assert want[0] == "SipParseError"
    else:
        assert got == want and all(type(v) is bytes for v in got)
    assert outcome(sipmsg.split_values, value, limit) == want


def test_split_values_examples():
    """What the splitter is for, from RFC 3261 §7.3.1 / §20 (commas in quotes and <> do not cut)."""
    split = _sipscan.split_values
    assert split(b'"Doe, J" <sip:j@x>;tag=1, <sip:k@y>', 0) == [b'"Doe, J" <sip:j@x>;tag=1', b"<sip:k@y>"]
    assert split(b"SIP/2.0/UDP a;branch=z9hG4bK1 ,SIP/2.0/UDP b", 0) == [b"SIP/2.0/UDP a;branch=z9hG4bK1",
                                                                         b"SIP/2.0/UDP b"]
    assert split(b"<sip:a,b@x>,  ,<sip:c@y>, ", 0) == [b"<sip:a,b@x>", b"<sip:c@y>"]
    assert split(b' a,"x\\"y,z" ', 0) == [b"a", b'"x\\"y,z"']
    assert split(b"a, b, c", 2) is None  # more than the limit: Python raises
    assert split(b'a, "b', 0) is None and split(b"a, <b", 0) is None  # unclosed: Python raises
    assert split(b'a, "b\\\nc"', 0) is None  # a backslash does not escape LF (the pattern's '.')
    v = b"no comma \"here"
    assert split(v, 0)[0] is v  # returned as it is, like the Python split


@SETTINGS
@given(VALUE)
def test_parse_params(value):
    got = _sipscan.parse_params(value)
    want = sipmsg._parse_params_py(value)
    assert got == want and list(got) == list(want)  # the same keys in the same order


@SETTINGS
@given(st.one_of(st.none(), VALUE))
def test_header_tag(value):
    assert _sipscan.header_tag(value) == sipmsg._header_tag_py(value)


def test_header_tag_examples():
    tag = _sipscan.header_tag
    assert tag(b'"A;tag=no" <sip:a@b;tag=no>;TAG= 12ab ;x=1') == b"12ab"
    assert tag(b"sip:a@b;tag=x") == b"x"
    assert tag(b"<sip:a@b>;tag=") is None and tag(b"") is None and tag(None) is None


@SETTINGS
@given(VALUE)
def test_cseq(value):
    want = outcome(sipmsg._cseq_py, value)
    got = _sipscan.cseq(value)
    if got is None:
        assert want[0] == "SipParseError"
    else:
        assert got == want and type(got[0]) is int


@pytest.mark.parametrize("value, want", [
    (b"1 INVITE", (1, b"INVITE")), (b"2147483647\tack", (2147483647, b"ACK")), (b"0000000007 bYe", (7, b"BYE")),
    (b"2147483648 INVITE", None), (b"00000000001 INVITE", None), (b"1 INVITE x", None), (b"1INVITE", None),
    (b"-1 INVITE", None), (b"1 INV1TE", None), (b"1 \xc3\xa9", None), (b"", None), (b"1", None),
])
def test_cseq_examples(value, want):
    assert _sipscan.cseq(value) == want


def via_outcome(value):
    try:
        v = sipmsg._parse_via_py(value)
    except SipParseError as e:
        return ("SipParseError", e.reason)
    return (v.transport, v.host, v.port, v.params)


@SETTINGS
@given(VALUE)
def test_via(value):
    want = via_outcome(value)
    got = _sipscan.via(value)
    if got is not None:  # (None: an unusual spelling, or a Via parse_via refuses)
        assert got == want
        assert list(got[3]) == list(want[3])
    v = outcome(sipmsg.parse_via, value)
    assert (v if isinstance(v, tuple) else (v.transport, v.host, v.port, v.params)) == want


@pytest.mark.parametrize("value", [
    b"SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;rport", b"SIP/2.0/tls [2001:db8::1]:5061;received=1.2.3.4",
    b"SIP/2.0/UDP host", b"SIP/2.0/UDP [::1]x;rport=5", b"SIP/2.0/UDP  h:1 ; Branch = B ;;x",
])
def test_via_examples_take_the_c_path(value):
    assert _sipscan.via(value) == via_outcome(value)


@pytest.mark.parametrize("value", [
    b"SIP/2.0/UDP h:0", b"SIP/2.0/UDP h:65536", b"SIP/2.0/UDP h:x", b"SIP/2.0/UDP :5060", b"SIP/2.0/UDP [::1",
    b"SIP/2.0/UDP ;branch=1", b"SIP/2.0/UDP ", b"SIP / 2.0 / UDP h", b"sip/2.0/udp h", b"SIP/2.0/UDP h:123456",
])
def test_via_unusual_or_refused_is_left_to_python(value):
    assert _sipscan.via(value) is None


LINE = st.one_of(
    st.tuples(st.sampled_from([b"Via", b"To", b"x", b""]), st.sampled_from([b":", b": ", b"", b" :"]), VALUE)
    .map(b"".join),
    VALUE,
)


@SETTINGS
@given(LINE)
def test_value(line):
    assert outcome(_sipscan.value, line) == outcome(sipmsg._line_value_py, line)


def test_value_of_folded_lines():
    value = _sipscan.value
    assert value(b"Subject: a\r\n  b\r\n\tc ") == b"a b c"
    assert value(b"Subject:\r\n x") == b"x"
    assert value(b"X: a\n\nb") == b"a  b"  # an empty piece stays a space, as in the Python join


NAMES = [b"via", b"to", b"from", b"call-id", b"cseq", b"content-length", b"x", b""]


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(NAMES), st.binary(max_size=3)), max_size=12),
       st.sampled_from(NAMES), st.integers(-3, 14))
def test_index_and_get(names, name, start):
    try:
        want = names.index(name, start)
    except ValueError:
        want = -1
    assert _sipscan.index(names, name, start) == want
    lines = [n + b": v%d " % i for i, n in enumerate(names)]
    msg = SipMessage(b"SIP/2.0 200 OK", None, None, 200, lines, names, b"")
    i = names.index(name) if name in names else -1
    assert _sipscan.get(lines, names, name) == (None if i < 0 else b"v%d" % i)
    assert msg.index(name) == i
    assert msg.index(name, start) == want


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(NAMES), st.binary(max_size=3)), max_size=12),
       st.lists(st.one_of(st.sampled_from(NAMES), st.binary(max_size=3)), max_size=4))
def test_first_of(names, wanted):
    want = next((i for i, n in enumerate(names) if n in wanted), -1)
    assert _sipscan.first_of(names, tuple(wanted)) == want
    assert sipmsg.first_of(names, tuple(wanted)) == want


def test_first_of_compares_other_objects_as_index_does():
    assert _sipscan.first_of([1, "via", bytearray(b"to"), b"via"], (b"via", b"to")) == 2
    assert _sipscan.first_of([b"a", b"b"], ()) == -1
    with pytest.raises(TypeError):
        _sipscan.first_of([b"a"], [b"a"])


def test_index_compares_other_objects_as_list_index_does():
    names = [1, "via", bytearray(b"via"), b"via"]
    assert _sipscan.index(names, b"via", 0) == 2  # bytearray(b"via") == b"via"
    assert _sipscan.index(names, b"via", 3) == 3


def test_get_raises_as_the_python_get_does():
    with pytest.raises(ValueError):
        _sipscan.get([b"no colon"], [b"x"], b"x")
    with pytest.raises(IndexError):
        _sipscan.get([], [b"x"], b"x")
    with pytest.raises(TypeError):
        _sipscan.get((b"x: 1",), [b"x"], b"x")


def test_accessors_on_a_parsed_message():
    """RFC 3261 §24.2 F1, read through the message accessors (which use C here)."""
    from test_sipscan import RFC_F1
    m = parse(RFC_F1)
    assert m.cseq() == (1, b"INVITE")
    assert m.call_id() == b"3848276298220188511@atlanta.example.com"
    assert sipmsg.header_tag(m.get(b"from")) == b"9fxced76sl" and sipmsg.header_tag(m.get(b"to")) is None
    via = m.top_via()
    assert (via.transport, via.host, via.port, via.branch) == (b"TCP", b"client.atlanta.example.com", 5060,
                                                               b"z9hG4bK74bf9")
    assert m.get(b"max-forwards") == b"70" and m.get(b"route") is None


# -- parse of a plain message: start line and Content-Length checked in C too --------------------

START_PIECES = [b"SIP/2.0", b" ", b"  ", b"\t", b"200", b"099", b"100", b"699", b"999", b"20", b"2000", b"OK",
                b"INVITE", b"invite", b"INV1TE", b"sip:a@b", b"sip:a\tb", b"SIP/2.0x", b"SIP/2.00", b"sip/2.0",
                b"", b"x"]
CL_VALUE = st.sampled_from([b"0", b"3", b"10", b"1234567", b"12345678", b"0000003", b"", b" ", b"3 ", b"-1", b"x",
                            b"99999999999999999999999"])


@st.composite
def plain_messages(draw):
    start = b"".join(draw(st.lists(st.sampled_from(START_PIECES), min_size=1, max_size=6)))
    lines = [b"Via: SIP/2.0/UDP h;branch=z9hG4bK1", b"CSeq: 1 INVITE"]
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(lines)))
        lines.insert(at, draw(st.sampled_from([b"Content-Length:", b"l:", b"content-length: "])) + draw(CL_VALUE))
    return b"\r\n".join([start, *lines]) + b"\r\n\r\n" + draw(st.binary(max_size=12))


@SETTINGS
@given(plain_messages())
def test_parse_of_plain_messages_is_the_same_with_and_without_c(data):
    from test_sipscan import _assert_same_both_ways
    _assert_same_both_ways(data)


@pytest.mark.parametrize("start", [b"SIP/2.0 500", b"SIP/2.0 500 ", b"SIP/2.0 180 Ringing", b"OPTIONS sip:a SIP/2.0"])
def test_plain_start_lines_take_the_c_parse(start):
    data = start + b"\r\nCSeq: 1 OPTIONS\r\nContent-Length: 2\r\n\r\nabc"
    got = _sipscan.parse(data, sipmsg._NAME_CACHE, sipmsg.MAX_HEADER_LINES, sipmsg.MAX_CONTENT_LENGTH_DIGITS, True)
    assert got is not None
    assert got[0] == (b"SIP/2.0 500 " if start == b"SIP/2.0 500" else start)  # RFC 3261 §7.2: SP required
    assert got[6:] == (b"ab", True)  # cut to Content-Length (RFC 3261 §18.3)
    assert _sipscan.parse(data, sipmsg._NAME_CACHE, sipmsg.MAX_HEADER_LINES, 7, False)[6:] == (b"abc", False)


def test_the_scan_answers_as_the_name_table_does_after_every_change():
    """The scan keeps the table's answers for the spellings it met; any change of the table (or
    another table) must show at once."""
    data = b"OPTIONS sip:a SIP/2.0\r\nVia: x\r\nTo: y\r\nX-New: 1\r\n\r\n"
    table = {b"Via:": b"via", b"To:": b"to"}
    assert _sipscan.split(data, table, 100) is None  # X-New: is not in the table
    table[b"X-New:"] = b"x-new"
    assert _sipscan.split(data, table, 100)[2] == [b"via", b"to", b"x-new"]
    table[b"Via:"] = b"changed"
    assert _sipscan.split(data, table, 100)[2] == [b"changed", b"to", b"x-new"]
    other = {b"Via:": b"v", b"To:": b"t", b"X-New:": b"n"}
    assert _sipscan.split(data, other, 100)[2] == [b"v", b"t", b"n"]
    assert _sipscan.split(data, table, 100)[2] == [b"changed", b"to", b"x-new"]
    del table[b"To:"]
    assert _sipscan.split(data, table, 100) is None
    table.clear()
    table.update(other)
    assert _sipscan.split(data, table, 100)[2] == [b"v", b"t", b"n"]
    long_name = b"X-" + b"a" * 60 + b":"  # longer than what the cache keeps: looked up each time
    table[long_name] = b"long"
    assert _sipscan.split(data.replace(b"X-New:", long_name), table, 100)[2] == [b"v", b"t", b"long"]


@SETTINGS
@given(VALUE, st.lists(VALUE, max_size=6), VALUE)
def test_serialize(start, lines, body):
    assert _sipscan.serialize(start, lines, body) == b"".join((start, b"\r\n", b"\r\n".join(lines), b"\r\n\r\n",
                                                                 body))


def test_serialize_leaves_other_types_to_the_join():
    assert _sipscan.serialize(b"s", [b"a", bytearray(b"b")], b"") is None
    assert _sipscan.serialize(b"s", (b"a",), b"") is None
    m = SipMessage(b"OPTIONS sip:a SIP/2.0", b"OPTIONS", b"sip:a", 0, [b"To: a", bytearray(b"X: b")], [b"to", b"x"], b"")
    assert m.to_bytes() == b"OPTIONS sip:a SIP/2.0\r\nTo: a\r\nX: b\r\n\r\n"


def _calls(data: bytes, table: dict[bytes, bytes]) -> None:
    """Every C function on one input, on the paths that answer, say None and raise."""
    lines, names = [b"Via: " + data, b"To: x;tag=1", b"CSeq: 1 INVITE"], [b"via", b"to", b"cseq"]
    _sipscan.parse(b"INVITE sip:a SIP/2.0\r\nVia: " + data + b"\r\nContent-Length: 0\r\n\r\n", table, 100, 7, True)
    _sipscan.split(b"SIP/2.0 200 OK\r\nVia: " + data + b"\r\n\r\n", table, 100)
    _sipscan.split_values(data, 2)
    _sipscan.parse_params(data)
    _sipscan.header_tag(data)
    _sipscan.cseq(data)
    _sipscan.via(data)
    _sipscan.get(lines, names, b"to")
    _sipscan.index(names, b"cseq", 0)
    _sipscan.serialize(data, lines, data)
    _sipscan.set_rport(data, 5060)
    try:
        _sipscan.value(data)
    except ValueError:
        pass


LEAK_INPUTS = [b"SIP/2.0/UDP h:5060;branch=z9hG4bK1;rport, SIP/2.0/UDP b", b'"a, b" <sip:x>;tag=y, <z', b"1 INVITE",
               b"X: a\r\n b", b"", b"\xff,\x00,", b";a=1;b;C=3;=4", b"SIP/2.0/UDP h:99999"]


def test_no_reference_or_memory_is_kept():
    """Refcounts of the inputs and of the table's names are back where they were after many
    calls, and memory does not grow with the number of calls."""
    table = {b"Via:": b"via", b"Content-Length:": b"content-length"}

    def calls():
        for data in LEAK_INPUTS:
            _calls(data, table)
    # (b"" and the one-byte bytes are shared by the whole interpreter: their counts move with it)
    watched = [x for x in [*LEAK_INPUTS, *table.values()] if len(x) > 1]
    refs, grown = kept_by(calls, watched, 2000)
    assert refs == [0] * len(watched)
    assert grown < 16_000, grown  # (one object kept per call would be over 16000 objects)


def test_every_odd_byte_at_every_position_of_a_head_is_seen():
    """The scan tests eight bytes at once and skips to the first odd one: an odd byte anywhere in
    the head (here at every position of the RFC 3261 §24.2 F1 head, one at a time) turns the plain
    shape down, and an HT inside a value does not."""
    from test_sipscan import RFC_F1
    head_end = RFC_F1.index(b"\r\n\r\n")
    table = sipmsg._NAME_CACHE
    for odd in (b"\x00", b"\x08", b"\x1f", b"\x7f", b"\x80", b"\xff", b"\r", b"\n"):
        for at in range(head_end):
            data = RFC_F1[:at] + odd + RFC_F1[at:]
            assert _sipscan.split(data, table, 100) is None, (odd, at)
    for at in range(RFC_F1.index(b"CSeq: 1") + 5, RFC_F1.index(b"Contact:") - 2):
        assert _sipscan.split(RFC_F1[:at] + b"\t" + RFC_F1[at:], table, 100) is not None, at


# -- the proxy's MACs (BLAKE2b), hex ids and request fields ----------------------------------------

def blake2b_hex(key: bytes, digest_size: int, sep: bytes, parts) -> bytes | None:
    """The reference: hashlib's keyed BLAKE2b of the joined parts, hex; None for no bytes at all."""
    from binascii import hexlify
    from hashlib import blake2b
    data = sep.join(parts)
    return hexlify(blake2b(data, key=key, digest_size=digest_size).digest()) if data else None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64), st.integers(1, 64), st.sampled_from([b"|", b"", b", "]),
       st.lists(st.one_of(st.binary(max_size=300), st.sampled_from([b"", b"z9hG4bK-1", b"127.0.0.1"])), max_size=6))
def test_mac_hex_is_hashlib_blake2b(key, digest_size, sep, parts):
    state = _sipscan.blake2b_state(key, digest_size)
    want = blake2b_hex(key, digest_size, sep, parts)
    assert _sipscan.mac_hex(state, sep, parts) == want
    assert _sipscan.mac_hex(state, sep, tuple(parts)) == want


@pytest.mark.parametrize("size", [1, 63, 127, 128, 129, 255, 256, 257, 1000])
@pytest.mark.parametrize("key", [b"", b"k", bytes(range(64))])
def test_mac_hex_across_block_boundaries(size, key):
    """A last block that is full, one byte over and one byte short: with a key (whose own block
    comes first) and without."""
    data = bytes(range(256)) * 4
    for parts, sep in (([data[:size]], b""), ([data[:size - 1], b""], b"|"), ([b"a"] * ((size + 1) // 2), b"|")):
        for ds in (6, 32, 64):
            assert _sipscan.mac_hex(_sipscan.blake2b_state(key, ds), sep, parts) == blake2b_hex(key, ds, sep, parts)


def test_mac_hex_refuses_what_it_cannot_use():
    state = _sipscan.blake2b_state(b"key", 6)
    for key, ds in ((b"k" * 65, 6), (b"", 0), (b"", 65), (b"", -1)):
        with pytest.raises(ValueError):
            _sipscan.blake2b_state(key, ds)
    with pytest.raises(ValueError):
        _sipscan.mac_hex(state[:-1], b"|", [b"x"])
    with pytest.raises(ValueError):
        _sipscan.mac_hex(state[:-1] + b"\x00", b"|", [b"x"])  # digest size 0
    with pytest.raises(TypeError):
        _sipscan.mac_hex(state, b"|", iter([b"x"]))
    with pytest.raises(TypeError):
        _sipscan.mac_hex(state, b"|", [b"x", "y"])
    with pytest.raises(TypeError):
        _sipscan.mac_hex(state, "|", [b"x"])
    with pytest.raises(TypeError):
        _sipscan.blake2b_state("key", 6)
    assert _sipscan.mac_hex(state, b"|", []) is None and _sipscan.mac_hex(state, b"", [b"", b""]) is None


def test_the_proxy_macs_are_hashlibs():
    """A ProxyCore's branch MAC and Record-Route MAC are the BLAKE2b digests its hashlib path
    makes (a proxy without the extension, with the same secret, recognises them); the loop tag
    is the interpreter's hash of the fields, compiled or not."""
    from sipwatch import core as core_module
    from sipwatch.core import CoreConfig, ProxyCore
    proxy = ProxyCore(CoreConfig(advertise=("127.0.0.1", 5070), upstream=("127.0.0.1", 5080), secret=b"s3cret"))
    parts = (b"b", b"z9hG4bK-1", b"call-1@gw", b"1", b"tag1", b"10.0.0.1", b"5060", b"10.0.0.2")
    assert proxy._mac_of(parts) == blake2b_hex(proxy.key, 6, b"|", parts)
    assert proxy._party_mac("10.0.0.1") == blake2b_hex(proxy.key, 6, b"|", [b"r", b"10.0.0.1"])
    assert core_module._loop_hash(b"sip:a@b", b"t", b"c", b"1") == hash(b"sip:a@b|t|c|1") & (2 ** 48 - 1)
    proxy.key = bytes(32)  # a key set later (a restarted proxy given the old one) is the one used
    assert proxy._party_mac("10.0.0.1") == blake2b_hex(bytes(32), 6, b"|", [b"r", b"10.0.0.1"])
    assert proxy._mac_of(parts) == blake2b_hex(bytes(32), 6, b"|", parts)


INT = st.one_of(st.integers(-3, 2 ** 130), st.integers(0, 2 ** 64 + 5), st.sampled_from(
    [0, 1, 15, 16, 2 ** 64 - 1, 2 ** 64, 2 ** 128 - 1, 2 ** 128, 2 ** 200, -2 ** 70, True, False]))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=8), INT, st.integers(-1, 34), st.binary(max_size=4))
def test_hex_join(head, value, digits, tail):
    ok = 1 <= digits <= 32 and 0 <= value < 16 ** digits
    want = head + b"%0*x" % (digits, value) + tail if ok else None
    assert _sipscan.hex_join(head, value, digits, tail) == want


def test_hex_join_refuses_other_types():
    for args in ((b"", 1.0, 4, b""), ("", 1, 4, b""), (b"", 1, 4, None), (b"", 1, "4", b"")):
        with pytest.raises(TypeError):
            _sipscan.hex_join(*args)


RPORT_PIECES = PIECES + [b";rport", b";RPORT", b";rPoRt", b";rportx", b";rport=", b";rpor", b"rport;"]


@settings(max_examples=800, deadline=None)
@given(st.lists(st.sampled_from(RPORT_PIECES), max_size=12), st.sampled_from([0, 1, 9, 10, 5060, 65535]))
def test_set_rport(pieces, port):
    value = b"".join(pieces)
    assert _sipscan.set_rport(value, port) == core._set_rport_py(value, port)


def test_set_rport_refuses_what_it_cannot_use():
    assert _sipscan.set_rport(b";rport" * 20000, 5060) == b";rport=5060" + b";rport" * 19999
    for args in ((b"", -1), (b"", 65536), (b"", 2 ** 70)):
        with pytest.raises((ValueError, OverflowError)):
            _sipscan.set_rport(*args)
    for args in (("", 1), (b"", 1.0), (b"", "1")):
        with pytest.raises(TypeError):
            _sipscan.set_rport(*args)


def request_fields_py(lines: list[bytes], names: list[bytes]):
    """The reference for ``request_fields``: what the proxy reads one by one (the Python
    accessors), None where one of them raises or a required header is missing."""
    def first(name):
        return names.index(name) if name in names else -1

    def value(name):
        i = first(name)
        return None if i < 0 else sipmsg._line_value_py(lines[i])
    via_i = first(b"via")
    call_id, cseq, from_v, to_v = value(b"call-id"), value(b"cseq"), value(b"from"), value(b"to")
    if via_i < 0 or not call_id or cseq is None or from_v is None or to_v is None:
        return None
    try:
        number, method = sipmsg._cseq_py(cseq)
    except SipParseError:
        return None
    more = names.index(b"via", via_i + 1) if b"via" in names[via_i + 1:] else -1
    # Max-Forwards as ProxyCore reads it; -1 also for a folded line, which the proxy reads itself
    mf, mf_i = value(b"max-forwards"), first(b"max-forwards")
    hops = -1 if mf is None or lines[mf_i].find(b"\n") >= 0 else int(mf) if mf.isdigit() and len(mf) <= 3 else 256
    return (via_i, sipmsg._line_value_py(lines[via_i]), more, call_id, number, method, from_v, to_v,
            sipmsg._header_tag_py(from_v), sipmsg._header_tag_py(to_v), first(b"max-forwards"), hops, first(b"route"))


REQUEST_NAMES = [b"via", b"call-id", b"cseq", b"from", b"to", b"max-forwards", b"route", b"record-route", b"contact",
                 b"x", b"vi", b"tO"]
MAX_FORWARDS_VALUES = st.sampled_from([b"70", b"0", b" 7 ", b"070", b"255", b"256", b"999", b"1000", b"", b"x", b"-1",
                                       b"\xd9\xa3", b"1\t", b"\x0b9"])
CSEQ_VALUES = st.sampled_from([b"1 INVITE", b" 2  ack ", b"2147483648 BYE", b"1", b"x INVITE", b"", b"12345678901 A"])


@st.composite
def request_headers(draw):
    """The five headers every request needs (each left out now and then), with odd values at
    times, among other and repeated headers, in any order."""
    needed = [(b"via", draw(st.one_of(st.just(b"SIP/2.0/UDP h;branch=z9hG4bK1"), VALUE))),
              (b"call-id", draw(st.one_of(st.just(b"c-1@h"), VALUE))),
              (b"cseq", draw(st.one_of(st.just(b"1 INVITE"), CSEQ_VALUES))),
              (b"from", draw(st.one_of(st.just(b"<sip:a@h>;tag=1"), VALUE))),
              (b"to", draw(st.one_of(st.just(b"<sip:b@h>"), VALUE)))]
    kept = [h for h in needed if draw(st.integers(0, 9))]
    extra = draw(st.lists(st.tuples(st.sampled_from(REQUEST_NAMES), st.one_of(VALUE, CSEQ_VALUES, MAX_FORWARDS_VALUES)),
                          max_size=8))
    return draw(st.permutations(kept + extra))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request_headers())
def test_request_fields(headers):
    names = [n for n, _ in headers]
    lines = [n.title() + b": " + v for n, v in headers]
    got = _sipscan.request_fields(lines, names)
    assert got == request_fields_py(lines, names)
    if got is not None:
        assert [type(x) for x in got] == [int, bytes, int, bytes, int, bytes, bytes, bytes,
                                          type(got[8]), type(got[9]), int, int, int]


def test_request_fields_of_a_parsed_request():
    """RFC 3261 §24.2 F1 and an in-dialog request through a Route: every field as the accessors read it."""
    from test_sipscan import RFC_F1
    m = parse(RFC_F1)
    assert _sipscan.request_fields(m.lines, m.names) == (
        m.index(b"via"), m.value_at(m.index(b"via")), -1, b"3848276298220188511@atlanta.example.com", 1,
        b"INVITE", m.get(b"from"), m.get(b"to"), b"9fxced76sl", None, m.index(b"max-forwards"), 70, -1)
    bye = parse(b"BYE sip:b@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\nVia: SIP/2.0/UDP b\r\n"
                b"Route: <sip:10.0.0.1;lr>\r\nFrom: <sip:a@a>;tag=x\r\nTo: <sip:b@b>;TAG=y\r\n"
                b"Call-ID: c\r\nCSeq: 2 bye\r\nContent-Length: 0\r\n\r\n")
    assert _sipscan.request_fields(bye.lines, bye.names) == (
        0, b"SIP/2.0/UDP a;branch=z9hG4bK1", 1, b"c", 2, b"BYE", b"<sip:a@a>;tag=x", b"<sip:b@b>;TAG=y",
        b"x", b"y", -1, -1, 2)


def test_request_fields_leaves_odd_lists_to_python():
    lines = [b"Via: v", b"Call-ID: c", b"CSeq: 1 A", b"From: f", b"To: t"]
    names = [b"via", b"call-id", b"cseq", b"from", b"to"]
    assert _sipscan.request_fields(lines, names) is not None
    assert _sipscan.request_fields(lines[:4], names) is None  # fewer lines than names
    assert _sipscan.request_fields(lines, names[:4] + [bytearray(b"to")]) is None
    assert _sipscan.request_fields(lines, [*names[:2], b"cseq", b"from", b"t"]) is None
    with pytest.raises(ValueError):
        _sipscan.request_fields([b"Via v", *lines[1:]], names)  # (a parsed line always has its colon)
    with pytest.raises(TypeError):
        _sipscan.request_fields(tuple(lines), names)


def test_no_reference_or_memory_is_kept_by_the_mac_hex_and_field_calls():
    key, parts = b"k" * 32, [b"part-one", b"part-two" * 40]
    lines = [b"Via: SIP/2.0/UDP h;branch=z9hG4bK1", b"Call-ID: c-1", b"CSeq: 1 INVITE", b"From: <sip:a>;tag=f",
             b"To: <sip:b>;tag=t", b"Max-Forwards: 70", b"Route: <sip:r>"]
    names = [b"via", b"call-id", b"cseq", b"from", b"to", b"max-forwards", b"route"]
    big = 2 ** 100 + 12345

    def calls():
        state = _sipscan.blake2b_state(key, 6)
        _sipscan.mac_hex(state, b"|", parts)
        _sipscan.mac_hex(state, b"|", [])
        _sipscan.hex_join(key, big, 32, key)
        _sipscan.hex_join(key, 2 ** 70, 16, key)
        _sipscan.request_fields(lines, names)
        _sipscan.request_fields(lines[:3] + [b"From: x", b"To: y"], names[:5])
        _sipscan.request_fields(lines[:1] + [b"Call-ID: "] + lines[2:], names)
        _sipscan.first_of(names, (b"route", b"x"))
        _sipscan.first_of(names, (b"y", bytearray(b"to")))
        _sipscan.head_end(stream, 0)
        _sipscan.head_end(stream, len(stream))
        _sipscan.content_lengths(stream, len(stream))
        _sipscan.content_lengths(stream, 0)
    stream = bytearray(b"OPTIONS sip:x SIP/2.0\r\nl: 0\r\nContent-Length: 0\r\n\r\n" * 3)
    watched = [key, *parts, *lines, *names, big, stream]
    refs, grown = kept_by(calls, watched, 3000)
    assert refs == [0] * len(watched)
    assert grown < 16_000, grown
