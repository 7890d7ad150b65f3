"""One fuzz input -> the HEP decoder and the HEP receiver in front of the observer.

Properties (an AssertionError names the one that broke; anything raised is a finding too):
- ``parse_hep`` returns a HepPacket or one of the fixed reasons, never raises;
- a decoded HEPv3 packet re-encodes to a packet that decodes to the same fields (what the sender
  writes, the receiver reads back);
- the receiver (auth key set or not) counts every packet exactly once, accepted or rejected by
  reason, and nothing raises out of it, out of the observer it feeds or out of the RTCP-report
  store (whose entries never show negative loss);
- the TCP framing header gives no length outside 6..65535;
- the HEP sender's C Call-ID search and C encoder (``sipwatch._hepenc``) give the bytes of their
  Python versions, on the input and on a decoded packet's payload and fields.
"""
from __future__ import annotations

from capture.hep_listen import HepReceiver
from capture.hep_rtcp import RtcpReports
from sipwatch.hep import REASONS, Hep3Encoder, HepError, HepPacket, encode_hep3, hep3_frame_length, parse_hep
from sipwatch.hep_sender import _call_id_py, call_id_of
from sipwatch.observer import Observer

FIELDS = ("family", "proto", "src", "dst", "ts_sec", "ts_usec", "payload_type", "capture_id",
          "correlation_id", "payload")


def run_one_hep(data: bytes) -> None:
    r = parse_hep(data)
    assert type(r) is HepPacket or r in REASONS, f"parse_hep returned {r!r}"
    if type(r) is HepPacket and r.version == 3 and r.proto < 256 and len(r.payload) < 60000:
        again = parse_hep(encode_hep3(
            r.payload, r.src, r.dst, r.ts_sec + r.ts_usec / 1e6, proto=r.proto,
            payload_type=r.payload_type, capture_id=r.capture_id,
            correlation_id=r.correlation_id or b"", auth_key=r.auth_key or b""))
        assert type(again) is HepPacket, f"re-encoded packet refused: {again}"
        for f in FIELDS:
            if f == "ts_usec":  # the float round trip may carry a microsecond
                assert abs(getattr(again, f) - r.ts_usec) <= 1 or again.ts_sec != r.ts_sec
                continue
            if f == "ts_sec":
                assert abs(again.ts_sec - r.ts_sec) <= 1
                continue
            if f == "correlation_id":
                assert (again.correlation_id or b"") == (r.correlation_id or b"")
                continue
            assert getattr(again, f) == getattr(r, f), f"{f}: {getattr(again, f)!r} != {getattr(r, f)!r}"
    for key in (b"", b"k"):
        obs = Observer()
        rtcp = RtcpReports(max_calls=4)
        rx = HepReceiver(obs.feed, key, on_rtcp=rtcp.add)
        rx.packet(data)
        rx.packet(data[: len(data) // 2])
        assert rx.received + rx.rtcp_received + sum(rx.rejected.values()) == 2, \
            "a packet not counted exactly once"
        for call_id in list(rtcp.by_call):
            for entry in rtcp.take(call_id):
                assert entry["lost"] >= 0 and 0 <= entry["lost_pct"] <= 100
        obs.finish()
    n = hep3_frame_length(data[:6])
    assert n is None or 6 <= n <= 65535
    assert call_id_of(data) == _call_id_py(data), "C and Python Call-ID differ"
    if type(r) is HepPacket:
        assert call_id_of(r.payload) == _call_id_py(r.payload), "C and Python Call-ID differ"
        if r.proto < 256 and r.capture_id < 2 ** 32:
            _same_encoding(r)


def _same_encoding(r: HepPacket) -> None:
    """Hep3Encoder's C and Python paths on a decoded packet's fields: the same bytes, or both refuse."""
    enc = Hep3Encoder(r.capture_id, r.auth_key or b"", b"")
    ts = r.ts_sec + r.ts_usec / 1e6
    try:
        head = enc._addresses(r.src, r.dst, r.proto)
    except HepError:
        return
    got = []
    for fn in (lambda: enc.encode(r.payload, r.src, r.dst, ts, r.proto, r.payload_type, r.correlation_id or b""),
               lambda: enc._encode_py(head, r.payload, ts, r.payload_type, r.correlation_id or b"")):
        try:
            got.append(fn())
        except Exception:  # noqa: BLE001 - refused (HepError; the Python packs' struct.error)
            got.append(None)
    assert got[0] == got[1], "C and Python HEP encodings differ"
