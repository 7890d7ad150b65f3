"""HEP codec: packets built here byte by byte from the format (not by the encoder) decode to what
they carry, the encoder's output has the layout receivers enforce, and hostile input (every
truncation, every bad length, random bytes) is refused with a reason, never an exception."""
from __future__ import annotations

import random
import socket
import struct
import zlib

import pytest

from sipwatch.hep import REASONS, HepPacket, encode_hep3, hep3_frame_length, parse_hep
from sipwatch.hep_sender import EndpointError, call_id_of, parse_endpoint

SIP = (b"INVITE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
       b"Call-ID: abc-123@host\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")


def chunk(ctype: int, value: bytes, vendor: int = 0) -> bytes:
    return struct.pack(">HHH", vendor, ctype, 6 + len(value)) + value


def hep3(*chunks: bytes) -> bytes:
    body = b"".join(chunks)
    return b"HEP3" + struct.pack(">H", 6 + len(body)) + body


def kamailio_like(payload=SIP, src="10.0.0.1", dst="10.0.0.2", sport=5060, dport=5080,
                  sec=1700000000, usec=123456, cid=2001, extra=()) -> bytes:
    fam = socket.AF_INET if ":" not in src else socket.AF_INET6
    return hep3(chunk(1, bytes([2 if fam == socket.AF_INET else 10])), chunk(2, b"\x11"),
                chunk(3 if fam == socket.AF_INET else 5, socket.inet_pton(fam, src)),
                chunk(4 if fam == socket.AF_INET else 6, socket.inet_pton(fam, dst)),
                chunk(7, struct.pack(">H", sport)), chunk(8, struct.pack(">H", dport)),
                chunk(9, struct.pack(">I", sec)), chunk(10, struct.pack(">I", usec)),
                chunk(11, b"\x01"), chunk(12, struct.pack(">I", cid)), *extra, chunk(15, payload))


def test_decodes_a_packet_built_from_the_format():
    p = parse_hep(kamailio_like(extra=(chunk(17, b"abc-123@host"), chunk(14, b"secret"),
                                       chunk(99, b"vendor", vendor=5))))
    assert isinstance(p, HepPacket)
    assert (p.version, p.family, p.proto, p.src, p.dst) == (3, 4, 17, ("10.0.0.1", 5060), ("10.0.0.2", 5080))
    assert (p.ts_sec, p.ts_usec, p.capture_id, p.payload_type) == (1700000000, 123456, 2001, 1)
    assert (p.correlation_id, p.auth_key, p.payload) == (b"abc-123@host", b"secret", SIP)


def test_decodes_ipv6_and_compressed_payload():
    p = parse_hep(hep3(chunk(1, b"\x0a"), chunk(2, b"\x06"),
                       chunk(5, socket.inet_pton(socket.AF_INET6, "2001:db8::1")),
                       chunk(6, socket.inet_pton(socket.AF_INET6, "::1")),
                       chunk(7, b"\x13\xc4"), chunk(8, b"\x13\xc5"),
                       chunk(9, b"\x00\x00\x00\x01"), chunk(16, zlib.compress(SIP))))
    assert isinstance(p, HepPacket)
    assert (p.family, p.transport, p.src, p.dst, p.payload) == \
        (6, "tcp", ("2001:db8::1", 5060), ("::1", 5061), SIP)


def test_decodes_hep_v2_as_kamailio_writes_it():
    # version 2, header length, AF_INET, UDP, ports (network order), addresses, then time in
    # little-endian order (seconds, microseconds, capture id), then the payload
    head = struct.pack(">BBBBHH", 2, 28, 2, 17, 5060, 5080) + socket.inet_aton("10.0.0.1") \
        + socket.inet_aton("10.0.0.2") + struct.pack("<IIHH", 1700000000, 999999, 7, 0)
    p = parse_hep(head + SIP)
    assert isinstance(p, HepPacket)
    assert (p.version, p.src, p.dst, p.ts_sec, p.ts_usec, p.capture_id, p.payload) == \
        (2, ("10.0.0.1", 5060), ("10.0.0.2", 5080), 1700000000, 999999, 7, SIP)


