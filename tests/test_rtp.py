"""RTP quality: built streams with wrap-around, loss, duplicates, reordering and jitter, checked
against ``tshark -z rtp,streams``; E-model MOS, SDP and RTCP decoding checked by hand values."""
from __future__ import annotations

import json
import random
import re
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import pcapbuild as pb
import rtp_detection_fixture as rdf
from capture.analyze import analyse
from harness import ROOT
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


# -- which UDP is RTP: as strict as tshark --------------------------------------------------------
DETECTION = ROOT / "pcaps" / "rtp_detection" / "dns_netbios_rtp.pcap"
JUNK_PROTOCOLS = ("dns", "mdns", "llmnr", "nbns", "smb")  # tshark's top protocol of the junk frames


@pytest.mark.skipif(not HAVE_TSHARK, reason="tshark not installed")
def test_detection_fixture_facts_are_tsharks_reading_now():
    stored = json.loads(DETECTION.with_suffix(".facts.json").read_text())
    assert rdf.tshark_facts(DETECTION) == stored
    # what the fixture is for: junk that reads as RTP version 2 / RTCP, and tshark sees none of
    # it as RTP (its stream list is the media of the recorded calls plus one keep-alive flow)
    by_top = stored["udp_frames_by_top_protocol"]
    assert sum(by_top.get(p, 0) for p in JUNK_PROTOCOLS) == 172 and "rtcp" not in by_top
    assert len(stored["rtp_heur_streams"]) == 9 and len(stored["rtp_sdp_streams"]) == 7


@pytest.mark.skipif(not HAVE_TSHARK, reason="tshark not installed")
def test_dns_netbios_next_to_rtp_gives_tsharks_streams_and_nothing_else():
    facts = rdf.tshark_facts(DETECTION)  # ground truth read now, not the stored copy
    frames = rdf.tshark_frames(DETECTION)
    junk = [f for f in frames if f["top"] in JUNK_PROTOCOLS]
    # the junk really does look like RTP/RTCP to a first-byte test (what made 20 "streams")
    assert sum(1 for f in junk if f["rtp_ssrc"] is None) == len(junk)
    rep = analyse(str(DETECTION))
    key = lambda s: (s["ssrc"].upper().replace("X", "x"), s["src"], s["dst"])  # noqa: E731
    media = {key(s): s for s in facts["rtp_heur_streams"] if s["carries_media"]}
    sdp = {key(s) for s in facts["rtp_sdp_streams"] if s["carries_media"]}
    mine = {key(s): s for s in rep["rtp_streams"]}
    assert set(mine) == set(media)
    for k, w in media.items():
        s = mine[k]
        assert (s["payload"], s["pkts"], s["lost"]) == (w["payload"], w["pkts"], max(w["lost"], 0)), k
        for f in ("max_delta_ms", "mean_jitter_ms", "max_jitter_ms"):
            assert s[f] == pytest.approx(w[f], rel=0.05, abs=0.01), (k, f)
        # tied to its call exactly when tshark ties it by SDP; the others found by the heuristic
        assert (s["detected_by"] == "sdp") == (k in sdp) == (s["call_id"] is not None), k
    assert sum(1 for s in mine.values() if s["detected_by"] == "heuristic") == 2
    # every junk datagram is counted as not RTP, none as RTCP
    assert rep["errors"]["not_rtp_udp"] == len(junk)
    assert rep["rtcp_packets"] == facts["udp_frames_by_top_protocol"].get("rtcp", 0) == 0
    # keep-alives: datagrams too short for RTP, STUN, and RTP without payload (tshark's
    # keep-alive-only "stream" among them), all on media addresses
    assert rep["rtp_keepalives"] == facts["udp_payloads_under_12_bytes"] + \
        facts["udp_frames_by_top_protocol"]["stun"] + facts["rtp_frames_without_payload"] == 9
    for call in rep["calls"]:
        assert len(call["rtp_streams"]) == 2


@pytest.mark.skipif(not HAVE_TSHARK, reason="tshark not installed")
def test_duplicates_never_make_loss_negative(tmp_path):
    """tshark counts Lost = expected − packets, negative when duplicates outnumber losses; the
    packets lost cannot be fewer than none, and RFC 3550 A.3 (duplicates not counted as
    received) still sees the one real loss."""
    frames = _stream_frames(0x0BADCAFE, 0, 100, 120, 1000.0, ("10.0.0.1", 40000),
                            ("10.0.0.2", 50000), drop={60}, dup={10, 20, 30, 40, 50})
    path = tmp_path / "dups.pcap"
    path.write_bytes(pb.pcap(1, frames))
    (w,) = tshark_streams(path).values()
    assert w["lost"] == -4 and w["pkts"] == 124
    (s,) = analyse(str(path))["rtp_streams"]
    assert (s["pkts"], s["lost"], s["lost_rfc3550"], s["duplicates"]) == (124, 0, 1, 5)
    assert s["lost_pct"] == 0.0


