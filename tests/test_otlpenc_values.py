"""The C span assembly (sipwatch/_otlpenc.c) gives what the Python encoder gives, byte for byte.

``SpanEncoder`` runs ``tx_flat``/``call_flat``/``encode`` in C when the extension is built; the
Python methods (``tx_flat_py``, ``call_flat_py``, ``encode_py``) stay the reference, checked
against the SDK in test_otlp_encode.py. Here an encoder with C and one without get the same
record tuples, generated from what the proxy sends and bent in every field: hostile header
text (not UTF-8, control characters, quotes, huge), ids and times at and past their ranges,
figures that round or format unusually, odd events and peers, and fields of the wrong type.
Both must give the same bytes, or both raise the same exception. A frame of such tuples must
give the same spans and the same count of failures, and no reference may be kept.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from sipwatch import __version__, otlp_encode
from sipwatch.masking import CallIdMasker
from sipwatch.otlp_encode import SpanEncoder

pytestmark = pytest.mark.skipif(otlp_encode._otlpenc is None, reason="the C extension sipwatch._otlpenc is not built")

RESOURCE = {"service.name": "sipwatch", "sipwatch.role": "proxy"}
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.data_too_large])
T0 = 1_764_500_000.123456

PIECES = [b'"', b"\\", b"\x00", b"\x01", b"\x08", b"\t", b"\n", b"\x0b", b"\x0c", b"\r", b"\x1f", b"\x7f", b"\x80",
          b"\xff", b"\xc3\xa9", b"\xe2\x80\xa8", b"\xed\xa0\x80", b"\xf0\x9f\x98\x80", b"<", b">", b";tag=", b"sip:",
          b"tel:", b"+4930123456789", b"@", b"10.0.0.1", b":5060", b"/", b"a", b" "]
TEXT = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=16).map(b"".join),
    st.binary(max_size=24),
    st.tuples(st.sampled_from(PIECES), st.integers(1, 5000)).map(lambda t: t[0] * t[1]),  # floods
)
STR = st.one_of(st.text(max_size=12), TEXT.map(lambda b: b.decode("utf-8", "replace")),
                st.sampled_from(["udp", "tcp", "10.0.0.1", "::1", "INVITE"]))
def rarely(unusual, usual, p: int = 12):
    """``usual``, or about once in ``p`` draws ``unusual`` (one_of would take each half the time)."""
    return st.integers(0, p - 1).flatmap(lambda i: unusual if i == p // 2 else usual)


ODD = st.sampled_from([None, True, False, -1, 0, 1.5, "x", b"x", (), [], (1,), [1, 2], {"a": 1}, 2**64, -(2**70)])
ID64 = rarely(st.sampled_from([0, 1, 2**64 - 1, 2**64, -1, True]), st.integers(0, 2**64 - 1), 8)
ID128 = rarely(st.sampled_from([0, 1, 2**128 - 1, 2**128, -1, True]), st.integers(0, 2**128 - 1), 8)
TIME = rarely(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([0.0, -0.0, -1e-10, -0.9e-9, 1.8446744073709552e10, 1.9e10, 1e-9, 5e-324])),
              st.floats(T0, T0 + 100))
DELTA = st.one_of(st.floats(0, 10), st.floats(-1e-3, 1e-3), st.floats(allow_nan=False, allow_infinity=False),
                  st.sampled_from([0.0005, 0.0015, 0.0000004999, 1e-7, 5e-5, 2.5e-4, 123456.7895, 1e12, 1e9, -2e-4]))
STATUS = st.one_of(st.sampled_from([0, 100, 180, 183, 199, 200, 202, 486, 500, 503, 603, 699]), st.integers(-5, 2**65))
PEER = st.one_of(
    st.tuples(STR, st.integers(0, 65535)),
    st.tuples(STR, st.integers(0, 65535), st.sampled_from(["udp", "tcp"])),
    st.tuples(st.tuples(STR, st.integers(0, 65535)), st.tuples(STR, st.integers(0, 65535))),
)
GOOD_EVENT = st.tuples(st.one_of(st.sampled_from([100, 180, 183, 200, 486]), STATUS), TIME)
EVENT = rarely(st.one_of(st.lists(st.one_of(STATUS, TIME), min_size=2, max_size=2),
                         st.tuples(st.sampled_from([200, 300]), ODD), ODD), GOOD_EVENT)


def maybe_odd(strategy, p_odd: int = 24):
    """``strategy``, or about once in ``p_odd`` draws a value of another type."""
    return rarely(ODD, strategy, p_odd)


@st.composite
def tx_tuples(draw):
    t_sent = draw(maybe_odd(TIME))
    start = t_sent if isinstance(t_sent, float) else T0
    t_first = draw(maybe_odd(st.one_of(st.none(), DELTA.map(lambda d: start + d))))
    events = draw(maybe_odd(st.one_of(st.none(), st.lists(EVENT, max_size=4), st.lists(EVENT, max_size=3).map(tuple))))
    span = draw(maybe_odd(ID64))
    return (0, draw(maybe_odd(ID128)), span, draw(maybe_odd(st.one_of(ID64, st.sampled_from([0, None])))),
            draw(maybe_odd(st.one_of(st.sampled_from([b"INVITE", b"BYE", b"ACK", b"OPTIONS"]), TEXT))),
            draw(maybe_odd(st.integers(0, 2**31))), draw(maybe_odd(st.sampled_from([0, 1]))), draw(maybe_odd(PEER)),
            draw(maybe_odd(STATUS)), t_sent, t_first, draw(maybe_odd(DELTA.map(lambda d: start + d))),
            draw(maybe_odd(st.integers(0, 5))), draw(maybe_odd(st.booleans())), events,
            draw(st.one_of(st.just(span), maybe_odd(ID64))), draw(maybe_odd(st.booleans())),
            draw(maybe_odd(TEXT)), draw(maybe_odd(TEXT)), draw(maybe_odd(TEXT)))


@st.composite
def call_tuples(draw):
    t_start = draw(maybe_odd(TIME))
    start = t_start if isinstance(t_start, float) else T0
    rel = DELTA.map(lambda d: start + d)
    t_answer = draw(maybe_odd(st.one_of(st.none(), rel)))
    rtp = draw(rarely(st.sampled_from([{}, {"rtp.streams": 1, "rtp.mos_min": 4.3}]), st.none()))
    return (1, draw(maybe_odd(ID128)), draw(maybe_odd(ID64)), draw(maybe_odd(st.one_of(ID64, st.sampled_from([0, None])))),
            draw(maybe_odd(TEXT)), draw(maybe_odd(TEXT)), draw(maybe_odd(TEXT)), draw(maybe_odd(TEXT)),
            draw(maybe_odd(st.integers(-1, 6))), draw(maybe_odd(STATUS)), t_start,
            draw(maybe_odd(st.one_of(st.none(), rel))), t_answer, draw(maybe_odd(rel)), draw(maybe_odd(st.integers(0, 3))),
            rtp, draw(maybe_odd(st.one_of(st.none(), PEER))), draw(maybe_odd(st.booleans())),
            draw(rarely(st.just(1), st.none(), 16)))


ENCODERS = st.sampled_from(["partial", "none", "full", "digits"])


def encoders(mode: str) -> tuple[SpanEncoder, SpanEncoder]:
    mask = CallIdMasker("digits", b"k") if mode == "digits" else None
    mode = "partial" if mode == "digits" else mode
    c = SpanEncoder(RESOURCE, __version__, mode, mask)
    py = SpanEncoder(RESOURCE, __version__, mode, mask, accelerate=False)
    assert c.accelerated and not py.accelerated
    return c, py


def outcome(f, t):
    try:
        return f(t)
    except Exception as e:  # noqa: BLE001 - compared with the reference's
        return type(e)


@SETTINGS
@given(tx_tuples(), ENCODERS)
def test_tx_spans_are_the_python_bytes(t, mode):
    c, py = encoders(mode)
    want = outcome(py.tx_flat_py, t)
    assert outcome(c.tx_flat, t) == want
    assert outcome(c.tx_flat, t) == want  # again, from the caches the first call filled


@SETTINGS
@given(call_tuples(), ENCODERS)
def test_call_spans_are_the_python_bytes(t, mode):
    c, py = encoders(mode)
    want = outcome(py.call_flat_py, t)
    assert outcome(c.call_flat, t) == want
    assert outcome(c.call_flat, t) == want


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.one_of(tx_tuples(), call_tuples(), ODD, st.tuples(st.just(2), ODD)), max_size=8), ENCODERS)
def test_frames_give_the_same_spans_and_failures(tuples, mode):
    c, py = encoders(mode)
    got, want = ([], []), ([], [])
    assert c.encode(tuples, *got) == py.encode_py(tuples, *want)
    assert got == want


def deliveries(enc, tuples, limit: int, take=None, max_bytes=None) -> tuple[list, int]:
    """(every take of the outbox, failures) of ``tuples`` added ``limit`` spans (or ``max_bytes``
    of protobuf spans) at a time."""
    take = take or enc.take
    out, failed, i = [], 0, 0
    while True:
        i, f = enc.add(tuples, i, limit) if max_bytes is None else enc.add(tuples, i, limit, max_bytes)
        failed += f
        out.append(take(True, True))
        if i >= len(tuples):
            return out, failed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.one_of(tx_tuples(), call_tuples(), ODD, st.tuples(st.just(2), ODD)), max_size=8), ENCODERS,
       st.integers(1, 9), st.one_of(st.none(), st.integers(1, 3000)))
def test_the_outbox_gives_the_joined_request_and_line(tuples, mode, limit, max_bytes):
    """A delivery taken from the outbox (C, and the Python reference) is the request and the
    line ``request``/``json_line`` make of the same spans; each holds at most ``limit`` spans
    (a B2BUA leg's call span and its leg-setup span may cross it by one) and, given
    ``max_bytes``, took no tuple once its protobuf spans reached that size; the failures are
    what ``encode`` counts, and C and Python cut the deliveries alike."""
    c, py = encoders(mode)
    pbs, lines = [], []
    want_failed = py.encode_py(tuples, pbs, lines)
    cuts = []
    for enc in (c, py):
        got, failed = deliveries(enc, tuples, limit, max_bytes=max_bytes)
        assert failed == want_failed
        assert all(n <= limit + 1 for n, _, _ in got) and sum(n for n, _, _ in got) == len(pbs)
        at = 0
        for n, request, line in got:
            if n == 0:
                assert (request, line) == (None, None)
                continue
            assert request == py.request(pbs[at:at + n]) and line == py.json_line(lines[at:at + n])
            if max_bytes is not None and n > 2:  # (the last tuple may have made two spans)
                assert sum(len(pb) for pb in pbs[at:at + n - 2]) < max_bytes
            at += n
        assert enc.held() == 0
        cuts.append([n for n, _, _ in got])
    assert cuts[0] == cuts[1]


def test_the_outbox_builds_only_what_is_wanted_and_empties():
    from test_otlp_encode import proxy_records

    from sipwatch.otlp_encode import call_tuple, tx_tuple
    tuples = [call_tuple(o) if k == "call" else tx_tuple(o) for k, o in proxy_records() if k == "tx" or o.is_call]
    for enc in encoders("digits"):
        assert enc.add(tuples, 0, 10**6) == (len(tuples), 0) and enc.held() == len(tuples)
        n, request, line = enc.take(False, True)
        assert (n, request) == (len(tuples), None) and line.endswith(b"]}]}]}\n") and line.count(b'"traceId"') == n
        assert enc.held() == 0 and enc.take(True, True) == (0, None, None)
        enc.add(tuples, 1, 10**6)
        n, request, line = enc.take(True, False)
        assert n == len(tuples) - 1 and line is None and request.startswith(b"\x0a")


def test_figures_are_rounded_and_written_as_python_and_orjson_do():
    """RTT, setup and answer times (3 places) and durations (6 places) at the edges of the
    shortcut: ties, tiny and huge values, negative zero, what orjson writes in exponent form."""
    c, py = encoders("partial")
    deltas = [0.0, -0.0, 0.0005, 0.0015, 0.0025, 1e-4, 1e-5, 4.9999e-5, 5e-7, 1e-7, 0.1 + 0.2, 2.675, 1.0005,
              999999999.9999995, 1e9, 1e12 - 0.0005, 1e12, 1e15, 1e16, 1e17, 1e300, -1e300, float("inf"), float("nan")]
    deltas += [d / 1000 for d in deltas] + [-d for d in deltas]
    base = (1, 7, 9, 0, b"c", b"<sip:a@b>;tag=1", b"<sip:b@c>", b"sip:b@c", 0, 200)
    for d in deltas:
        for t_start in (T0, 0.0, 1.0):
            call = base + (t_start, t_start + d, t_start + d, t_start + 2 * d, 0, None, None, True, None)
            assert outcome(c.call_flat, call) == outcome(py.call_flat_py, call), d
            tx = (0, 7, 11, 9, b"INVITE", 1, 0, ("10.0.0.2", 5060), 200, t_start, t_start + d, t_start + 1.0, 0,
                  False, [(180, t_start + d)], 9, True, b"c", b"<sip:a@b>;tag=1", b"<sip:b@c>")
            assert outcome(c.tx_flat, tx) == outcome(py.tx_flat_py, tx), d


def test_figures_of_every_magnitude_and_near_every_tie():
    """The C encoder's figures without a decimal string (3 places: RTT, setup, answer; 6:
    duration) against Python's round and orjson: values at every magnitude, decimal ties of the
    last place and the floats next to them, either sign."""
    import math
    import random
    rnd = random.Random(20261204)
    c, py = encoders("partial")
    deltas = [rnd.uniform(-1, 1) * 10 ** rnd.uniform(-8, 9.5) for _ in range(3000)]
    for places in (1e3, 1e6):
        for _ in range(800):
            tie = (rnd.randrange(-10**9, 10**9) + 0.5) / places / (1000 if places == 1e3 else 1)
            deltas += [tie, math.nextafter(tie, math.inf), math.nextafter(tie, -math.inf)]
    base = (1, 7, 9, 0, b"c", b"<sip:a@b>;tag=1", b"<sip:b@c>", b"sip:b@c", 0, 200)
    checked = 0
    for d in deltas:
        # from 0.0 a delta is exact (times before it cannot be sent: both raise); from 1e9 the
        # negative ones are figures too
        for t0 in (0.0, 1e9):
            call = base + (t0, t0 + d, t0 + d, t0 + 2 * d, 0, None, None, True, None)
            want = outcome(py.call_flat_py, call)
            assert outcome(c.call_flat, call) == want, d
            tx = (0, 7, 11, 9, b"INVITE", 1, 0, ("10.0.0.2", 5060), 200, t0, t0 + d, t0 + 1.0, 0,
                  False, None, 9, True, b"c", b"<sip:a@b>;tag=1", b"<sip:b@c>")
            assert outcome(c.tx_flat, tx) == outcome(py.tx_flat_py, tx), d
            checked += isinstance(want, tuple)
    assert checked > len(deltas)  # (most of them made spans, not errors)


def test_each_figure_is_round_and_orjson():
    """A figure straight from the C helper against ``round(x, nd)`` and orjson: decimal ties of
    the last place whose binary value lies just above or below the tie (0.0025 rounds up,
    0.0015 down), the floats next to them, and values at every magnitude and sign."""
    import math
    import random

    import orjson

    from sipwatch import _otlpenc
    rnd = random.Random(4)
    xs = [0.0005, 0.0015, 0.0025, 2.675, 1.0005, 0.1 + 0.2, 1e-4, 9.9995e-5, 5e-7, 0.0, -0.0, 999999.9995]
    xs += [(k + 0.5) / 1000 for k in range(-3000, 3000)] + [(k + 0.5) / 1e6 for k in range(-3000, 3000)]
    xs += [rnd.uniform(-1, 1) * 10 ** rnd.uniform(-8, 12) for _ in range(20000)]
    xs += [math.nextafter(x, d) for x in list(xs) for d in (math.inf, -math.inf)]
    for x in xs:
        for nd in (3, 6):
            r = round(x, nd)
            got = _otlpenc.figure(x, nd, SpanEncoder.round_json)
            assert got == (r, orjson.dumps(r)) and math.copysign(1, got[0]) == math.copysign(1, r), (x, nd)


def test_hostile_header_text_of_any_size():
    """Call-IDs and URIs with every control byte, quotes, invalid UTF-8 and megabytes of it: the
    lengths in the protobuf and the JSON escaping are the reference's."""
    c, py = encoders("none")
    every = bytes(range(256))
    for text in (every, every * 64, b'"\\' * 70000, b"\xff" * 100000, b"x" * 16383, b"x" * 16384, b"x" * 2097152):
        tx = (0, 5, 6, 0, text, 1, 0, (text.decode("latin-1"), 5060), 200, T0, T0 + 0.5, T0 + 1.0, 1, False,
              [(183, T0 + 0.1)], 6, False, text, text, text)
        call = (1, 5, 7, 0, text, text, text, text, 2, 486, T0, None, None, T0 + 1, 0, None, (text.decode("latin-1"), 1, "tcp"), True, None)
        assert outcome(c.tx_flat, tx) == outcome(py.tx_flat_py, tx)
        assert outcome(c.call_flat, call) == outcome(py.call_flat_py, call)