def test_encoder_layout_is_what_receivers_enforce():
    pkt = encode_hep3(SIP, ("127.0.0.1", 5060), ("127.0.0.2", 5070), 1700000000.000042,
                      capture_id=2001, auth_key=b"pw", correlation_id=b"abc-123@host", node_name=b"n1")
    assert pkt[:4] == b"HEP3" and struct.unpack(">H", pkt[4:6])[0] == len(pkt)
    off, types = 6, []
    while off < len(pkt):
        vendor, ctype, clen = struct.unpack_from(">HHH", pkt, off)
        assert vendor == 0 and clen >= 6
        types.append((ctype, clen - 6))
        off += clen
    assert off == len(pkt)
    # Kamailio's order, 4-byte capture id, node name last
    assert types == [(1, 1), (2, 1), (3, 4), (4, 4), (7, 2), (8, 2), (9, 4), (10, 4), (11, 1),
                     (12, 4), (17, 12), (14, 2), (15, len(SIP)), (19, 2)]
    usec = struct.unpack(">I", pkt[pkt.index(b"\x00\x00\x00\x0a\x00\x0a") + 6:][:4])[0]
    assert usec == 42


def test_encoder_ipv6_and_mixed_families():
    pkt = encode_hep3(SIP, ("::1", 5060), ("127.0.0.1", 5070), 1.5)
    p = parse_hep(pkt)
    assert p.family == 6 and p.src == ("::1", 5060) and p.dst == ("::ffff:127.0.0.1", 5070)
    assert p.ts_usec == 500000


def test_encoder_refuses_names_and_oversize():
    from sipwatch.hep import HepError
    with pytest.raises(HepError):
        encode_hep3(SIP, ("example.com", 5060), ("127.0.0.1", 5070), 1.0)
    with pytest.raises(HepError):
        encode_hep3(b"x" * 65500, ("127.0.0.1", 5060), ("127.0.0.1", 5070), 1.0)


@pytest.mark.parametrize("mutate, reason", [
    (lambda b: b[:5], "truncated"),
    (lambda b: b[:4] + struct.pack(">H", len(b) + 1) + b[6:], "bad_length"),
    (lambda b: b + b"\0", "bad_length"),
    (lambda b: b"HEP4" + b[4:], "not_hep"),
    (lambda b: b[:6] + struct.pack(">HHH", 0, 1, 5) + b[12:], "bad_chunk"),
    (lambda b: b[:6] + struct.pack(">HHH", 0, 1, 60000) + b[12:], "bad_chunk"),
])
def test_bad_packets_give_reasons(mutate, reason):
    assert parse_hep(mutate(kamailio_like())) == reason


def test_missing_payload_or_address_is_refused():
    no_payload = hep3(chunk(1, b"\x02"), chunk(3, b"\x7f\0\0\x01"), chunk(4, b"\x7f\0\0\x01"),
                      chunk(7, b"\0\x01"), chunk(8, b"\0\x01"), chunk(9, b"\0\0\0\x01"))
    assert parse_hep(no_payload) == "missing_chunk"
    wrong_family = kamailio_like()[:6] + chunk(1, b"\x0a") + kamailio_like()[13:]
    assert parse_hep(wrong_family) == "bad_address"
    bomb = kamailio_like(extra=())[:-len(chunk(15, SIP))] + chunk(16, zlib.compress(b"\0" * 10**6))
    bomb = bomb[:4] + struct.pack(">H", len(bomb)) + bomb[6:]
    assert parse_hep(bomb) == "bad_payload"


def test_every_truncation_and_random_bytes_never_raise():
    good = kamailio_like(extra=(chunk(17, b"x"),))
    for i in range(len(good)):
        r = parse_hep(good[:i])
        assert r in REASONS
    rnd = random.Random(7)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rnd.randint(1, 8)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        r = parse_hep(bytes(data))
        assert isinstance(r, HepPacket) or r in REASONS
        r = parse_hep(bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 80))))
        assert isinstance(r, HepPacket) or r in REASONS