def _feed_run(rtp, src, dst, ssrc, n, *, pt=0, seq0=1000, ts_step=160, t0=1.0, skip=()):
    got = []
    for i in range(n):
        if i in skip:
            continue
        got.append(rtp.feed(pb.rtp(seq0 + i, (seq0 + i) * ts_step, ssrc, pt), src, dst, t0 + i * 0.02))
    return got


def test_heuristic_needs_a_consistent_run():
    A, B = ("192.0.2.1", 20000), ("192.0.2.2", 30000)
    rtp = RtpAnalyzer()
    _feed_run(rtp, A, B, 1, 3)  # three good packets: not yet a stream
    assert rtp.summaries() == [] and rtp.not_rtp == 3
    _feed_run(rtp, A, B, 1, 1, seq0=1003, t0=1.06)
    (s,) = rtp.summaries()  # the fourth confirms it; the three held ones are in it
    assert (s["pkts"], s["lost"], s["detected_by"], rtp.not_rtp) == (4, 0, "heuristic", 0)
    # payload type 50 is unassigned, 111 dynamic but declared by no SDP, 72-76 is RTCP's range
    for ssrc, pt in ((2, 50), (3, 111), (4, 73)):
        _feed_run(rtp, A, B, ssrc, 20, pt=pt)
    # sequence not +1 (DNS flags stand still), timestamps going back
    for i in range(20):
        rtp.feed(pb.rtp(0x0100, i * 160, 5, 0), A, B, 2.0 + i * 0.02)
        rtp.feed(pb.rtp(i, (20 - i) * 160, 6, 0), A, B, 2.0 + i * 0.02)
    # a well-known port never starts a heuristic stream
    _feed_run(rtp, ("192.0.2.1", 53), B, 7, 20)
    assert [s["ssrc"] for s in rtp.summaries()] == ["0x00000001"]
    # once some SDP declares 111, a consistent run of it is a stream
    rtp.add_sdp(b"c", b"v=0\r\nc=IN IP4 198.51.100.1\r\nm=audio 9000 RTP/AVP 111\r\n"
                      b"a=rtpmap:111 opus/48000/2\r\n")
    _feed_run(rtp, A, B, 8, 6, pt=111)
    assert {s["ssrc"] for s in rtp.summaries()} == {"0x00000001", "0x00000008"}


def test_heuristic_stream_with_early_loss_keeps_every_packet():
    A, B = ("192.0.2.1", 20000), ("192.0.2.2", 30000)
    rtp = RtpAnalyzer()
    _feed_run(rtp, A, B, 9, 40, skip={1, 3, 5})  # no run of 4 until packet 6..9
    (s,) = rtp.summaries()
    assert (s["pkts"], s["lost"], s["lost_rfc3550"]) == (37, 3, 3)


def test_random_junk_starting_like_rtp_makes_no_stream_and_stays_bounded():
    rnd = random.Random(5)
    rtp = RtpAnalyzer()
    A, B = ("192.0.2.1", 20000), ("192.0.2.2", 30000)
    n = 20_000
    for i in range(n):
        data = bytes([0x80 | rnd.randrange(0x40)]) + rnd.randbytes(rnd.randrange(0, 200))
        rtp.feed(data, A, B, 1.0 + i * 0.001)
    assert rtp.summaries() == [] and not rtp.streams
    assert rtp.not_rtp == n and rtp.rtcp_packets == 0
    assert len(rtp.candidates) <= RtpAnalyzer.MAX_CANDIDATES
    assert all(len(h) <= RtpAnalyzer.MAX_HELD for h in rtp.candidates.values())


def test_keepalives_are_not_streams():
    sdp = b"v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP 0\r\n"
    A, B = ("192.0.2.1", 4000), ("192.0.2.2", 5000)
    rtp = RtpAnalyzer()
    rtp.add_sdp(b"call", sdp)
    stun = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + bytes(12)
    for data in (b"", b"\x00", b"\r\n\r\n", stun, pb.rtp(1, 0, 77, 0, payload=b"")):
        assert rtp.feed(data, B, A, 1.0)
    assert rtp.keepalives == 5 and rtp.summaries() == [] and rtp.not_rtp == 0
    # the same bytes between addresses no SDP or stream names are just not RTP
    assert not rtp.feed(b"\x00", ("192.0.2.7", 4000), ("192.0.2.8", 5000), 1.0)
    assert rtp.not_rtp == 1