def test_refused_shapes_raise_and_are_counted():
    """What the proxy never sends raises TypeError/ValueError (or what Python raises for it) and
    is counted by a frame, which goes on with the next tuple."""
    c, _ = encoders("partial")
    good = (0, 5, 6, 0, b"BYE", 2, 1, ("10.0.0.1", 5060), 200, T0, T0 + 0.1, T0 + 0.1, 0, False, [], 6, True,
            b"c", b"f", b"t")
    with pytest.raises((ValueError, struct.error)):
        c.tx_flat(good[:9] + (-1.0,) + good[10:])  # a time before 1970: no unsigned nanoseconds
    with pytest.raises(TypeError):
        c.tx_flat(good[:5] + ([1],) + good[6:])  # unhashable: not a CSeq
    with pytest.raises((TypeError, ValueError)):
        c.tx_flat(good[:-1])
    pbs, lines = [], []
    assert c.encode([good, (0,), "x", None, good[:9] + (float("nan"),) + good[10:], good], pbs, lines) == 4
    assert len(pbs) == len(lines) == 2 and pbs[0] == pbs[1]
    with pytest.raises(TypeError):
        c.encode((good,), pbs, lines)


def test_no_reference_or_memory_is_kept():
    """Refcounts of a frame's values are back where they were after many encodings (the C path,
    its Python fallbacks and its errors), and memory does not grow with the number of spans."""
    import gc
    import sys
    import tracemalloc
    c, _ = encoders("partial")
    cid, frm, to, ruri = b"call-" + b"7" * 40, b"<sip:+4930123@h>;tag=x" * 2, b"<sip:+4940987@h>" * 2, b"sip:+49@h" * 2
    events = [(100, T0 + 0.001), (180, T0 + 0.01), (200, T0 + 0.02)]
    peer = ("10.0.0.2", 5060)
    frame = [(0, 12345678901234567890, 11, 22, b"INVITE", 1, 0, peer, 200, T0, T0 + 0.001, T0 + 0.02, 1, False,
              events, 22, True, cid, frm, to),
             (0, 12345678901234567890, 12, 22, b"BYE", 2, 1, peer, 503, T0 + 1, None, T0 + 1.1, 0, False, None, 22,
              False, cid, frm, to),
             (1, 12345678901234567890, 22, 0, cid, frm, to, ruri, 0, 200, T0, T0 + 0.01, T0 + 0.02, T0 + 1.5, 2,
              None, peer, True, None),
             (1, 12345678901234567890, 23, 5, cid, frm, to, ruri, 0, 200, T0, None, None, T0 + 1.5, 0,
              {"rtp.streams": 2}, peer, True, None),
             (0, -1, 11, 22, b"INVITE", 1, 0, peer, 200, -5.0, None, T0, 0, False, None, 22, True, cid, frm, to),
             (0, 1, 11, 22, [b"unhashable"], 1, 0, peer, 200, T0, None, T0, 0, False, None, 22, True, cid, frm, to)]
    for _ in range(3):
        c.encode(frame, [], [])
    gc.collect()
    watched = [cid, frm, to, ruri, events, peer, *frame]
    before = [sys.getrefcount(x) for x in watched]
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    for _ in range(600):
        pbs, lines = [], []
        assert c.encode(frame, pbs, lines) == 2
        for t in frame[:4]:
            (c.tx_flat if t[0] == 0 else c.call_flat)(t)
    del pbs, lines, t
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    assert [sys.getrefcount(x) for x in watched] == before
    assert grown < 64_000, grown  # (an object kept per span: 4800 objects, well over 64 kB)


