"""``sipwatch analyze`` against tshark: real public captures, project fixtures, built edge cases.

Ground truth is always tshark (recorded facts files, or tshark run here on a built capture),
never sipwatch's own earlier output.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pcapbuild as pb
from capture.analyze import analyse, main as analyze_main
from sipwatch.observer import Observer

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "pcaps"
SHARED_FACTS = json.loads((SHARED / "facts.json").read_text()) if (SHARED / "facts.json").is_file() else {}
HAVE_TSHARK = shutil.which("tshark") is not None
needs_tshark = pytest.mark.skipif(not HAVE_TSHARK, reason="tshark not installed")


# -- comparing with tshark facts ----------------------------------------------------------------
def _close(mine, theirs, rel=0.05, abs_=0.01) -> bool:
    return abs(mine - theirs) <= max(abs_, rel * abs(theirs))


def check_against_facts(rep: dict, facts: dict) -> None:
    assert rep["sip_messages"] == facts["sip_messages"]
    assert rep["methods"] == facts["methods"]
    assert rep["status_codes"] == facts["status_codes"]
    assert rep["invite_calls"] == facts["invite_calls"]
    mine, want = rep["txn"], facts["txn"]
    for k in ("transactions", "answered", "unanswered", "retransmitted_requests"):
        assert mine[k] == want[k], k
    for k in ("rtt_first_resp_ms_min", "rtt_first_resp_ms_median", "rtt_first_resp_ms_max"):
        if want[k] is None:
            assert mine[k] is None, k
        else:
            assert mine[k] == pytest.approx(want[k], abs=0.05), k
    streams = {(s["ssrc"], s["src"], s["dst"]): s for s in rep["rtp_streams"]}
    for want_s in facts["rtp_heur_streams"]:
        s = streams.get((want_s["ssrc"], want_s["src"], want_s["dst"]))
        assert s is not None, f"stream {want_s['ssrc']} {want_s['src']} -> {want_s['dst']} missing"
        assert s["pkts"] == want_s["pkts"]
        assert s["lost"] == want_s["lost"]
        # (with telephone-event packets Wireshark's jitter is not RFC 3550's: see
        # test_jitter_with_dtmf_follows_rfc3550_not_wireshark)
        keys = ("max_delta_ms",) if "telephone-event" in want_s["payload"] else \
            ("mean_jitter_ms", "max_jitter_ms", "max_delta_ms")
        for k in keys:
            assert _close(s[k], want_s[k]), (want_s["ssrc"], k, s[k], want_s[k])
    # every stream tshark ties to SDP must be tied to a call by us too
    for want_s in facts["rtp_sdp_streams"]:
        s = streams[(want_s["ssrc"], want_s["src"], want_s["dst"])]
        assert s["call_id"] is not None
    listing = facts.get("transactions_list")
    if listing is not None:
        assert len(rep["transactions"]) == len(listing)
        ours = sorted(rep["transactions"], key=lambda t: (t["call_id"], t["cseq"], t["method"], t["src"]))
        theirs = sorted(listing, key=lambda t: (t["call_id"], t["cseq"], t["method"], t["src"]))
        for a, b in zip(ours, theirs):
            assert (a["call_id"], a["method"], a["cseq"], a["src"], a["dst"]) == \
                (b["call_id"], b["method"], b["cseq"], b["src"], b["dst"])
            if b["rtt_ms"] is None:
                assert a["rtt_ms"] is None
            else:
                assert a["rtt_ms"] == pytest.approx(b["rtt_ms"], abs=0.05)


@pytest.mark.parametrize("name", sorted(SHARED_FACTS) or ["(no shared captures)"])
def test_shared_capture_matches_tshark(name):
    if not SHARED_FACTS:
        pytest.skip("shared captures not present")
    rep = analyse(str(SHARED / name))
    check_against_facts(rep, SHARED_FACTS[name])
    assert rep["packets"] == int(SHARED_FACTS[name]["packets"])


def _fixtures():
    out = []
    for facts in sorted((ROOT / "pcaps").glob("*.facts.json")):
        stem = facts.name[: -len(".facts.json")]
        for ext in (".pcap", ".pcapng"):
            if (facts.parent / (stem + ext)).is_file():
                out.append(pytest.param(facts.parent / (stem + ext), facts, id=stem))
    return out or [pytest.param(None, None, id="no-fixtures")]


@pytest.mark.parametrize("capture,facts", _fixtures())
def test_project_fixture_matches_tshark(capture, facts):
    if capture is None:
        pytest.skip("no recorded fixtures with facts yet")
    check_against_facts(analyse(str(capture)), json.loads(facts.read_text()))


# -- tshark on captures built here --------------------------------------------------------------
def tshark_sip(path) -> dict:
    """Message counts by ``tshark -z sip,stat`` and per-frame transport, for built captures."""
    out = subprocess.run(["tshark", "-n", "-q", "-r", str(path), "-z", "sip,stat"],
                         capture_output=True, text=True).stdout
    m = re.search(r"Number of SIP messages:\s*(\d+)", out)
    methods, codes, section = {}, {}, None
    for line in out.splitlines():
        if "SIP Status Codes" in line:
            section = codes
        elif "List of SIP Request methods" in line:
            section = methods
        elif section is codes and (mm := re.match(r"\s+SIP (\d{3}) .*:\s*(\d+) Packets", line)):
            codes[mm.group(1)] = codes.get(mm.group(1), 0) + int(mm.group(2))
        elif section is methods and (mm := re.match(r"\s+(\S+)\s*:\s*(\d+) Packets", line)):
            methods[mm.group(1)] = methods.get(mm.group(1), 0) + int(mm.group(2))
    return {"sip_messages": int(m.group(1)) if m else 0, "methods": methods, "status_codes": codes}


def tshark_frames(path) -> int:
    p = subprocess.run(["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "frame.number"],
                       capture_output=True, text=True)
    return len([ln for ln in p.stdout.splitlines() if ln.strip()])


def assert_sip_counts_match_tshark(path, rep):
    t = tshark_sip(path)
    assert t["sip_messages"] > 0 or rep["sip_messages"] == 0
    assert (rep["sip_messages"], rep["methods"], rep["status_codes"]) == \
        (t["sip_messages"], t["methods"], t["status_codes"])


def _comparable(rep: dict) -> dict:
    drop = ("file", "seconds", "capture_counters", "engine")
    return {k: v for k, v in rep.items() if k not in drop}


def _call_frames(src="10.0.0.1", dst="10.0.0.2", t0=1000.0, call_id="c1@x", big=False):
    """INVITE (optionally ~3 kB of SDP), 100, 200 (SDP), ACK, BYE, 200 as (ts, udp bytes) per IP pair."""
    body = pb.sdp(src, 40000) + (b"a=x-pad:" + b"p" * 3000 + b"\r\n" if big else b"")
    inv = pb.sip_invite(call_id, "z9hG4bK1", src, dst, body)
    msgs = [
        (t0, src, dst, inv),
        (t0 + 0.0012, dst, src, pb.sip_response(inv, 100, "Trying", "")),
        (t0 + 0.0500, dst, src, pb.sip_response(inv, 200, "OK", body=pb.sdp(dst, 50000))),
    ]
    return msgs


@needs_tshark
@pytest.mark.parametrize("variant", ["pcapng-editcap", "pcapng-tshark", "nsec", "sll", "sll2"])
def test_format_variants_give_identical_results(tmp_path, variant):
    src = SHARED / "sipnab__SIP_DTMF2.cap"
    if not src.is_file():
        pytest.skip("shared captures not present")
    out = tmp_path / f"v.{variant}"
    if variant == "pcapng-editcap":
        subprocess.run(["editcap", "-F", "pcapng", str(src), str(out)], check=True)
    elif variant == "pcapng-tshark":
        subprocess.run(["tshark", "-r", str(src), "-F", "pcapng", "-w", str(out)], check=True,
                       capture_output=True)
    elif variant == "nsec":
        subprocess.run(["editcap", "-F", "nsecpcap", str(src), str(out)], check=True)
    else:  # rewrite the Ethernet header as Linux cooked v1/v2 (tshark checks the result)
        lt, recs = pb.read_pcap(src.read_bytes())
        assert lt == 1
        wrap, new_lt = (pb.sll, 113) if variant == "sll" else (pb.sll2, 276)
        out.write_bytes(pb.write_raw(new_lt, [(s, u, wrap(f[14:], int.from_bytes(f[12:14], "big")))
                                              for s, u, f in recs]))
    base, rep = analyse(str(src)), analyse(str(out))
    assert_sip_counts_match_tshark(out, rep)
    check_against_facts(rep, SHARED_FACTS[src.name])
    assert _comparable(rep) == _comparable(base)


@needs_tshark
def test_a_packet_that_reaches_a_bug_is_skipped_and_the_report_survives(monkeypatch):
    """One packet that makes the analysis raise (a bug, here the RTP analyzer's, forced) cost
    the whole report: a traceback after reading the capture. It is now counted, named in a
    warning, and every other packet is analysed: the SIP figures still match tshark's."""
    from sipwatch.rtp import RtpAnalyzer

    path = ROOT / "pcaps" / "basic_call_rtp.pcap"
    real, calls = RtpAnalyzer.feed, [0]

    def feed(self, payload, src, dst, ts):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("a bug reached by this packet")
        return real(self, payload, src, dst, ts)
    monkeypatch.setattr(RtpAnalyzer, "feed", feed)
    rep = analyse(str(path))
    assert rep["capture_counters"]["internal_errors"] == 1
    assert any("1 packets reached an internal error" in w and "RuntimeError" in w for w in rep["warnings"])
    assert_sip_counts_match_tshark(path, rep)
    assert rep["packets"] == tshark_frames(path)


@needs_tshark
def test_pcapng_block_too_short_for_its_fields_is_skipped(tmp_path):
    """A packet block whose length leaves no room for its own fixed fields (found by
    tests/fuzz/fuzz_capture.py: read past the end of the file, the reader raised out of analyse)
    is counted and skipped; every other packet of the file is read as tshark reads them."""
    src = Path(__file__).resolve().parents[1] / "pcaps" / "callee_bye.pcap"
    ng = tmp_path / "ok.pcapng"
    subprocess.run(["editcap", "-F", "pcapng", str(src), str(ng)], check=True)
    raw = ng.read_bytes()
    blocks, off = [], 0
    while off < len(raw):  # (editcap writes little-endian)
        blen = int.from_bytes(raw[off + 4:off + 8], "little")
        blocks.append(raw[off:off + blen])
        off += blen
    short = (6).to_bytes(4, "little") + (12).to_bytes(4, "little") + (12).to_bytes(4, "little")
    first_packet = next(i for i, b in enumerate(blocks) if b[:4] == (6).to_bytes(4, "little"))
    for where in (first_packet + 1, len(blocks)):  # between packets, and the file's last block
        bad = tmp_path / f"short{where}.pcapng"
        bad.write_bytes(b"".join(blocks[:where]) + short + b"".join(blocks[where:]))
        rep = analyse(str(bad))
        assert rep["packets"] == tshark_frames(ng)
        assert rep["capture_counters"]["truncated"] == 1
        assert_sip_counts_match_tshark(ng, rep)
        assert any(w.startswith("warning: 1 frames or records cut short") for w in rep["warnings"])


@needs_tshark
def test_vlan_tunnels_and_loopback_links(tmp_path):
    """QinQ, IP-in-IP, IPv6-in-IPv4, raw IP and BSD loopback carry the same call."""
    cases = {
        "qinq": (1, lambda ip, fam: pb.eth(ip, 0x86DD if fam == 6 else 0x0800,
                                            vlans=[(0x88A8, 10), (0x8100, 20)])),
        "ipip": (101, lambda ip, fam: pb.ipv4("192.0.2.1", "192.0.2.2", 41 if fam == 6 else 4, ip)),
        "raw": (101, lambda ip, fam: ip),
        "null": (0, lambda ip, fam: (30 if fam == 6 else 2).to_bytes(4, "little") + ip),
    }
    for fam in (4, 6):
        a, b = ("10.0.0.1", "10.0.0.2") if fam == 4 else ("2001:db8::1", "2001:db8::2")
        for name, (lt, wrap) in cases.items():
            frames = []
            for ts, s, d, payload in _call_frames(a, b):
                dg = pb.udp(5060, 5060, payload)
                ip = pb.ipv4(s, d, 17, dg) if fam == 4 else pb.ipv6(s, d, 17, dg)
                frames.append((ts, wrap(ip, fam)))
            path = tmp_path / f"{name}{fam}.pcap"
            path.write_bytes(pb.pcap(lt, frames))
            rep = analyse(str(path))
            assert_sip_counts_match_tshark(path, rep)
            assert rep["txn"]["transactions"] == 1 and rep["txn"]["answered"] == 1, (name, fam)
            assert rep["txn"]["rtt_first_resp_ms_min"] == pytest.approx(1.2, abs=0.01)
            assert rep["calls"][0]["outcome"] == "answered"


@needs_tshark
def test_ip_fragments_are_reassembled(tmp_path):
    frames = []
    for fam, (a, b) in ((4, ("10.0.0.1", "10.0.0.2")), (6, ("2001:db8::1", "2001:db8::2"))):
        for ts, s, d, payload in _call_frames(a, b, t0=1000.0 + fam, call_id=f"frag{fam}@x",
                                              big=True):
            dg = pb.udp(5060, 5060, payload)
            if len(dg) > 1400:
                parts = pb.ipv4_fragments(s, d, 17, dg) if fam == 4 else \
                    pb.ipv6_fragments(s, d, 17, dg)
                parts = parts[1:] + parts[:1]  # first fragment last: order must not matter
                frames += [(ts - 0.0001 * (len(parts) - i), pb.eth(p, 0x86DD if fam == 6 else 0x0800))
                           for i, p in enumerate(parts)]
                frames[-1] = (ts, frames[-1][1])
            else:
                ip = pb.ipv4(s, d, 17, dg) if fam == 4 else pb.ipv6(s, d, 17, dg)
                frames.append((ts, pb.eth(ip, 0x86DD if fam == 6 else 0x0800)))
    path = tmp_path / "frag.pcap"
    path.write_bytes(pb.pcap(1, frames))
    rep = analyse(str(path))
    assert_sip_counts_match_tshark(path, rep)
    assert rep["methods"] == {"INVITE": 2}
    assert rep["capture_counters"]["ip_reassembled"] == 2
    assert rep["txn"]["answered"] == 2
    assert rep["txn"]["rtt_first_resp_ms_max"] == pytest.approx(1.2, abs=0.01)


@needs_tshark
def test_sip_over_tcp_is_framed_by_content_length(tmp_path):
    a, b = "10.0.0.1", "10.0.0.2"
    msgs = _call_frames(a, b)
    inv, trying, ok = (m[3] for m in msgs)
    inv = inv.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
    trying = trying.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
    ok = ok.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
    c_isn, s_isn = 1000, 0xFFFFFF00  # server side wraps its 32-bit sequence space
    seg = []

    def frame(ts, s, d, sp, dp, seq, data=b"", flags=0x18, ack=0):
        seg.append((ts, pb.eth(pb.ipv4(s, d, 6, pb.tcp(sp, dp, seq, data, flags, ack)))))

    c_ack, s_ack = s_isn + 1, c_isn + 1 + len(inv)  # what each side acknowledges
    frame(999.9, a, b, 40000, 5060, c_isn, flags=0x02)
    frame(999.9001, b, a, 5060, 40000, s_isn, flags=0x12, ack=c_isn + 1)
    cut1, cut2 = 100, 400  # INVITE in three segments, the middle one retransmitted
    frame(1000.0 - 0.0004, a, b, 40000, 5060, c_isn + 1, inv[:cut1], ack=c_ack)
    frame(1000.0 - 0.0003, a, b, 40000, 5060, c_isn + 1 + cut1, inv[cut1:cut2], ack=c_ack)
    frame(1000.0 - 0.0002, a, b, 40000, 5060, c_isn + 1 + cut1, inv[cut1:cut2], ack=c_ack)
    frame(1000.0, a, b, 40000, 5060, c_isn + 1 + cut2, inv[cut2:], ack=c_ack)
    frame(1000.0012, b, a, 5060, 40000, s_isn + 1, trying + ok[:50], ack=s_ack)  # one and a bit
    frame(1000.05, b, a, 5060, 40000, s_isn + 1 + len(trying) + 50, ok[50:], ack=s_ack)
    # a second connection joined mid-stream: the tail of an unseen message, then an OPTIONS
    opt = pb.sip_invite("o1@x", "z9hG4bKo1", a, b, transport="TCP").replace(
        b"INVITE", b"OPTIONS")
    frame(1000.2, a, b, 40002, 5060, 777, b"a=sendrecv\r\na=ptime:20\r\n", ack=5)
    frame(1000.3, a, b, 40002, 5060, 777 + 24, opt, ack=5)
    path = tmp_path / "tcp.pcap"
    path.write_bytes(pb.pcap(1, seg))
    rep = analyse(str(path))
    assert_sip_counts_match_tshark(path, rep)
    assert rep["methods"] == {"INVITE": 1, "OPTIONS": 1}
    assert rep["status_codes"] == {"100": 1, "200": 1}
    assert rep["txn"]["retransmitted_requests"] == 0
    assert rep["txn"]["rtt_first_resp_ms_min"] == pytest.approx(1.2, abs=0.01)
    assert rep["calls"][0]["outcome"] == "answered"


@needs_tshark
def test_malformed_inputs_are_counted_not_raised(tmp_path):
    a, b = "10.0.0.1", "10.0.0.2"
    ok_inv = pb.sip_invite("m1@x", "z9hG4bKm1", a, b)
    huge = pb.sip_invite("m2@x", "z9hG4bKm2", a, b, extra="X-Huge: " + "h" * 60000 + "\r\n")
    bad_cl = pb.sip_invite("m3@x", "z9hG4bKm3", a, b).replace(b"Content-Length: 0",
                                                              b"Content-Length: 500")
    junk = [b"\x00\x01\x02garbage", b"INVITE this is not sip\r\n\r\n", b"SIP/2.0 abc\r\n\r\n",
            b"OPTIONS sip:x SIP/2.0\r\nno colon here\r\n\r\n"]
    frames, t = [], 1000.0
    for p in [ok_inv, huge, bad_cl] + junk:
        t += 0.01
        frames.append((t, pb.eth(pb.ipv4(a, b, 17, pb.udp(5060, 5060, p)))))
    frames.append((t + 0.01, pb.eth(pb.ipv4(a, b, 17, pb.udp(7000, 7002, b"\x13" * 40)))))
    frames.append((t + 0.02, pb.eth(pb.ipv4(a, b, 17, pb.udp(5060, 5060, ok_inv)))[:30]))
    frames.append((t + 0.03, b"\x02\x00"))  # runt frame
    path = tmp_path / "malformed.pcap"
    path.write_bytes(pb.pcap(1, frames))
    rep = analyse(str(path))
    assert_sip_counts_match_tshark(path, rep)
    assert rep["errors"]["sip_parse_errors"] == len(junk)
    assert rep["errors"]["bad_content_length"] == 1
    assert rep["capture_counters"]["truncated"] == 2
    # a capture cut in the middle of a record: every whole frame before the cut is read
    src = (SHARED / "sipnab__SIP_DTMF2.cap")
    if src.is_file():
        cut = tmp_path / "cut.pcap"
        cut.write_bytes(src.read_bytes()[:200_000])
        rep = analyse(str(cut))
        assert rep["packets"] == tshark_frames(cut)
        assert rep["capture_counters"]["truncated"] == 1
    for junkfile in (b"", b"not a capture at all, just text\n" * 3):
        bad = tmp_path / "junk.pcap"
        bad.write_bytes(junkfile)
        assert analyze_main([str(bad)]) == 2


def test_unknown_link_type_is_counted(tmp_path):
    path = tmp_path / "lt.pcap"
    path.write_bytes(pb.pcap(147, [(1.0, b"\x00" * 60)]))  # LINKTYPE_USER0
    rep = analyse(str(path))
    assert rep["capture_counters"]["unknown_linktype"] == 1 and rep["sip_messages"] == 0


def test_retransmissions_counted_not_retimed_and_eof_is_not_a_timeout():
    obs = Observer(timer_b=32.0)
    a, b = ("10.0.0.1", 5060), ("10.0.0.2", 5060)
    inv = pb.sip_invite("r1@x", "z9hG4bKr1")
    obs.feed(inv, a, b, 100.0)
    obs.feed(inv, a, b, 100.5)  # retransmission: same per-hop key
    obs.feed(pb.sip_response(inv, 180, "Ringing"), b, a, 100.7)
    obs.feed(pb.sip_response(inv, 180, "Ringing"), b, a, 100.8)  # response retransmission
    obs.feed(pb.sip_response(inv, 200, "OK"), b, a, 101.0)
    lost = pb.sip_invite("r2@x", "z9hG4bKr2")
    obs.feed(lost, a, b, 102.0)  # never answered, times out inside the capture
    cut = pb.sip_invite("r3@x", "z9hG4bKr3")
    obs.feed(cut, a, b, 140.0)  # unanswered when the capture ends
    obs.feed(b"\r\n\r\n", a, b, 141.0)
    obs.finish()
    txs = {tx.call.call_id: tx for kind, tx in obs.drain_finished() if kind == "tx"}
    assert txs[b"r1@x"].rtt_ms == pytest.approx(700.0)
    assert txs[b"r1@x"].retrans == 2
    assert obs.stats.request_retransmissions == 1 and obs.stats.response_retransmissions == 1
    assert obs.tx_state(txs[b"r2@x"]) == "timeout"
    assert obs.tx_state(txs[b"r3@x"]) == "unanswered_at_eof"
    assert obs.stats.timeouts[0] == 1 and obs.eof_calls == 1
    assert obs.stats.keepalives == 1 and obs.stats.parse_errors == 0


def test_pyshark_engine_agrees_with_fast_path():
    pytest.importorskip("pyshark")
    if not HAVE_TSHARK:
        pytest.skip("tshark not installed")
    src = SHARED / "sipnab__sip-proxy.pcap"
    if not src.is_file():
        pytest.skip("shared captures not present")
    fast, slow = analyse(str(src)), analyse(str(src), engine="pyshark")
    check_against_facts(slow, SHARED_FACTS[src.name])
    drop = ("packets", "decoded_packets")
    assert {k: v for k, v in _comparable(fast).items() if k not in drop} == \
        {k: v for k, v in _comparable(slow).items() if k not in drop}


def test_cli_text_json_masking_and_errors(tmp_path, capsys):
    src = SHARED / "sipnab__sip-rtp-g711.pcap"
    if not src.is_file():
        pytest.skip("shared captures not present")
    assert analyze_main([str(tmp_path / "missing.pcap")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert analyze_main([str(src), "--json", "--mask-numbers", "full"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["txn"]["transactions"] == 3 and len(rep["rtp_streams"]) == 2
    assert all("sip:***@" in c["from"] for c in rep["calls"])
    tx = rep["transactions"][0]
    assert set(tx) >= {"src", "dst", "method", "cseq", "call_id", "rtt_ms"}
    assert set(rep["rtp_streams"][0]) >= {"src", "dst", "ssrc", "payload", "pkts", "lost",
                                          "max_delta_ms", "mean_jitter_ms", "max_jitter_ms", "mos"}
    assert analyze_main([str(src)]) == 0
    text = capsys.readouterr().out
    assert "Call " in text and "RTT ms min/median/max" in text and "MOS" in text
    p = subprocess.run([sys.executable, "-m", "sipwatch", "analyze", str(src)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and "Totals" in p.stdout


def test_hundred_thousand_packets(tmp_path):
    """A long capture (the shared g711 call repeated) keeps every count proportional."""
    src = SHARED / "sipnab__sip-rtp-g711.pcap"
    if not src.is_file():
        pytest.skip("shared captures not present")
    lt, recs = pb.read_pcap(src.read_bytes())
    span = recs[-1][0] - recs[0][0] + 60  # > Timer B: each copy is a new set of transactions
    out, k = [], 0
    while len(out) < 100_000:
        out.extend((s + k * span, u, f) for s, u, f in recs)
        k += 1
    out = out[: len(recs) * (100_000 // len(recs))]
    reps = len(out) // len(recs)
    path = tmp_path / "long.pcap"
    path.write_bytes(pb.write_raw(lt, out))
    rep = analyse(str(path))
    facts = SHARED_FACTS[src.name]
    assert rep["packets"] == len(out)
    assert rep["sip_messages"] == reps * facts["sip_messages"]
    assert rep["txn"]["transactions"] == reps * facts["txn"]["transactions"]
    assert rep["txn"]["answered"] == reps * facts["txn"]["answered"]
    assert rep["txn"]["rtt_first_resp_ms_max"] == pytest.approx(
        facts["txn"]["rtt_first_resp_ms_max"], abs=0.05)


def test_terminal_controls_from_a_capture_are_shown_escaped(tmp_path, capsys):
    """A capture's Call-ID, display name and codec name reach the text report and the waterfall:
    ESC sequences in them set the terminal's title, cleared the screen and faked report lines."""
    from sipwatch.waterfall import main as waterfall_main

    esc_id = "c1\x1b]0;title\x07\x1b[2J@x"
    offer = pb.sdp("10.0.0.1", 40000, pts=(96,)) + b"a=rtpmap:96 PCMA\x1b[1A\x1b[2KFAKE/8000\r\n"
    inv = pb.sip_invite("CALLID", "z9hG4bK1", body=offer).replace(
        b"CALLID", esc_id.encode()).replace(b'"Alice"', b'"Al\x1b[31mRED\xe2\x80\xae"')
    answer = pb.sdp("10.0.0.2", 50000)
    frames = [(1000.0, inv, "10.0.0.1", "10.0.0.2"),
              (1000.05, pb.sip_response(inv, 200, "OK", body=answer), "10.0.0.2", "10.0.0.1")]
    frames += [(1000.1 + i * 0.02, pb.rtp(i, i * 160, 0x11223344, pt=96), "10.0.0.2", "10.0.0.1") for i in range(10)]
    recs = [(t, pb.eth(pb.ipv4(s, d, 17, pb.udp(5060 if b"SIP" in p[:64] else 50000,
                                                 5060 if b"SIP" in p[:64] else 40000, p))))
            for t, p, s, d in frames]
    cap = tmp_path / "esc.pcap"
    cap.write_bytes(pb.pcap(1, recs))
    spans = tmp_path / "spans.jsonl"
    capsys.readouterr()
    assert analyze_main([str(cap), "--spans-file", str(spans), "--mask-call-id", "none"]) == 0
    report = capsys.readouterr().out
    assert waterfall_main([str(spans)]) == 0
    shown = capsys.readouterr().out
    for text in (report, shown):
        assert not any(c in text for c in "\x1b\x07\r\u202e"), text
        assert "\\x1b]0;title\\x07" in text
    assert "\\x1b[31mRED\\u202e" in report and "PCMA\\x1b[1A\\x1b[2KFAKE" in report


@needs_tshark
def test_a_call_open_at_the_end_of_the_capture_lasts_until_its_last_packet():
    """An answered call with no BYE in the capture ends at the capture's end (``eof``): its RTP
    runs 8.3 s past the 200 OK, and it ended at its last SIP message (duration 0.000 s)."""
    src = SHARED / "sipnab__sip-rtp-g711.pcap"
    if not src.is_file():
        pytest.skip("shared captures not present")
    times = subprocess.run(["tshark", "-n", "-r", str(src), "-T", "fields", "-e", "frame.time_epoch"],
                           capture_output=True, text=True, check=True).stdout.split()
    ok = subprocess.run(["tshark", "-n", "-r", str(src), "-Y",
                         'sip.Status-Code == 200 && sip.CSeq.method == "INVITE" && sip.Call-ID == "1-1968@10.0.2.20"',
                         "-T", "fields", "-e", "frame.time_epoch"], capture_output=True, text=True, check=True).stdout.split()
    (call,) = [c for c in analyse(str(src))["calls"] if c["call_sid"] == "1-1968@10.0.2.20"]
    assert call["ended_by"] == "eof" and call["outcome"] == "answered"
    assert call["duration_s"] == pytest.approx(max(map(float, times)) - float(ok[0]), abs=0.001)


@needs_tshark
def test_jitter_with_dtmf_follows_rfc3550_not_wireshark():
    """A clean G.711 stream with RFC 4733 DTMF events (PT 96 in its SDP): Wireshark pairs an
    event packet's arrival with the next audio packet's timestamp and reads max jitter 15.8 ms.
    RFC 3550 A.8 over the audio packets, computed here from tshark's per-packet fields, reads
    ~0.015 ms; so must we (we read tshark's 15.8 before)."""
    src = SHARED / "sipnab__SIP_DTMF2.cap"
    if not src.is_file():
        pytest.skip("shared captures not present")
    sdp = subprocess.run(["tshark", "-n", "-r", str(src), "-Y", "sdp", "-T", "fields", "-e", "sdp.media_attr"],
                         capture_output=True, text=True, check=True).stdout
    assert "rtpmap:96 telephone-event/8000" in sdp and "rtpmap:8 PCMA/8000" in sdp
    rows = subprocess.run(["tshark", "-n", "-r", str(src), "-o", "rtp.heuristic_rtp:TRUE", "-Y",
                           "rtp.ssrc == 0x5711BF84", "-T", "fields", "-e", "frame.time_epoch", "-e",
                           "rtp.timestamp", "-e", "rtp.p_type"], capture_output=True, text=True, check=True).stdout
    audio = [(float(t), int(ts)) for t, ts, pt in (r.split("\t") for r in rows.splitlines()) if pt == "8"]
    assert len(audio) > 600
    j = peak = 0.0
    for (r0, s0), (r1, s1) in zip(audio, audio[1:]):  # RFC 3550 A.8, in ms, at 8 kHz
        d = (r1 - r0) * 1000.0 - (s1 - s0) / 8.0
        j += (abs(d) - j) / 16
        peak = max(peak, j)
    (s,) = [x for x in analyse(str(src))["rtp_streams"] if x["ssrc"] == "0x5711BF84"]
    assert s["max_jitter_ms"] == pytest.approx(peak, abs=0.002) and peak < 0.1


@needs_tshark
def test_packets_stamped_back_in_time_are_counted_as_tshark_sees_them(tmp_path):
    """A capture merged from two clocks: a second host's call appended with stamps 5 s behind,
    and a 100 Trying stamped 0.2 s before the INVITE it answers. The report counts the steps
    back as tshark's frame deltas show them, warns, and gives no negative RTT."""
    frames = []
    for ts, s, d, payload in _call_frames(t0=1000.0, call_id="ahead@x"):
        frames.append((ts, pb.eth(pb.ipv4(s, d, 17, pb.udp(5060, 5060, payload)))))
    for ts, s, d, payload in _call_frames("10.0.1.1", "10.0.1.2", t0=995.0, call_id="behind@x"):
        frames.append((ts, pb.eth(pb.ipv4(s, d, 17, pb.udp(5060, 5060, payload)))))
    inv = pb.sip_invite("early@x", "z9hG4bK9", "10.0.2.1", "10.0.2.2")
    frames.append((1001.0, pb.eth(pb.ipv4("10.0.2.1", "10.0.2.2", 17, pb.udp(5060, 5060, inv)))))
    trying = pb.sip_response(inv, 100, "Trying", "")
    frames.append((1000.8, pb.eth(pb.ipv4("10.0.2.2", "10.0.2.1", 17, pb.udp(5060, 5060, trying)))))
    path = tmp_path / "merged.pcap"
    path.write_bytes(pb.pcap(1, frames))
    deltas = [float(x) for x in subprocess.run(
        ["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "frame.time_delta"],
        capture_output=True, text=True, check=True).stdout.split()]
    epochs = [float(x) for x in subprocess.run(
        ["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "frame.time_epoch"],
        capture_output=True, text=True, check=True).stdout.split()]
    # tshark's deltas are to the previous frame; ours to the latest stamp read so far
    latest, back, most = epochs[0], 0, 0.0
    for t in epochs[1:]:
        if t < latest - 0.001:
            back, most = back + 1, max(most, latest - t)
        latest = max(latest, t)
    assert sum(d < -0.001 for d in deltas) == 2 and back == 4  # (the behind call: all three of its frames)
    rep = analyse(str(path))
    assert rep["errors"]["time_backwards"] == back
    assert rep["errors"]["time_backwards_max_s"] == pytest.approx(most, abs=1e-6)
    assert any("stamped more than 1 ms earlier" in w and f"{most:.3f} s back" in w for w in rep["warnings"])
    assert rep["txn"]["rtt_first_resp_ms_min"] == 0.0 and rep["txn"]["answered"] == 3