def test_tcp_framing_header():
    assert hep3_frame_length(kamailio_like()[:6]) == len(kamailio_like())
    assert hep3_frame_length(b"GET / ") is None
    assert hep3_frame_length(b"HEP3\0\x02") is None


def test_call_id_search():
    assert call_id_of(SIP) == b"abc-123@host"
    assert call_id_of(SIP.replace(b"Call-ID:", b"i:")) == b"abc-123@host"
    assert call_id_of(SIP.replace(b"Call-ID:", b"call-id:")) == b"abc-123@host"
    assert call_id_of(SIP.replace(b"\r\n\r\n", b"\r\nX-CID: a-leg\r\n\r\n")) == b"a-leg"
    # a Call-ID in the body is not the message's
    assert call_id_of(SIP.replace(b"Call-ID: abc-123@host\r\n", b"") + b"\r\nCall-ID: body") == b""
    # ... nor when the header section ends with bare LFs (forwarded as they are): an X-CID in the
    # body filed the message under another call's id in the HEP server
    for blank in (b"\n\n", b"\r\n\n", b"\n\r\n"):
        bare = SIP.replace(b"\r\n\r\n", blank, 1) + b"\r\nX-CID: victim@host\r\n\r\nX-CID: v2\n"
        assert bare.count(b"X-CID") == 2 and call_id_of(bare) == b"abc-123@host", blank
        assert call_id_of(bare.replace(b"\r\n", b"\n")) == b"abc-123@host", blank


def test_endpoint_flags():
    assert parse_endpoint("udp:127.0.0.1:9060") == ("udp", ("127.0.0.1", 9060))
    assert parse_endpoint("tcp:[::1]:9061") == ("tcp", ("::1", 9061))
    assert parse_endpoint("udp:10.0.0.1") == ("udp", ("10.0.0.1", 9060))
    for bad in ("127.0.0.1:9060", "udp:homer:9060", "sctp:127.0.0.1:9060", "udp:127.0.0.1:0"):
        with pytest.raises(EndpointError):
            parse_endpoint(bad)


def test_cached_encoder_writes_the_same_bytes():
    from sipwatch.hep import Hep3Encoder
    enc = Hep3Encoder(2001, b"pw", b"node")
    for src, dst, ts in ((("127.0.0.1", 5060), ("127.0.0.2", 5070), 1700000000.999999),
                         (("::1", 5060), ("2001:db8::9:a", 5070), 12.0000004),
                         (("127.0.0.1", 5060), ("::1", 1), 1.5)):
        for _ in range(2):  # first computed, then from the cache
            assert enc.encode(SIP, src, dst, ts, 17, 1, b"abc") == encode_hep3(
                SIP, src, dst, ts, capture_id=2001, auth_key=b"pw", correlation_id=b"abc",
                node_name=b"node")


@pytest.mark.parametrize("argv,env,needle", [
    (["--hep-endpoint", "udp:homer.example:9060"], {}, "'homer.example'"),
    (["--hep-endpoint", "9060"], {}, "'9060'"),
    (["--hep-capture-id", "-1"], {}, "'-1'"),
    ([], {"SIPWATCH_HEP_ENDPOINT": "tcp:127.0.0.1:70000"}, "SIPWATCH_HEP_ENDPOINT"),
])
def test_bad_hep_flags_name_the_value(argv, env, needle):
    from sipwatch.config import ConfigError, settings_from
    with pytest.raises(ConfigError) as err:
        settings_from(["--upstream", "127.0.0.1:5080", *argv], env)
    assert needle in str(err.value)


def test_hep_flags_and_environment():
    from sipwatch.config import settings_from
    s = settings_from(["--upstream", "127.0.0.1:5080", "--hep-endpoint", "tcp:[::1]:9061",
                       "--hep-capture-id", "4294967295", "--hep-log"],
                      {"SIPWATCH_HEP_AUTH_KEY": "pw", "SIPWATCH_HEP_NODE_NAME": "edge-1"})
    assert (s.hep_endpoint, s.hep_capture_id, s.hep_auth_key, s.hep_node_name, s.hep_log) == \
        (("tcp", ("::1", 9061)), 4294967295, b"pw", b"edge-1", True)
    assert settings_from(["--upstream", "127.0.0.1:5080"], {}).hep_endpoint is None