def test_the_encoder_and_its_c_part_are_collected():
    """The C part holds the encoder's methods and the encoder holds the C part: a cycle the
    collector must be able to break (the tests make many encoders)."""
    import gc
    import weakref
    c, _ = encoders("partial")
    ref = weakref.ref(c)
    del c
    gc.collect()
    assert ref() is None


def test_the_proxy_records_take_the_c_path():
    """The tuples the proxy sends (its Tracker's records, a call's parent None or 0) are
    assembled in C, not handed back to the Python methods (which fail here if called)."""
    from test_otlp_encode import proxy_records

    from sipwatch import _otlpenc
    from sipwatch.otlp_encode import call_tuple, tx_tuple

    enc = SpanEncoder(RESOURCE, __version__, "partial", CallIdMasker("digits", b"k"), accelerate=False)

    def refuse(*args):
        raise AssertionError(f"Python path taken for {args[0]!r}")
    enc.tx_flat_py = enc.call_flat_py = enc.encode_py = refuse
    c = _otlpenc.Encoder(enc)
    tuples = [call_tuple(o) if k == "call" else tx_tuple(o) for k, o in proxy_records()
              if k == "tx" or o.is_call]
    tuples += [t[:3] + (None,) + t[4:] for t in tuples if t[0] == 1]
    pbs, lines = [], []
    assert c.frame(tuples, pbs, lines) == 0 and len(pbs) == len(tuples)
    assert len({t[0] for t in tuples}) == 2


