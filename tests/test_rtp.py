"""RTP quality: built streams with wrap-around, loss, duplicates, reordering and jitter, checked
against ``tshark -z rtp,streams``; E-model MOS, SDP and RTCP decoding checked by hand values."""
from __future__ import annotations

import random
import re
import shutil
import struct
import subprocess

import pytest

import pcapbuild as pb
from capture.analyze import analyse
from sipwatch.rtp import RtpAnalyzer, RtpStream, mos_from_loss, parse_sdp

HAVE_TSHARK = shutil.which("tshark") is not None

_ROW = re.compile(
    r"^\s*[\d.]+\s+[\d.]+\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)\s+(0x[0-9A-Fa-f]+)\s+(.+?)\s+(\d+)\s+"
    r"(-?\d+) \(-?[\d.]+%\)\s+[-\d.]+\s+[-\d.]+\s+([-\d.]+)\s+[-\d.]+\s+([-\d.]+)\s+([-\d.]+)")


def tshark_streams(path) -> dict:
    out = subprocess.run(["tshark", "-n", "-q", "-r", str(path), "-o", "rtp.heuristic_rtp:TRUE",
                          "-z", "rtp,streams"], capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        m = _ROW.match(line)
        if m:
            g = m.groups()
            rows[(g[4], f"{g[0]}:{g[1]}", f"{g[2]}:{g[3]}")] = {
                "payload": g[5], "pkts": int(g[6]), "lost": int(g[7]),
                "max_delta_ms": float(g[8]), "mean_jitter_ms": float(g[9]),
                "max_jitter_ms": float(g[10])}
    return rows


def _stream_frames(ssrc, pt, seq0, n, t0, src, dst, *, drop=(), dup=(), swap=(), jitter_ms=0.0,
                   seed=1, ts0=0xFFFFF000):
    """(ts, frame) for one 20 ms stream; seq and RTP timestamp both wrap inside it."""
    rnd = random.Random(seed)
    pkts = []
    for i in range(n):
        seq = (seq0 + i) & 0xFFFF
        if i in drop:
            continue
        arrive = t0 + i * 0.020 + rnd.uniform(0, jitter_ms) / 1000.0
        data = pb.rtp(seq, ts0 + i * 160, ssrc, pt, marker=(i == 0))
        pkts.append((arrive, data))
        if i in dup:
            pkts.append((arrive + 0.001, data))
    for i in swap:  # the arrival slots of two neighbours carry each other's packet
        (t1, d1), (t2, d2) = pkts[i], pkts[i + 1]
        pkts[i], pkts[i + 1] = (t1, d2), (t2, d1)
    return [(ts, pb.eth(pb.ipv4(src[0], dst[0], 17, pb.udp(src[1], dst[1], d))))
            for ts, d in pkts]


@pytest.mark.skipif(not HAVE_TSHARK, reason="tshark not installed")
def test_streams_match_tshark_rtp_streams(tmp_path):
    frames = _stream_frames(0x11223344, 8, 65500, 300, 1000.0, ("10.0.0.1", 40000),
                            ("10.0.0.2", 50000), drop={30, 31, 100, 250}, dup={120},
                            swap={200}, jitter_ms=6.0)
    frames += _stream_frames(0x55667788, 0, 10, 200, 1000.005, ("10.0.0.2", 50000),
                             ("10.0.0.1", 40000), jitter_ms=0.5, seed=2, ts0=1234)
    frames.sort(key=lambda f: f[0])
    path = tmp_path / "rtp.pcap"
    path.write_bytes(pb.pcap(1, frames))
    want = tshark_streams(path)
    assert len(want) == 2
    rep = analyse(str(path))
    mine = {(s["ssrc"], s["src"], s["dst"]): s for s in rep["rtp_streams"]}
    assert set(mine) == set(want)
    for key, w in want.items():
        s = mine[key]
        assert (s["payload"], s["pkts"], s["lost"]) == (w["payload"], w["pkts"], w["lost"]), key
        for k in ("max_delta_ms", "mean_jitter_ms", "max_jitter_ms"):
            assert s[k] == pytest.approx(w[k], rel=0.05, abs=0.01), (key, k)
    lossy = mine[("0x11223344", "10.0.0.1:40000", "10.0.0.2:50000")]
    assert lossy["duplicates"] == 1 and lossy["out_of_order"] == 1
    assert lossy["lost_rfc3550"] == 4  # the duplicate does not cancel a loss here
    assert lossy["mos"] < mine[("0x55667788", "10.0.0.2:50000", "10.0.0.1:40000")]["mos"]


def test_sequence_wrap_loss_duplicates_reorder():
    st = RtpStream(("a", 1), ("b", 2), 1, {})
    for i, seq in enumerate((65533, 65534, 65535, 1, 2, 2, 4, 3, 5)):  # 0 lost, 2 dup, 3 late
        st.add(i * 20.0, seq, ((seq - 65533) & 0xFFFF) * 160, 0, False)
    assert st.packets == 9 and st.dups == 1 and st.ooo == 1
    assert st.lost_rfc3550 == 1  # expected 65533..65541 = 9, received 8 distinct
    assert st.expected == 9 and st.lost == 0  # Wireshark: expected − packets, dups included


def test_jitter_is_zero_for_perfect_timing_and_rfc3550_for_a_step():
    st = RtpStream(("a", 1), ("b", 2), 1, {})
    for i in range(50):
        st.add(i * 20.0, i, i * 160, 8, False)
    assert st.max_jitter == 0 and st.mean_jitter == 0 and st.max_delta == pytest.approx(20.0)
    st.add(50 * 20.0 + 8.0, 50, 50 * 160, 8, False)  # 8 ms late: J = 8/16
    assert st.jitter == pytest.approx(0.5)


def test_mos_e_model_values():
    # R = 93.2 for G.711 without loss: 1 + 0.035·93.2 + 7e-6·93.2·33.2·6.8
    assert mos_from_loss(0.0, "PCMU") == pytest.approx(4.41, abs=0.005)
    # G.711 at 1 % loss: Ie_eff = 95·1/(1+4.3) = 17.92..., R = 75.27...
    r = 93.2 - 95.0 * 1 / 5.3
    assert mos_from_loss(1.0, "g711A") == pytest.approx(
        1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r), abs=0.005)
    # G.729 without loss: Ie = 10, R = 83.2: 1 + 2.912 + 7e-6·83.2·23.2·16.8
    assert mos_from_loss(0.0, "G729") == pytest.approx(4.14, abs=0.005)
    assert mos_from_loss(0.0, "opus") is None
    assert mos_from_loss(100.0, "PCMU") < 1.6  # R = 93.2 − 95·100/104.3


