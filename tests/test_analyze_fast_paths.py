"""``sipwatch analyze``'s fast paths against tshark on captures of load, not of one call.

The fast paths (Ethernet/IPv4/UDP frames read straight from the mapped file, SDP parsed only
when a UDP payload that may be RTP follows it, a Via or CSeq line parsed once per distinct line)
must give the figures tshark gives: on the all-SIP capture the benchmark times, and on one that
mixes it with calls carrying RTP and calls over SIP/TCP, written as pcapng.
"""
from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bench_analyze
import pcapbuild as pb
from capture.analyze import analyse
from capture.pcapfile import Decoder
from capture.tshark_facts import facts
from sipwatch import observer
from sipwatch.observer import Observer
from test_analyze import ROOT, check_against_facts

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None or shutil.which("editcap") is None,
                                  reason="tshark/editcap not installed")


@needs_tshark
def test_all_sip_load_capture_matches_tshark(tmp_path):
    path = tmp_path / "all_sip.pcap"
    frames = bench_analyze.build_capture(path, calls=700)
    want = facts(str(path))
    assert int(want["packets"]) == frames and want["sip_messages"] == frames  # every frame is SIP
    rep = analyse(str(path))
    assert rep["packets"] == frames
    assert rep["capture_counters"]["udp"] == frames
    check_against_facts(rep, want)
    assert rep["txn"]["retransmitted_requests"] > 0  # the INVITE retransmissions are in it
    assert rep["rtp_streams"] == [] and rep["errors"]["not_rtp_udp"] == 0


@needs_tshark
def test_sip_load_mixed_with_rtp_as_pcapng_matches_tshark(tmp_path):
    """SDP offers/answers of the RTP calls arrive between hundreds of SIP-only calls: the RTP
    streams are still tied to their calls, as tshark ties them."""
    load = tmp_path / "load.pcap"
    bench_analyze.build_capture(load, calls=200)
    _, recs = pb.read_pcap(load.read_bytes())
    for name in ("basic_call_rtp", "tcp_call"):  # 3 calls with RTP, 3 over SIP/TCP
        lt, more = pb.read_pcap((ROOT / "pcaps" / f"{name}.pcap").read_bytes())
        assert lt == bench_analyze.LT_ETHERNET
        recs.extend(more)
    recs.sort(key=lambda r: (r[0], r[1]))
    flat = tmp_path / "mixed.pcap"
    flat.write_bytes(pb.write_raw(bench_analyze.LT_ETHERNET, recs))
    path = tmp_path / "mixed.pcapng"
    subprocess.run(["editcap", "-F", "pcapng", str(flat), str(path)], check=True, capture_output=True,
                   timeout=60)
    assert path.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"
    want = facts(str(path))
    rep = analyse(str(path))
    assert rep["packets"] == int(want["packets"]) == len(recs)
    check_against_facts(rep, want)
    assert len(want["rtp_sdp_streams"]) >= 6  # the calls' streams, tied by SDP in both tools
    tied = {s["ssrc"] for s in rep["rtp_streams"] if s["call_id"] is not None}
    assert {s["ssrc"] for s in want["rtp_sdp_streams"]} <= tied


def test_observer_line_memos_stay_bounded_and_keep_transactions_apart():
    """Hostile input: unique Via lines (some over the memo's line cap) and CSeq numbers. Each
    request is still its own transaction, and what the observer remembers stays bounded."""
    obs = Observer()
    n = observer.MEMO_MAX + 1000
    for i in range(n):
        pad = "x" * (600 if i % 2 else 0)  # every other Via line is too long to be remembered
        inv = pb.sip_invite(f"memo-{i // 2}", f"z9hG4bK{pad}{i}", cseq=i + 1)
        assert obs.feed(inv, ("10.0.0.1", 5060), ("10.0.0.2", 5060), 1000.0 + i * 0.001)
    assert len(obs.tracker.transactions) == n
    assert obs.stats.request_retransmissions == 0 and obs.stats.parse_errors == 0
    assert len(obs._via_branches) <= observer.MEMO_MAX
    assert all(len(line) <= observer.MEMO_LINE_MAX for line in obs._via_branches)
    assert len(obs._cseqs) <= observer.MEMO_MAX


@settings(max_examples=500, deadline=None)
@given(ihl=st.sampled_from([5, 5, 5, 5, 6, 4]), frag=st.sampled_from([0, 0, 0x4000, 0x2000, 0x0001]),
       proto=st.sampled_from([17, 17, 17, 6, 4]),
       dport=st.sampled_from([5060, 35160, 5061, 5060, 35160, 4789, 6081, 2152, 1701, 9060, 37008,
                              4754, 6635]),
       ulen_delta=st.one_of(st.none(), st.integers(-10, 6)), payload=st.binary(max_size=40),
       cut=st.sampled_from([0, 0, 0, 0, 1, 5, 30]), trailer=st.sampled_from([b"", b"\0\0\0\0"]))
def test_reader_fast_path_gives_what_the_full_decoder_gives(ihl, frag, proto, dport, ulen_delta,
                                                            payload, cut, trailer):
    """Every Ethernet frame the fast path takes gives the same packet and counters as the full
    decoder (which the encapsulation tests check against tshark); every other frame is left to it."""
    seg = pb.udp(40000, dport, payload)
    if ulen_delta is None:
        seg = seg[:4] + b"\0\0" + seg[6:]  # UDP length 0 (checksum offload, jumbo)
    elif ulen_delta:
        seg = seg[:4] + struct.pack("!H", max(0, len(seg) + ulen_delta)) + seg[6:]
    ip = pb.ipv4("10.1.2.3", "10.4.5.6", proto, b"\x01\x01\x01\x00" * (ihl - 5) + seg)
    ip = bytes([0x40 | ihl]) + ip[1:6] + struct.pack("!H", frag) + ip[8:]
    frame = pb.eth(ip + trailer)
    frame = frame[:len(frame) - cut] if cut else frame
    fast_c: dict = {}
    full_c: dict = {}
    # as in a file: other records before and after the frame, never read as part of it
    buf = b"\xee" * 7 + frame + b"\xff" * 64
    got = Decoder(fast_c).ether_udp4(buf, 7, len(frame), 1.5)
    want = Decoder(full_c).frame(1, frame, 1.5)
    if got is not None:
        assert [got] == want and type(want[0]) is type(got)
        assert fast_c == full_c
    else:
        assert fast_c == {}  # nothing counted: the full decoder does it