def test_rtcp_must_be_a_valid_compound_packet():
    rtp = RtpAnalyzer()
    A, B = ("192.0.2.1", 4001), ("192.0.2.2", 5001)
    rr = struct.pack("!BBHI", 0x80, 201, 1, 1)
    sdes = struct.pack("!BBHI", 0x81, 202, 2, 1) + b"\x01\x02ab"
    assert rtp.feed(rr + sdes, A, B, 1.0) and rtp.rtcp_packets == 1
    for bad in (rr + b"\x00" * 4,  # lengths do not add up to the datagram
                struct.pack("!BBHI", 0x80, 201, 3, 1),  # length beyond the datagram
                rr + struct.pack("!BBHI", 0x40, 202, 1, 1),  # second part not version 2
                struct.pack("!BBH", 0x80, 201, 0) + b"\x00" * 8):  # dns-like tail
        assert not rtp.feed(bad, A, B, 1.0)
    assert rtp.rtcp_packets == 1


def test_sequence_restart_and_wild_jump_are_not_loss():
    st = RtpStream(("a", 1), ("b", 2), 1, {})
    seqs = list(range(100, 150)) + [40000] + list(range(150, 160))  # one wild packet
    seqs += list(range(30000, 30050))  # the sender restarted its sequence
    for i, seq in enumerate(seqs):
        st.add(i * 20.0, seq, i * 160, 0, False)
    assert st.restarts == 1 and st.lost_rfc3550 == 0
    assert st.lost >= 0 and st.summary()["lost_pct"] <= 100.0
    # a late last packet pulls Wireshark's expected below the packets received: still not < 0
    st2 = RtpStream(("a", 1), ("b", 2), 2, {})
    for i, seq in enumerate((1, 2, 4, 5, 3)):
        st2.add(i * 20.0, seq, seq * 160, 0, False)
    assert st2.lost == 0 and st2.lost_rfc3550 == 0 and st2.ooo == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.sampled_from((0, 8, 13, 101)),
                          st.booleans()), max_size=300))
def test_loss_is_never_negative_whatever_the_sequence(pkts):
    s = RtpStream(("a", 1), ("b", 2), 1, {101: ("telephone-event", 8000)})
    for i, (seq, ts, pt, marker) in enumerate(pkts):
        s.add(i * 20.0, seq, ts, pt, marker)
    if pkts:
        out = s.summary()
        assert out["lost"] >= 0 and out["lost_rfc3550"] >= 0 and 0.0 <= out["lost_pct"] <= 100.0
        assert s.received <= len(pkts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.binary(max_size=80), st.integers(0, 3)), max_size=80))
def test_any_datagram_is_classified_without_raising(datagrams):
    evicted = []
    rtp = RtpAnalyzer(max_streams=2, on_evict=evicted.append)
    rtp.add_sdp(b"c", b"v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP 0 96\r\n")
    ends = [("192.0.2.1", 4000), ("192.0.2.2", 5000), ("192.0.2.3", 6000), ("192.0.2.4", 53)]
    for i, (data, k) in enumerate(datagrams):
        if data:
            data = bytes([0x80 | data[0] & 0x3F]) + data[1:] if i % 2 else data
        rtp.feed(data, ends[k], ends[(k + 1) % 4], 1.0 + i * 0.02)
    # each datagram is exactly one of: not RTP (held candidates too), keep-alive, RTCP, media
    media = sum(s.media for s in list(rtp.streams.values()) + evicted)
    assert rtp.not_rtp + rtp.keepalives + rtp.rtcp_packets + media == len(datagrams)
    for out in rtp.summaries():
        assert out["lost"] >= 0 and out["lost_rfc3550"] >= 0


def test_an_rtpmap_clock_under_1khz_never_raises_on_the_streams_packets():
    """``a=rtpmap:96 foo/500``: the jitter divides by clock // 1000, which was 0, so every RTP
    packet of that type after the first raised ZeroDivisionError out of the analyzer (counted
    as internal errors by the live capture, and no figures). Such a clock is read as unknown."""
    import struct

    from capture.live import RtpMonitor

    m = RtpMonitor()
    m.add_sdp(b"call-1", b"v=0\r\no=- 1 1 IN IP4 10.0.0.5\r\ns=-\r\nc=IN IP4 10.0.0.5\r\nt=0 0\r\n"
                         b"m=audio 4000 RTP/AVP 96\r\na=rtpmap:96 foo/500\r\n")
    for i in range(5):
        pkt = struct.pack("!BBHII", 0x80, 96, i, i * 160, 0x1234) + b"\0" * 160
        m.analyzer.feed(pkt, ("10.0.0.6", 5000), ("10.0.0.5", 4000), 100.0 + i * 0.02)
    (stream,) = m.analyzer.streams.values()
    assert stream.packets == 5