# From/To heads the C encoder remembers the masking of (SIPp's caller, numbers in the display
# name, the user part and a header parameter, invalid UTF-8 right before the tag) and values it
# must not remember (not one name-addr: the tag may then be part of what is masked)
HEADS = [b'"sipp" <sip:sipp@127.0.0.1:5061>', b'"+49 30 1234567" <sip:+4930123456789@10.0.0.1>;x=1234567',
         b"<sip:1234567@h;user=phone>", b"\xff\xe2\x82 <sip:+4930123456@h>", b"<sip:555123456@h>\xe2\x82",
         b"<tel:+4930123456>;p=98765", b"sip:4930123456@h", b"a:b <sip:1234567@h>", b"<sip:1@h>, <sip:1234567@h>",
         b"<sip:1234567@h", b"+4930123456", b"x;tag=1 <sip:1234567@h>", b"", b" "]
TAGS = [b"1", b"123456789", b"abc-98765", b"", b"\xff\xfe", b"\xe2\x82", b"\xc3\xa9", b"a;b", b"x?y", b"a&b", b"a,b",
        b"x;tag=55555", b"<sip:7654321@h>", b"=12345",
        b"sip:" * 255, b"9" * 1010, b"1" * 990 + b"\xe2\x82\xac" * 10]  # (the whole value past masking.SHOWN_MAX)


