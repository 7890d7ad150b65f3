"""The C HEP encoder and Call-ID search (``sipwatch._hepenc``) change nothing but the cost.

``Hep3Encoder.encode`` and ``hep_sender.call_id_of`` take the C functions when they are built and
their Python bodies (``_encode_py``, ``_call_id_py``) otherwise. Both ways are run on the same
generated input and must give the same bytes, or both refuse (HepError): times on every edge of
the rounding to microseconds and of the uint32 fields, ids out of range, packets around 65535
bytes; message heads with each spelling of the three header names, values with whitespace and
CR/LF around them, longer than 256 bytes, heads past 8192 bytes, no blank line, bytes that are not
ASCII. Every packet is also decoded back (``parse_hep``) to the fields it was given.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from sipwatch import hep, hep_sender
from sipwatch.hep import HepError, HepPacket, Hep3Encoder, parse_hep

needs_c = pytest.mark.skipif(hep._hepenc is None, reason="the C extension sipwatch._hepenc is not built")


def both(enc: Hep3Encoder, payload, src, dst, ts, proto, ptype, corr):
    """(C result, Python result): bytes, or the exception class each raised."""
    head = enc._addresses(src, dst, proto)
    out = []
    for fn in (lambda: enc.encode(payload, src, dst, ts, proto, ptype, corr),
               lambda: enc._encode_py(head, payload, ts, ptype, corr)):
        try:
            out.append(fn())
        except HepError:
            out.append(HepError)
        except Exception as exc:  # noqa: BLE001 - the Python packs may raise struct.error
            out.append(type(exc))
    return out


TIMES = [0.0, -0.0, 1e-9, -1e-9, -0.4e-6, -0.6e-6, 0.5e-6, 1.5e-6, 2.5e-6, 0.9999995, 0.99999949,
         1764700000.123456, 1764700000.9999996, 4294967295.0, 4294967295.4999, 4294967295.9999996,
         4294967296.0, -1.0, -0.5, 1e300, 2 ** 31 + 0.5e-6, 17.000000499999999]


@needs_c
@settings(max_examples=400, deadline=None)
@given(payload=st.one_of(st.binary(max_size=300), st.sampled_from([b"", b"x" * 65400, b"y" * 65600])),
       ts=st.one_of(st.sampled_from(TIMES), st.floats(min_value=-2.0, max_value=5e9, allow_nan=False),
                    st.integers(0, 2 ** 32 + 2).map(lambda n: n + 0.5e-6)),
       ptype=st.sampled_from([0, 1, 5, 100, 255, 256, -1]),
       capture_id=st.sampled_from([0, 2001, 2 ** 32 - 1, 2 ** 32, -1]),
       corr=st.one_of(st.binary(max_size=80), st.just(b"c" * 300)),
       auth=st.sampled_from([b"", b"secret"]), node=st.sampled_from([b"", b"node-1"]),
       v6=st.booleans(), proto=st.sampled_from([hep.PROTO_UDP, hep.PROTO_TCP]))
def test_c_encoder_gives_the_python_encoders_bytes(payload, ts, ptype, capture_id, corr, auth, node, v6,
                                                   proto):
    try:
        enc = Hep3Encoder(capture_id, auth, node)
    except Exception:  # noqa: BLE001 - an encoder that cannot even be built
        return
    src, dst = (("2001:db8::1", 5060), ("::1", 5070)) if v6 else (("192.0.2.1", 5060), ("127.0.0.1", 5070))
    c, py = both(enc, payload, src, dst, ts, proto, ptype, corr)
    if isinstance(py, bytes):
        assert c == py
        p = parse_hep(c)
        assert type(p) is HepPacket and p.payload == payload and (p.correlation_id or b"") == corr
        assert p.payload_type == ptype and p.capture_id == capture_id and p.src == src and p.dst == dst
    else:  # refused both ways (the Python packs raise struct.error where C says HepError)
        assert c is HepError, (c, py)


@needs_c
def test_c_encoder_rounding_and_limits():
    enc = Hep3Encoder(7, b"k", b"n")
    src, dst = ("127.0.0.1", 1), ("127.0.0.1", 2)
    for ts in TIMES:
        c, py = both(enc, b"OPTIONS", src, dst, ts, hep.PROTO_UDP, hep.TYPE_SIP, b"cid")
        assert c == py or (c is HepError and not isinstance(py, bytes)), ts
    # the largest packet that fits, and one byte more
    fixed = len(enc.encode(b"", src, dst, 1.0, hep.PROTO_UDP, hep.TYPE_SIP, b""))
    assert len(enc.encode(b"z" * (65535 - fixed), src, dst, 1.0)) == 65535
    with pytest.raises(HepError):
        enc.encode(b"z" * (65536 - fixed), src, dst, 1.0)
    with pytest.raises(TypeError):
        enc.encode("not bytes", src, dst, 1.0)


NAMES = [b"Call-ID:", b"call-id:", b"CALL-ID:", b"Call-Id :", b"i:", b"I:", b"i :", b"X-CID:", b"x-cid:",
         b"X-Cid :", b"Call-ID", b"Call-IDx:", b"Via:", b"From:"]
VALUES = [b" abc@host", b"abc", b"\tx y \t", b"", b"  ", b" 123\r", b"v" * 300, b" \xff\xfe\xc3\xa9 ",
          b"a\x0bb\x0c", b"\x0b\x0cz\x0b"]


@st.composite
def sip_head(draw):
    lines = [draw(st.sampled_from([b"INVITE sip:a@b SIP/2.0", b"SIP/2.0 200 OK", b"", b"garbage"]))]
    for _ in range(draw(st.integers(0, 5))):
        lines.append(draw(st.sampled_from(NAMES)) + draw(st.sampled_from(VALUES)))
    eol = draw(st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n"]))
    head = eol.join(lines)
    tail = draw(st.sampled_from([b"\r\n\r\nbody Call-ID: no", b"", b"\r\n", b"\r\n\r\n",
                                 b"\r\n" + b"P: " + b"p" * 8300 + b"\r\nCall-ID: late\r\n\r\n"]))
    pad = draw(st.sampled_from([b"", b"\r\nX-Pad: " + b"q" * draw(st.integers(8140, 8200))]))
    return head + pad + tail


@needs_c
@settings(max_examples=800, deadline=None)
@given(payload=st.one_of(sip_head(), st.binary(max_size=200)))
def test_c_call_id_is_call_id_of(payload):
    assert hep_sender.call_id_of(payload) == hep_sender._call_id_py(payload)


@needs_c
def test_c_call_id_examples():
    cases = {
        b"INVITE sip:a SIP/2.0\r\nCall-ID: abc@h \r\nX-CID: first@leg\r\n\r\n": b"first@leg",
        b"BYE sip:a SIP/2.0\r\ni:  short\r\n\r\n": b"short",
        b"BYE sip:a SIP/2.0\r\nCALL-ID :spaced\r\n\r\n": b"spaced",
        b"BYE sip:a SIP/2.0\r\nContent-Length: 0\r\n\r\nCall-ID: in-body\r\n": b"",
        b"BYE sip:a SIP/2.0\r\nCall-ID: " + b"v" * 300 + b"\r\n\r\n": b"v" * 256,
        b"": b"",
    }
    for payload, want in cases.items():
        assert hep_sender.call_id_of(payload) == want == hep_sender._call_id_py(payload)