def test_sdp_media_and_dynamic_clock():
    body = (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
            b"m=audio 4000 RTP/AVP 0 96 101\r\na=rtpmap:96 opus/48000/2\r\n"
            b"a=rtpmap:101 telephone-event/8000\r\nm=video 0 RTP/AVP 31\r\n")
    media = parse_sdp(body)
    assert media == [("192.0.2.1", 4000, {0: ("g711U", 8000), 96: ("opus", 48000),
                                          101: ("telephone-event", 8000)})]
    rtp = RtpAnalyzer()
    rtp.add_sdp(b"call-1", body)
    st_pkt = pb.rtp(1, 960, 7, 96)
    assert rtp.feed(st_pkt, ("198.51.100.9", 5000), ("192.0.2.1", 4000), 1.0)
    st = next(iter(rtp.streams.values()))
    assert st.call_id == "call-1" and st.clock_rate(96) == 48000 and st.clock_rate(101) == 0


def test_rtcp_receiver_report_fraction_is_over_256():
    rtp = RtpAnalyzer()
    src, dst = ("192.0.2.1", 4000), ("192.0.2.2", 5000)
    for i in range(RtpAnalyzer.CONFIRM_RUN):  # a heuristic stream needs a consistent run
        rtp.feed(pb.rtp(1 + i, 160 * (1 + i), 0xAABBCCDD, 0), src, dst, 1.0 + 0.02 * i)
    block = struct.pack("!IIIIII", 0xAABBCCDD, (64 << 24) | 5, 100, 80, 0, 0)
    rr = struct.pack("!BBHI", 0x81, 201, 7, 0x01020304) + block
    assert rtp.feed(rr, dst, (src[0], src[1] + 1), 1.5)
    s = rtp.summaries()[0]
    assert s["rtcp_fraction_lost"] == 0.25 and s["rtcp_cumulative_lost"] == 5
    assert s["rtcp_jitter_ms"] == pytest.approx(10.0)  # 80 units at 8000 Hz
    assert rtp.rtcp_packets == 1
    assert not rtp.feed(b"\x00" * 20, src, dst, 2.0)  # version 0: not RTP