def test_masked_heads_give_what_mask_uri_gives():
    """A From or To whose head repeats with a new tag every call masks through the C encoder's
    remembered heads: each span holds exactly what ``mask_uri`` gives for the whole value (and
    the Python reference's bytes), for hostile heads and tags, the head seen first or again."""
    import orjson

    from sipwatch.masking import mask_uri
    for mode in ("partial", "full", "none"):
        c, py = encoders(mode)
        trace_id = 1
        for rnd in range(2):
            for head in HEADS:
                for tag in TAGS if rnd == 0 else TAGS[::-1]:
                    value = head + b";tag=" + tag
                    trace_id += 1
                    call = (1, trace_id, 9, 0, b"c", value, value, b"sip:b@c", 0, 200, T0, T0 + 0.1, T0 + 0.2,
                            T0 + 1.0, 0, None, None, True, None)
                    got = c.call_flat(call)
                    assert got == py.call_flat_py(call), (mode, value)
                    attrs = {a["key"]: a["value"]["stringValue"] for a in orjson.loads(got[1])["attributes"]
                             if a["key"] in ("sip.from", "sip.to")}
                    want = mask_uri(value, mode)
                    assert attrs == {"sip.from": want, "sip.to": want}, (mode, value)
        remembered = c._masked_heads
        assert HEADS[0] in remembered and HEADS[1] in remembered  # the memo is in use
        assert not {b"sip:4930123456@h", b"a:b <sip:1234567@h>", b"<sip:1@h>, <sip:1234567@h>",
                    b"<sip:1234567@h"} & set(remembered)  # not one name-addr: never remembered


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(TEXT, st.lists(TEXT, min_size=1, max_size=6), ENCODERS)
@example(b"<>", [b"", b"sip:" * 255], "partial")  # a remembered head, then a value mask_uri cuts
def test_any_head_with_changing_tags_masks_as_mask_uri(head, tags, mode):
    c, py = encoders(mode)
    for i, tag in enumerate(tags * 2):
        value = head + b";tag=" + tag
        call = (1, 100 + i, 9, 0, b"c", value, value, b"sip:b@c", 0, 200, T0, T0 + 0.1, T0 + 0.2, T0 + 1.0, 0, None,
                None, True, None)
        assert outcome(c.call_flat, call) == outcome(py.call_flat_py, call), value


def test_a_party_found_by_trace_id_is_that_of_the_same_values():
    """A call's party is looked up by its trace id: spans that share a trace id but not the
    Call-ID, From or To (a peer reusing ids, equal copies, an odd type) get the party of their
    own values: the reference's bytes, the From and To that mask_uri gives for them."""
    import orjson

    from sipwatch.masking import mask_uri
    c, py = encoders("digits")
    tx = (0, 7, 11, 9, b"INVITE", 1, 0, ("10.0.0.2", 5060), 200, T0, T0 + 0.01, T0 + 0.02, 0, False, [], 9, True)
    parties = [(b"c1", b"<sip:+4930123456@h>;tag=1", b"<sip:+4940987654@h>"),
               (b"c1", b"<sip:+4930123456@h>;tag=2", b"<sip:+4940987654@h>"),
               (b"c2", b"<sip:+4930123456@h>;tag=2", b"<sip:+4940987654@h>"),
               (b"c2", b"<sip:+4930123456@h>;tag=2", b"<sip:+4940987655@h>"),
               (bytes(bytearray(b"c2")), bytes(bytearray(b"<sip:+4930123456@h>;tag=2")), b"<sip:+4940987655@h>"),
               (b"c2", "<sip:+4930123456@h>;tag=2", b"<sip:+4940987655@h>"),
               (b"c2", b"<sip:+4930123456@h>;tag=2", b"<sip:+4940987655@h>"),
               (b"c1", b"<sip:+4930123456@h>;tag=1", b"<sip:+4940987654@h>")]
    frame = []
    for trace_id in (7, 8, 7):
        for p in parties:
            frame.append(tx[:1] + (trace_id,) + tx[2:] + p)
            frame.append((1, trace_id, 9, 0, *p, b"sip:b@c", 0, 200, T0, T0 + 0.1, T0 + 0.2, T0 + 1.0, 0, None, None,
                          True, None))
    got, want = ([], []), ([], [])
    assert c.encode(frame, *got) == py.encode_py(frame, *want) == 0
    assert got == want
    for t, line in zip(frame, got[1]):
        if t[0] == 1:
            attrs = {a["key"]: a["value"]["stringValue"] for a in orjson.loads(line)["attributes"]
                     if a["key"] in ("sip.from", "sip.to")}
            assert attrs == {"sip.from": mask_uri(t[5]), "sip.to": mask_uri(t[6])}


def test_masked_heads_pause_when_they_do_not_come_back():
    """Callers whose number changes with every call (SIPp's ``[call_number]`` in the user part)
    never repeat a head: once the remembered heads fill up without hits, values go straight to
    mask_uri for a while, and every span still holds what mask_uri gives."""
    import orjson

    from sipwatch import masking
    c, _ = encoders("partial")

    def masked_from(value: bytes, trace_id: int) -> str:
        call = (1, trace_id, 9, 0, b"c", value, b"<sip:b@c>", b"sip:b@c", 0, 200, T0, T0 + 0.1, T0 + 0.2, T0 + 1.0,
                0, None, None, True, None)
        attrs = orjson.loads(c.call_flat(call)[1])["attributes"]
        return next(a["value"]["stringValue"] for a in attrs if a["key"] == "sip.from")
    n = 4200
    for i in range(n):
        value = b'"Caller" <sip:+49301234%07d@127.0.0.1:5061>;tag=%dSIPpTag00%d' % (i, i, i)
        assert masked_from(value, i + 1) == masking.mask_uri(value)
    for i in range(50):  # a head that repeats, while the heads are paused: not remembered, masked alike
        value = b'"sipp" <sip:5551234567@127.0.0.1:5061>;tag=%d' % i
        assert masked_from(value, n + i + 1) == masking.mask_uri(value)
    assert len(c._masked_heads) == 1  # (the head stored when the full heads were emptied)