def _fixed_length(pkt: bytes) -> bytes:
    return pkt[:4] + struct.pack(">H", len(pkt)) + pkt[6:]


def test_a_packet_holds_one_payload_and_a_bounded_number_of_chunks():
    """Each zlib chunk was inflated in the chunk loop, up to 64 KB, a later one replacing the
    earlier: ~727 chunks of 100 bytes each inflated 64 KB of zeros, 0.1 s of CPU per datagram."""
    z = zlib.compress(b"\0" * 65535, 9)
    two = _fixed_length(kamailio_like() + chunk(16, z))
    assert parse_hep(two) == "bad_chunk"
    assert parse_hep(_fixed_length(kamailio_like() + chunk(15, SIP))) == "bad_chunk"
    # 64 chunks in all are read; one more is refused (real agents write 10-20)
    base = kamailio_like()
    n_base = 11  # chunks kamailio_like writes
    ok = kamailio_like(extra=[chunk(99, b"", vendor=1)] * (64 - n_base))
    assert isinstance(parse_hep(ok), HepPacket)
    assert parse_hep(kamailio_like(extra=[chunk(99, b"", vendor=1)] * (65 - n_base))) == "bad_chunk"
    assert isinstance(parse_hep(base), HepPacket)


def test_a_compressed_payload_inflates_to_a_bounded_multiple_of_its_size():
    """100 bytes of zlib held 64 KB of zeros; SIP deflates a few times over, and inflates."""
    sip_z = zlib.compress(SIP * 20, 9)  # repetitive SIP: a ratio far above a real message's
    p = parse_hep(_fixed_length(kamailio_like(extra=())[:-len(chunk(15, SIP))] + chunk(16, sip_z)))
    assert isinstance(p, HepPacket) and p.payload == SIP * 20
    zeros = zlib.compress(b"\0" * 65535, 9)
    assert len(zeros) * 64 < 65535
    bomb = _fixed_length(kamailio_like(extra=())[:-len(chunk(15, SIP))] + chunk(16, zeros))
    assert parse_hep(bomb) == "bad_payload"


def test_with_an_auth_key_a_packet_without_it_is_refused_before_its_payload_is_inflated(monkeypatch):
    from sipwatch import hep
    calls = []
    real = hep._inflate
    monkeypatch.setattr(hep, "_inflate", lambda raw: calls.append(len(raw)) or real(raw))
    body = kamailio_like(extra=())[:-len(chunk(15, SIP))]
    packed = _fixed_length(body + chunk(16, zlib.compress(SIP)))
    assert parse_hep(packed, b"s3cret") == "auth" and calls == []
    keyed = _fixed_length(body + chunk(14, b"wrong") + chunk(16, zlib.compress(SIP)))
    assert parse_hep(keyed, b"s3cret") == "auth" and calls == []
    right = _fixed_length(body + chunk(14, b"s3cret") + chunk(16, zlib.compress(SIP)))
    p = parse_hep(right, b"s3cret")
    assert isinstance(p, HepPacket) and p.payload == SIP and len(calls) == 1
    assert parse_hep(b"\x02\x10\x02\x11" + b"\0" * 40, b"s3cret") == "auth"  # v2 has no key


def test_a_correlation_id_or_node_name_over_1024_bytes_is_refused():
    """RTCP reports are kept per correlation id: 64-KB ids let a forged sender hold ~1 GB."""
    assert parse_hep(kamailio_like(extra=(chunk(17, b"c" * 1024),))).correlation_id == b"c" * 1024
    assert parse_hep(kamailio_like(extra=(chunk(17, b"c" * 1025),))) == "bad_chunk"
    assert parse_hep(kamailio_like(extra=(chunk(19, b"n" * 1025),))) == "bad_chunk"