def test_mos_stays_on_its_scale_at_any_loss():
    """G.107's MOS polynomial dips below 1 for 0 < R < ~6.5: 60-100% loss on G.711 read 0.99."""
    for codec in ("PCMU", "PCMA", "G729", "G722", "GSM", "iLBC"):
        for tenth in range(0, 1001):
            m = mos_from_loss(tenth / 10.0, codec)
            assert m is None or 1.0 <= m <= 4.5, (codec, tenth / 10.0, m)


def test_a_stream_whose_last_number_is_before_its_first_is_expected_no_fewer_packets_than_it_sent():
    """Wireshark's expected (last − first + 1) went negative: ``"expected": -4989``."""
    st = RtpStream(("a", 1), ("b", 2), 1, {})
    for i, seq in enumerate((5000, 5001, 5002, 10, 11)):
        st.add(i * 20.0, seq, seq * 160, 0, False)
    s = st.summary()
    assert s["expected"] >= s["pkts"] == 5 and s["lost"] >= 0


def test_a_new_ssrc_on_every_packet_does_not_make_a_stream_of_each(tmp_path):
    """A sender with a new SSRC on every packet to an SDP-announced port made 200,000 streams
    (491 MB) of a 14-MB capture. A real call changes SSRC a few times: those stay streams."""
    body = pb.sdp("10.0.0.1", 20000)
    inv = pb.sip_invite("churn@x", "z9hG4bK1", body=body)
    frames = [(1.0, pb.eth(pb.ipv4("10.0.0.1", "10.0.0.2", 17, pb.udp(5060, 5060, inv))))]
    n = 5000
    for i in range(n):  # 5000 packets in 2.5 s, each with its own SSRC
        frames.append((1.0 + i * 5e-4, pb.eth(pb.ipv4("10.9.0.1", "10.0.0.1", 17,
                                                      pb.udp(30000, 20000, pb.rtp(i, i * 160, 0x10000 + i))))))
    # then a call's own few SSRC changes on another flow to the same port, later: all streams
    for k in range(3):
        for i in range(50):
            frames.append((20.0 + k + i * 0.02, pb.eth(pb.ipv4("10.0.0.2", "10.0.0.1", 17,
                                                                pb.udp(40000, 20000, pb.rtp(i, i * 160, 0xA0 + k))))))
    path = tmp_path / "churn.pcap"
    path.write_bytes(pb.pcap(1, frames))
    rep = analyse(str(path))
    churned = [s for s in rep["rtp_streams"] if s["src"] == "10.9.0.1:30000"]
    kept = [s for s in rep["rtp_streams"] if s["src"] == "10.0.0.2:40000"]
    assert len(churned) == RtpAnalyzer.CHURN_MAX and rep["rtp_ssrc_churn"] == n - RtpAnalyzer.CHURN_MAX
    assert sorted(s["pkts"] for s in kept) == [50, 50, 50]
    assert any("SSRC" in w for w in rep["warnings"])


def test_a_clock_that_is_not_whole_khz_gives_no_jitter_for_perfect_timing():
    """L16 at 44.1 kHz, a packet every 20 ms (882 units): the jitter divided by clock // 1000
    (44 units a ms) and read 0.045 ms of jitter on perfect timing."""
    s = RtpStream(("a", 1), ("b", 2), 1, {96: ("L16", 44100)})
    for i in range(200):
        s.add(i * 20.0, i, i * 882, 96, False)
    assert s.max_jitter == pytest.approx(0.0, abs=1e-9)


def test_event_packets_between_audio_packets_add_no_jitter():
    """RFC 4733 events keep their start timestamp for the whole event; an audio packet after
    them is paired with the audio packet before them (RFC 3550 §6.4.1), not with an event's
    arrival (Wireshark's way: 12.5 ms on perfect timing)."""
    s = RtpStream(("a", 1), ("b", 2), 1, {101: ("telephone-event", 8000)})
    for i in range(100):
        if 40 <= i < 50:  # a digit: 10 event packets, timestamp held at the event's start
            s.add(i * 20.0, i, 40 * 160, 101, i == 40)
        else:
            s.add(i * 20.0, i, i * 160, 0, False)
    assert s.max_jitter == pytest.approx(0.0, abs=1e-9)