# -- call summary lines (the span worker writes them; sipwatch.logs.JsonLog.call_summary_of) ----
@st.composite
def summary_tuples(draw):
    t_start = draw(maybe_odd(TIME))
    start = t_start if isinstance(t_start, float) else T0
    rel = DELTA.map(lambda d: start + d)
    tx = st.tuples(maybe_odd(st.one_of(st.sampled_from([b"INVITE", b"ACK", b"BYE"]), TEXT)),
                   maybe_odd(st.integers(0, 2**31)), maybe_odd(STATUS), maybe_odd(rel),
                   maybe_odd(st.one_of(st.none(), rel)), maybe_odd(st.one_of(st.none(), rel)),
                   maybe_odd(st.integers(0, 7)), maybe_odd(st.booleans()), maybe_odd(STR))
    legs = st.tuples(st.lists(TEXT, min_size=1, max_size=3), st.integers(1, 3), st.sampled_from([None, "x-cid"]), rel)
    return (draw(maybe_odd(TEXT)), draw(maybe_odd(ID128)), draw(maybe_odd(rel)), draw(maybe_odd(st.integers(-1, 12))),
            draw(maybe_odd(STATUS)), t_start, draw(maybe_odd(st.one_of(st.none(), rel))),
            draw(maybe_odd(st.one_of(st.none(), rel))), draw(maybe_odd(st.integers(0, 3))), draw(maybe_odd(TEXT)),
            draw(maybe_odd(TEXT)), draw(maybe_odd(TEXT)), draw(maybe_odd(st.sampled_from([None, "bye", "shutdown"]))),
            draw(maybe_odd(st.lists(maybe_odd(tx), max_size=4))), draw(rarely(legs, st.none())))


def summary_lines(tuples, mode: str, c_writer) -> tuple[bytes, list]:
    """What a JsonLog writes of ``tuples`` (and the errors it counts), with the C writer or not."""
    import io

    from sipwatch import logs
    mask = CallIdMasker("digits", b"k") if mode == "digits" else None
    out, errors = io.BytesIO(), []
    saved, logs._c_summary_line = logs._c_summary_line, c_writer
    try:
        log = logs.JsonLog("sw \"x\"", stream=out, mask_mode="partial" if mode == "digits" else mode,
                           clock=lambda: T0, call_id_mask=mask, on_error=lambda c, e: errors.append(c))
        log.summaries_of(list(tuples))
        log.flush()
    finally:
        logs._c_summary_line = saved
    return out.getvalue(), errors


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(summary_tuples(), min_size=1, max_size=4), ENCODERS)
def test_summary_lines_are_the_reference_bytes(tuples, mode):
    """The C summary writer gives the line the dict and orjson give, byte for byte, or leaves
    the tuple to them: hostile header text, times and figures at their edges, odd types in any
    field, B2BUA legs; the same errors are counted."""
    import re

    from sipwatch import logs
    assert logs._c_summary_line is not None
    got, want = summary_lines(tuples, mode, logs._c_summary_line), summary_lines(tuples, mode, None)
    # (both take the timestamp from logs._stamp, which gives the time of now to a call's end it
    # cannot show: that one differs between the two runs)
    now = re.compile(rb'^\{"timestamp":"[^"]*"', re.M)
    assert (now.sub(b"", got[0]), got[1]) == (now.sub(b"", want[0]), want[1])


def test_the_proxy_summaries_take_the_c_writer():
    """The summaries of real call flows are written by the C writer (the dict path, which would
    raise here, is never taken), and they are the reference's lines."""
    from test_otlp_encode import proxy_records

    import orjson

    from sipwatch import logs, summary
    from sipwatch.handoff import summary_tuples as tuples_of
    calls = [o for k, o in proxy_records() if k == "call" and o.is_call]
    tuples = tuples_of(calls, None)
    want = summary_lines(tuples, "digits", None)

    def refuse(*args):
        raise AssertionError("dict path taken")
    saved, logs.summary_fields_of = logs.summary_fields_of, refuse
    try:
        got = summary_lines(tuples, "digits", logs._c_summary_line)
    finally:
        logs.summary_fields_of = saved
    assert got == want and got[0].count(b"\n") == len(calls) >= 1 and got[1] == []
    first = orjson.loads(got[0].split(b"\n")[0])
    assert first["timestamp"] == logs._stamp(None, calls[0].t_end) and first["transactions"][0]["method"] == "INVITE"
    assert summary.summary_fields_of is not refuse


def test_json_strings_escape_every_byte_at_every_offset():
    """The C writer finds clean runs of a JSON string 8 bytes at a time: each byte that needs an
    escape (controls, quote, backslash), and bytes around them that do not (0x7f, UTF-8), at every
    offset of strings that end inside, at and past a word, are written as orjson writes them."""
    from test_otlp_encode import proxy_records

    from sipwatch import logs
    from sipwatch.handoff import summary_tuples as tuples_of
    call = next(o for k, o in proxy_records() if k == "call" and o.is_call)
    base = tuples_of([call], None)[0]
    specials = [bytes((b,)) for b in range(0x20)] + [b'"', b"\\", b"\x7f", b"\xc3\xa9", b" "]
    tuples = []
    for length in (1, 7, 8, 9, 15, 16, 17, 24, 25):
        for at in range(length):
            for sp in specials:
                text = (b"ab" * length)[:at] + sp + b"x" * (length - at - 1)
                tuples.append(base[:9] + (text, text + b"\\" + sp, sp * at) + base[12:])
    got = summary_lines(tuples, "none", logs._c_summary_line)
    want = summary_lines(tuples, "none", None)
    assert got == want and got[0].count(b"\n") == len(tuples) and got[1] == []


# -- the hand-off's packed frames ------------------------------------------------------------------
PACKABLE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.integers(0, 2**128 - 1),
              st.integers(2**63 - 2, 2**63 + 1), st.integers(2**64 - 2, 2**64 + 1), st.integers(2**63, 2**64 - 1),
              st.floats(allow_nan=False), st.sampled_from([-0.0, float("inf"), -float("inf")]), st.binary(max_size=40),
              st.text(max_size=20), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.lists(inner, max_size=6).map(tuple)),
    max_leaves=40)


def same(a, b) -> bool:
    """Equal and of the same types all the way down (True is not 1, -0.0 not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return a == b


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(PACKABLE)
def test_packed_frames_give_back_what_was_packed(value):
    """Every value of the kinds the tuples hold comes back equal and type for type."""
    from sipwatch import _otlpenc
    packed = _otlpenc.pack_frame(value)
    assert type(packed) is bytes and same(_otlpenc.unpack_frame(packed), value)
    assert same(_otlpenc.unpack_frame(bytearray(packed)), value)


def test_values_read_again_are_shared_and_never_mistaken_for_one_another():
    """The read's memo: a short bytes, ASCII str or int met again (a call's trace id, Call-ID and
    From in each of its records) comes back as the object made the first time. Values of the same
    bytes under another type, values that share a memo slot, and values at each limit of what is
    kept (small ints, 192 bytes, str that is not ASCII, floats) all come back equal, type for type,
    in any order, over many frames."""
    import random

    from sipwatch import _otlpenc
    first = _otlpenc.unpack_frame(_otlpenc.pack_frame((b"4242-1@10.0.0.1", "INVITE", 2**100 + 7, 5060)))
    again = _otlpenc.unpack_frame(_otlpenc.pack_frame([(b"4242-1@10.0.0.1", "INVITE", 2**100 + 7, 5060)]))[0]
    assert all(x is y for x, y in zip(first, again))
    rng = random.Random(11)
    pool: list = [b"", "", b"abc", "abc", b"\x00" * 8, 0, 256, 257, -5, -6, 2**63 - 1, -(2**63), 2**63, 2**64 - 1,
                  2**64, 2**128 - 1,
                  int.from_bytes(b"\x00" * 8, "little"), b"x" * 192, b"x" * 193, "x" * 192, "x" * 193, "Zo\u00eb",
                  "Zo\u00eb" * 60, b"Zo\xc3\xab", 1.5, -0.0, True, False, None]
    pool += [rng.randbytes(rng.randrange(1, 24)) for _ in range(3000)]
    pool += ["".join(rng.choice("abc;=@<>") for _ in range(rng.randrange(1, 24))) for _ in range(3000)]
    pool += [rng.randrange(-(2**63), 2**63) for _ in range(3000)] + [rng.randrange(2**64, 2**128) for _ in range(1000)]
    pool += [rng.randrange(2**63, 2**64) for _ in range(1000)]  # (span ids: half of them past 2**63)
    for _ in range(40):
        frame = [rng.choice(pool) for _ in range(2000)]
        frame.append(tuple(rng.choice(pool) for _ in range(20)))
        assert same(_otlpenc.unpack_frame(_otlpenc.pack_frame(frame)), frame)


def test_small_tuples_read_again_are_shared_and_never_mistaken_for_one_another():
    """A peer, (host, port), comes with every span: a small tuple of short scalars read again is
    the object made the first time. Tuples that differ only in a type (str or bytes host, int or
    float port, True or 1), hold a float, a tuple or more than four items, or pack to more than
    48 bytes are read as they were packed, equal and type for type, in any order; a tuple holding
    bytes that are not UTF-8 under the str tag is still refused."""
    import random

    from sipwatch import _otlpenc
    peer = ("10.0.0.2", 5060)
    first = _otlpenc.unpack_frame(_otlpenc.pack_frame([peer]))[0]
    again = _otlpenc.unpack_frame(_otlpenc.pack_frame([(0, peer), peer]))
    assert first == peer and again[0][1] is first and again[1] is first
    kin = [("10.0.0.2", 5060), (b"10.0.0.2", 5060), ("10.0.0.2", 5060.0), ("10.0.0.2", 5060, "udp"), ("10.0.0.2",),
           (True, 1), (1, True), (1, 1), (None, 0), (False, 0), (), ("a" * 30,), ("a" * 40,), (1, 2, 3, 4), (1, 2, 3, 4, 5),
           (("10.0.0.2", 5060), ("10.0.0.1", 5060)), (2**100, 1), (-5, 256), ("Zo\u00eb", 1), (b"Zo\xc3\xab", 1)]
    rng = random.Random(5)
    kin += [(rng.choice(["10.0.0.%d" % i for i in range(300)]), rng.randrange(65536)) for _ in range(3000)]
    for _ in range(30):
        frame = [rng.choice(kin) for _ in range(2000)]
        assert same(_otlpenc.unpack_frame(_otlpenc.pack_frame(frame)), frame)
    bad = bytearray(_otlpenc.pack_frame([("ab", 1)]))
    bad[bad.index(b"ab")] = 0xFF  # the str's first byte: not UTF-8
    with pytest.raises(ValueError):
        _otlpenc.unpack_frame(bytes(bad))


def test_spans_of_reused_and_fresh_key_objects_are_the_python_bytes():
    """The C encoder answers its hop, final, event and call-part lookups from the last objects it
    saw (by address) before the dicts. Spans whose peer, method and status are the very objects
    of an earlier span, equal copies of them, or new values made right after the earlier ones
    were freed (CPython hands the same addresses out again) must all give the Python encoder's
    bytes: a table that did not keep its objects alive would mistake the new ones for the old."""
    import gc

    c, py = encoders("partial")
    base = (0, 2**100 + 1, 7, 3, b"INVITE", 1, 0, ("10.0.0.2", 5060), 200, T0, T0 + 0.001, T0 + 0.05, 0, False,
            ((100, T0 + 0.001), (180, T0 + 0.01), (200, T0 + 0.05)), 3, True, b"1-1@h", b"<sip:1@h>;tag=1", b"<sip:2@h>")
    for i in range(400):
        host = "10.0.%d.%d" % (i % 7, i % 5)  # a new str and tuple each time, the last ones just freed
        peer = (host, 5060 + i % 3)
        method = [b"INVITE", b"BYE", b"ACK", bytes(b"OPT" + b"IONS")][i % 4]
        status = [200, 486, 0, 100000 + i % 2][i % 4]
        t = base[:4] + (method, i % 3, i % 2, peer, status) + base[9:]
        want = py.tx_flat_py(t)
        assert c.tx_flat(t) == want
        assert c.tx_flat(tuple(t)) == want  # the very objects again
        del t, peer, host
        gc.collect()
    call = (1, 2**100 + 1, 3, 0, b"1-1@h", b"<sip:1@h>;tag=1", b"<sip:2@h>", b"sip:2@h", 0, 200, T0, T0 + 0.01,
            T0 + 0.05, T0 + 2.0, 0, None, ("10.0.0.2", 5060), True, None)
    for i in range(200):
        t = call[:8] + (i % 6, [200, 486, 503, 0][i % 4]) + call[10:16] + (("10.0.%d.1" % (i % 9), 5060),) + call[17:]
        assert c.call_flat(t) == py.call_flat_py(t)


def test_what_the_packing_does_not_take_is_left_to_marshal():
    """Another type, a subclass, an int past the two ranges, a str with a lone surrogate, a nesting
    too deep: pack_frame answers None, and the frame is written with marshal and reads back."""
    import enum
    import marshal

    from sipwatch import _otlpenc, span_worker

    class Kind(enum.IntEnum):
        A = 1
    deep: object = 1
    for _ in range(20):
        deep = (deep,)
    for odd in (2**128, -(2**63) - 1, "\ud800", 1.5j, {1: 2}, bytearray(b"x"), Kind.A, deep, [1, (2, {3})]):
        assert _otlpenc.pack_frame(odd) is None, odd
    for odd in (2**128, "\ud800", deep):  # (marshal refuses the IntEnum too)
        frame = span_worker.records_frame([odd])
        assert frame[4] == span_worker.F_RECORDS and marshal.loads(frame[5:]) == [odd]
        assert span_worker._read_frame(frame[4], frame[5:]) == (span_worker.F_RECORDS, [odd])
    frame = span_worker.records_frame([(0, 2**127, None, 1.5)])
    assert frame[4] == span_worker.F_PACKED_RECORDS
    assert span_worker._read_frame(frame[4], frame[5:]) == (span_worker.F_RECORDS, [(0, 2**127, None, 1.5)])


def test_each_int_packs_in_the_narrowest_width_that_holds_it():
    """A tag and 8 bytes up to 2**64 - 1 (signed below 2**63, unsigned from there: half of all
    span ids), a tag and 16 bytes up to 2**128 - 1 (trace ids), nothing past that; at every
    boundary (the pack decides the width before it converts: a call returning with an exception
    left set would raise SystemError here)."""
    from sipwatch import _otlpenc
    widths = {0: 9, 2**63 - 1: 9, -(2**63): 9, 2**63: 9, 2**64 - 1: 9, 2**64: 17, 2**100 + 5: 17, 2**128 - 1: 17}
    for n, size in widths.items():
        packed = _otlpenc.pack_frame(n)
        assert len(packed) == size and _otlpenc.unpack_frame(packed) == n, n
    assert _otlpenc.pack_frame(2**128) is None and _otlpenc.pack_frame(2**200) is None


def test_damaged_packed_frames_raise_value_error_and_cost_what_they_hold():
    """Cut anywhere, a byte changed anywhere, or a count far beyond the bytes left: ValueError
    (or another value that was packed), never a crash; a count is checked before anything is
    made, so a few bytes cannot make the worker allocate gigabytes."""
    import random

    from sipwatch import _otlpenc
    rng = random.Random(7)
    value = [(0, 2**100 + 5, -3, 2**64 - 1, 1.25, b"INVITE", "udp", None, True, [(180, 1.5)], ("10.0.0.1", 5060))] * 3
    packed = _otlpenc.pack_frame(value)
    for cut in range(len(packed)):
        with pytest.raises(ValueError):
            _otlpenc.unpack_frame(packed[:cut])
    with pytest.raises(ValueError):
        _otlpenc.unpack_frame(packed + b"\x01")
    for _ in range(3000):
        damaged = bytearray(packed)
        damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            _otlpenc.unpack_frame(bytes(damaged))
        except ValueError:
            pass
    for tag in (9, 10):  # a tuple, a list, of 2^32-1 items with none there
        with pytest.raises(ValueError):
            _otlpenc.unpack_frame(bytes((tag,)) + b"\xff\xff\xff\xff" + b"\x01" * 8)
    nested = b"\x0a\x01\x00\x00\x00" * 10000 + b"\x01"  # lists 10000 deep
    with pytest.raises(ValueError):
        _otlpenc.unpack_frame(nested)
    for junk in (b"", b"\x00", b"\x0b", b"\x0b\x00", b"\x0c", bytes(range(256))):
        with pytest.raises(ValueError):
            _otlpenc.unpack_frame(junk)
