"""What a tap or a mirror port delivers, read by the fast reader and judged by tshark.

Fixtures in ``pcaps/tap/`` (made by ``python -m tests.tap_fixtures``): the first call of a
recorded SIPp capture wrapped in PPPoE, QinQ+PPPoE, MPLS, an Ethernet pseudowire, GRE, ERSPAN
I/II/III, VXLAN, Geneve, GTP-U, L2TPv2, IP-in-IP, IPv4-in-IPv6 and IPv6-in-IPv4; SIP over SCTP
(which the fast reader does not open, so it must say so); a SIP/TCP message over 64 KiB and
keep-alives on 5060, both recorded on loopback. Every expectation comes from tshark (the stored
facts, checked against tshark again here, or tshark run on a capture built in the test).
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import pcapbuild as pb
from capture.analyze import analyse, main as analyze_main, render
from capture.pcapfile import Decoder, MAX_TUNNEL_DEPTH, is_sip_keepalive, read_packets
from capture.tshark_facts import facts, have_tshark, sip_stat
from harness import metric, scrape, stop_process
from test_analyze import check_against_facts

ROOT = Path(__file__).resolve().parents[1]
TAP = ROOT / "pcaps" / "tap"
ALL = sorted(p.stem for p in TAP.glob("*.pcap"))
UNDECODED = "tap_undecoded_sctp"
WRAPPED = [n for n in ALL if n.startswith("tap_") and n != UNDECODED]
needs_tshark = pytest.mark.skipif(not have_tshark(), reason="needs tshark")


def stored(name: str) -> dict:
    return json.loads((TAP / f"{name}.facts.json").read_text())


def _tshark_fields(path, *fields, display_filter=None) -> list[list[str]]:
    args = ["tshark", "-n", "-r", str(path), "-T", "fields", "-E", "occurrence=a"]
    if display_filter:
        args += ["-Y", display_filter]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [ln.split("\t") for ln in out.splitlines() if ln.strip()]


def _comparable(rep: dict) -> dict:
    return {k: v for k, v in rep.items() if k not in ("file", "seconds")}


def test_fixture_set_covers_every_encapsulation():
    want = {"tap_pppoe", "tap_qinq_pppoe", "tap_mpls", "tap_mpls_pw", "tap_gre", "tap_erspan1", "tap_erspan2",
            "tap_erspan3", "tap_vxlan", "tap_geneve", "tap_gtpu", "tap_l2tp", "tap_ipip", "tap_ip_in_ipv6",
            "tap_ipv6_in_ipv4", UNDECODED, "tcp_big_message", "sip_keepalives"}
    assert want <= set(ALL)
    assert sum((TAP / f"{n}.pcap").stat().st_size for n in ALL) < 600_000


@needs_tshark
@pytest.mark.parametrize("name", ALL)
def test_facts_file_matches_tshark_now(name):
    want = stored(name)
    want.pop("fixture")
    assert facts(str(TAP / f"{name}.pcap")) == want


@needs_tshark
@pytest.mark.parametrize("name", WRAPPED)
def test_tshark_sees_the_encapsulation_and_the_sip_inside(name):
    """The fixture really is what its name says, by tshark's reading (not by ours)."""
    layer = {"tap_pppoe": "pppoes", "tap_qinq_pppoe": "pppoes", "tap_mpls": "mpls", "tap_mpls_pw": "pwethcw",
             "tap_gre": "gre", "tap_erspan1": "erspan", "tap_erspan2": "erspan", "tap_erspan3": "erspan",
             "tap_vxlan": "vxlan", "tap_geneve": "geneve", "tap_gtpu": "gtp", "tap_l2tp": "l2tp",
             "tap_ipip": "ip:ip", "tap_ip_in_ipv6": "ipv6:ip", "tap_ipv6_in_ipv4": "ip:ipv6"}[name]
    rows = _tshark_fields(TAP / f"{name}.pcap", "frame.protocols")
    assert rows and all(f":{layer}:" in f":{r[0]}:" for r in rows)
    assert stored(name)["sip_messages"] == 7 and stored(name)["txn"]["answered"] == 2


@needs_tshark
@pytest.mark.parametrize("name", WRAPPED)
def test_wrapped_fixture_matches_tshark(name):
    f = stored(name)
    rep = analyse(str(TAP / f"{name}.pcap"))
    check_against_facts(rep, f)
    assert rep["packets"] == int(f["packets"])
    assert rep["decoded_packets"] == int(f["packets"])  # every frame opened down to its UDP datagram
    assert "undecoded" not in rep["capture_counters"] and rep["warnings"] == []
    assert sum(rep["capture_counters"]["encapsulations"].values()) >= int(f["packets"])
    assert len(rep["rtp_streams"]) == len(f["rtp_sdp_streams"]) == 2


@needs_tshark
@pytest.mark.parametrize("name", WRAPPED + ["tcp_big_message", "sip_keepalives"])
def test_pcapng_copy_gives_the_same_report(tmp_path, name):
    ng = tmp_path / f"{name}.pcapng"
    subprocess.run(["editcap", "-F", "pcapng", str(TAP / f"{name}.pcap"), str(ng)], check=True)
    assert ng.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"
    assert _comparable(analyse(str(ng))) == _comparable(analyse(str(TAP / f"{name}.pcap")))


@needs_tshark
def test_pcapng_with_two_link_types(tmp_path):
    """One pcapng, two interfaces: PPPoE on Ethernet, and SIP/TCP on Linux cooked v2 (SLL2)."""
    lt, recs = pb.read_pcap((ROOT / "pcaps" / "tcp_call.pcap").read_bytes())
    assert lt == 1
    sll2 = [(s, u, pb.sll2(frame[14:], struct.unpack_from("!H", frame, 12)[0])) for s, u, frame in recs]
    cooked = tmp_path / "tcp_sll2.pcap"
    cooked.write_bytes(pb.write_raw(276, sll2))
    merged = tmp_path / "merged.pcapng"
    subprocess.run(["mergecap", "-F", "pcapng", "-w", str(merged), str(TAP / "tap_pppoe.pcap"), str(cooked)],
                   check=True)
    encaps = {r[0] for r in _tshark_fields(merged, "frame.interface_id")}
    assert encaps == {"0", "1"}
    want = facts(str(merged))
    assert want["sip_messages"] == stored("tap_pppoe")["sip_messages"] + 21
    rep = analyse(str(merged))
    check_against_facts(rep, want)
    assert rep["packets"] == int(want["packets"]) and rep["warnings"] == []


@needs_tshark
def test_undecoded_transport_is_reported_loudly(capsys):
    """SIP over SCTP: tshark finds the SIP messages; the fast reader cannot, and says so instead of
    handing back an empty clean result."""
    f = stored(UNDECODED)
    path = TAP / f"{UNDECODED}.pcap"
    assert f["sip_messages"] > 0 and int(f["packets"]) == f["sip_messages"]
    rep = analyse(str(path))
    assert rep["sip_messages"] == 0
    c = rep["capture_counters"]
    assert c["undecoded"] == int(f["packets"])
    assert c["undecoded_types"] == {"ip_proto:132": f["sip_messages"]}
    assert len(rep["warnings"]) == 1
    assert f"{f['sip_messages']} of {f['packets']} frames not decoded" in rep["warnings"][0]
    assert "ip_proto:132" in rep["warnings"][0]
    assert rep["warnings"][0] in render(rep).splitlines()
    assert analyze_main([str(path)]) == 0
    assert "warning:" in capsys.readouterr().out
    assert analyze_main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["warnings"] == rep["warnings"]
    assert out["capture_counters"]["undecoded_types"] == {"ip_proto:132": f["sip_messages"]}


@needs_tshark
def test_unknown_ethertype_linktype_and_non_ip_are_reported(tmp_path):
    inv = pb.sip_invite("e1@x", "z9hG4bKe1")
    sip = pb.ipv4("10.0.0.1", "10.0.0.2", 17, pb.udp(5060, 5060, inv))
    # MACsec (0x88E5): encrypted, not opened; an ARP frame is known not to carry IP
    macsec = pb.eth(b"\x2c\x00\x00\x00\x00\x01" + sip + b"\x00" * 16, etype=0x88E5)
    arp = pb.eth(b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\x00" * 20, etype=0x0806)
    path = tmp_path / "macsec.pcap"
    path.write_bytes(pb.pcap(1, [(1.0, macsec), (2.0, arp), (3.0, pb.eth(sip))]))
    rows = _tshark_fields(path, "frame.protocols")
    assert [("macsec" in r[0], "arp" in r[0], "sip" in r[0]) for r in rows] == \
        [(True, False, False), (False, True, False), (False, False, True)]
    rep = analyse(str(path))
    assert rep["sip_messages"] == 1 and rep["packets"] == len(rows)
    assert rep["capture_counters"]["undecoded_types"] == {"ethertype:0x88e5": 1}
    assert rep["capture_counters"]["non_ip_types"] == {"arp": 1}
    assert len(rep["warnings"]) == 1 and "ethertype:0x88e5 (1)" in rep["warnings"][0]
    # a link type the reader does not know: every frame counted by link type, and a warning
    lt = tmp_path / "user0.pcap"
    lt.write_bytes(pb.pcap(147, [(1.0, pb.eth(sip)), (2.0, pb.eth(sip))]))
    rep = analyse(str(lt))
    assert rep["capture_counters"]["undecoded_types"] == {"linktype:147": 2}
    assert rep["warnings"] and "2 of 2 frames" in rep["warnings"][0]
    # only non-IP frames: no warning about undecoded frames, but never an empty clean result
    only_arp = tmp_path / "arp.pcap"
    only_arp.write_bytes(pb.pcap(1, [(1.0, arp), (2.0, arp)]))
    rep = analyse(str(only_arp))
    assert rep["packets"] == 2 and rep["sip_messages"] == 0
    assert rep["warnings"] == ["warning: 2 frames but no UDP or SIP/TCP decoded from them: arp (2)"]


@needs_tshark
def test_nested_tunnels_agree_with_tshark_and_are_bounded(tmp_path):
    inv = pb.sip_invite("n1@x", "z9hG4bKn1")
    inner = pb.ipv4("10.0.0.1", "10.0.0.2", 17, pb.udp(5060, 5060, inv))
    shallow = inner
    for _ in range(3):
        shallow = pb.ipv4("192.0.2.1", "192.0.2.2", 4, shallow)
    path = tmp_path / "ipip3.pcap"
    path.write_bytes(pb.pcap(1, [(1.0, pb.eth(shallow))]))
    assert facts(str(path))["sip_messages"] == 1
    rep = analyse(str(path))
    assert rep["sip_messages"] == 1 and rep["capture_counters"]["encapsulations"] == {"ipip": 3}
    deep = inner
    for _ in range(200):  # forged: far deeper than any network nests; not followed, counted
        deep = pb.ipv4("192.0.2.1", "192.0.2.2", 4, deep[:65000 - 20])
    deep_path = tmp_path / "ipip200.pcap"
    deep_path.write_bytes(pb.pcap(1, [(1.0, pb.eth(deep))]))
    rep = analyse(str(deep_path))
    assert rep["sip_messages"] == 0
    assert rep["capture_counters"]["undecoded_types"] == {"tunnel_depth": 1}
    assert rep["capture_counters"]["encapsulations"] == {"ipip": MAX_TUNNEL_DEPTH}
    assert rep["warnings"]


@needs_tshark
def test_keepalives_on_5060_are_keepalives_not_parse_errors():
    """What tshark does not read as SIP on port 5060 is exactly what is counted as keep-alives."""
    f = stored("sip_keepalives")
    path = TAP / "sip_keepalives.pcap"
    rows = _tshark_fields(path, "frame.protocols", "udp.length", display_filter="udp.port == 5060")
    not_sip = [r for r in rows if ":sip" not in r[0]]
    assert len(not_sip) == f["fixture"]["keepalives"] == 8
    assert all(int(r[1]) - 8 <= 20 for r in not_sip)
    rep = analyse(str(path))
    check_against_facts(rep, f)
    assert rep["errors"]["keepalives"] == len(not_sip)
    assert rep["errors"]["sip_parse_errors"] == 0
    assert rep["packets"] == int(f["packets"]) and rep["sip_messages"] == f["sip_messages"] < rep["packets"]
    assert rep["rtp_streams"] == []


def test_keepalive_shapes():
    for ka in (b"", b"\r\n", b"\r\n\r\n", b"hello", b"jaK", b"jaK\r\n", b"\x00\x00\x00\x00", b"ping\r\n",
               b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"t" * 12,
               b"\x01\x01\x00\x0c\x21\x12\xa4\x42" + b"t" * 12 + b"\x00\x20\x00\x08" + b"m" * 8):
        assert is_sip_keepalive(ka), ka
    for not_ka in (b"INVITE sip:a@b SIP/2.0\r\n\r\n", b"SIP/2.0", b"\x00\x01\x02garbage", b"a" * 17,
                   b"\x80" * 12, b"hello world", b"\x00\x01\x00\x04\x21\x12\xa4\x42" + b"t" * 12,
                   b"\x80\x01\x00\x00\x21\x12\xa4\x42" + b"t" * 12, b"\r\n" * 33):
        assert not is_sip_keepalive(not_ka), not_ka


@needs_tshark
def test_packets_means_frames_read_in_both_engines():
    pytest.importorskip("pyshark")
    f = stored("sip_keepalives")
    path = str(TAP / "sip_keepalives.pcap")
    fast, slow = analyse(path), analyse(path, engine="pyshark")
    assert fast["packets"] == slow["packets"] == int(f["packets"])
    assert fast["sip_messages"] == slow["sip_messages"] == f["sip_messages"]


@needs_tshark
def test_sip_tcp_message_over_64k_is_reassembled():
    f = stored("tcp_big_message")
    path = TAP / "tcp_big_message.pcap"
    rows = _tshark_fields(path, "tcp.reassembled.length", "sip.CSeq", display_filter="sip && tcp.reassembled.length")
    big = {int(r[0]) for r in rows}
    assert len(big) == 1 and min(big) > 65535
    msgs = list(read_packets(path))
    assert len(msgs) == f["sip_messages"] and all(p.transport == "tcp" for p in msgs)
    assert sorted(len(p.payload) for p in msgs)[-1] == big.pop()
    # the cap: skipped, counted, said, and the message after it still framed
    rep = analyse(str(path), max_sip_message=64 << 10)
    assert rep["capture_counters"]["sip_oversized"] == 1
    assert rep["sip_messages"] == f["sip_messages"] - 1 and rep["methods"] == {"MESSAGE": 2}
    assert rep["txn"]["answered"] == 2 and rep["errors"]["unmatched_responses"] == 1
    assert any("larger than --max-sip-message" in w for w in rep["warnings"])
    assert rep["errors"]["keepalives"] == f["fixture"]["crlf_keepalives"]
    # the whole analysis: the message parser accepts what the reader framed
    rep = analyse(str(path))
    check_against_facts(rep, f)
    assert rep["errors"]["sip_parse_errors"] == 0 and rep["warnings"] == []


def test_tcp_framing_cost_is_linear_in_segments():
    """A 1 MiB body in 1,000-byte segments: each byte is copied a bounded number of times (the
    segments are joined once the body is complete), counted by the buffer the flow holds."""
    c: dict = {}
    dec = Decoder(c, max_sip_message=2 << 20)
    body = b"b" * (1 << 20)
    msg = (b"MESSAGE sip:x@y SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bKl\r\nCall-ID: l@x\r\n"
           b"CSeq: 1 MESSAGE\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    seq, out, held = 1000, [], []
    for i in range(0, len(msg), 1000):
        chunk = msg[i:i + 1000]
        tcp = struct.pack("!HHIIBBHHH", 5060, 5060, seq, 0, 0x50, 0x18, 65535, 0, 0) + chunk
        seq += len(chunk)
        out += dec.frame(101, pb.ipv4("10.0.0.1", "10.0.0.2", 6, tcp), 1.0)
        held.append(len(next(iter(dec.flows.values())).buf))
    assert [len(p.payload) for p in out] == [len(msg)]
    assert max(held) < 4096  # the bytes wait as segments, not in a buffer rebuilt per segment


PROTO_PREFIXES = [
    (1, b"\x02" * 12 + b"\x88\x64\x11\x00\x00\x01\x00\x40\x00\x21"),  # PPPoE
    (1, b"\x02" * 12 + b"\x88\x47\x00\x01\x01\x40"),  # MPLS
    (1, b"\x02" * 12 + b"\x81\x00\x00\x01\x88\xa8\x00\x02\x08\x00"),  # VLANs
    (101, pb.ipv4("1.1.1.1", "2.2.2.2", 47, b"")[:20] + b"\x10\x00\x88\xbe\x00\x00\x00\x01"),  # ERSPAN II
    (101, pb.ipv4("1.1.1.1", "2.2.2.2", 47, b"")[:20] + b"\x10\x00\x22\xeb\x00\x00\x00\x01"),  # ERSPAN III
    (101, pb.ipv4("1.1.1.1", "2.2.2.2", 17, b"")[:20] + b"\x00\x01\x12\xb5\x00\x40\x00\x00"),  # VXLAN
    (101, pb.ipv4("1.1.1.1", "2.2.2.2", 17, b"")[:20] + b"\x00\x01\x17\xc1\x00\x40\x00\x00"),  # Geneve
    (101, pb.ipv4("1.1.1.1", "2.2.2.2", 17, b"")[:20] + b"\x08\x68\x08\x68\x00\x40\x00\x00"),  # GTP-U
    (101, pb.ipv4("1.1.1.1", "2.2.2.2", 17, b"")[:20] + b"\x06\xa5\x06\xa5\x00\x40\x00\x00"),  # L2TP
    (9, b"\xff\x03\x00\x21"), (51, b"\x11\x00\x00\x01\x00\x40\x00\x21"), (104, b"\x0f\x00\x08\x00"),
    (113, b"\x00" * 14 + b"\x88\x64"), (276, b"\x88\x47" + b"\x00" * 18), (0, b"\x02\x00\x00\x00"),
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PROTO_PREFIXES), st.binary(max_size=300))
def test_decoder_never_raises_on_forged_encapsulations(prefix, tail):
    lt, head = prefix
    c: dict = {}
    out = Decoder(c).frame(lt, head + tail, 1.0)
    assert isinstance(out, list)
    nested = {k: v for k, v in c.get("encapsulations", {}).items() if k != "pppoe"}
    assert sum(nested.values()) <= MAX_TUNNEL_DEPTH
    assert c.get("encapsulations", {}).get("pppoe", 0) <= MAX_TUNNEL_DEPTH + 1
    assert len(c.get("undecoded_types", {})) <= 64


@needs_tshark
@pytest.mark.parametrize("name", ["tap_vxlan", "tap_erspan3", "tap_gtpu", "tap_ipv6_in_ipv4", UNDECODED])
def test_pyshark_engine_reads_the_innermost_headers(name):
    """The cross-check engine (tshark's dissectors) reads each tunnel's inner hop, and SIP over
    SCTP, which the warning of the fast reader points to."""
    pytest.importorskip("pyshark")
    f = stored(name)
    rep = analyse(str(TAP / f"{name}.pcap"), engine="pyshark")
    check_against_facts(rep, f)
    assert rep["packets"] == int(f["packets"])
    if name == UNDECODED:
        assert f["sip_transport"] == ["SCTP"] and rep["sip_messages"] == f["sip_messages"] > 0


@needs_tshark
@pytest.mark.skipif(shutil.which("dumpcap") is None, reason="needs dumpcap")
def test_live_capture_opens_vxlan_and_counts_what_it_cannot(tmp_path):
    """``sipwatch capture`` on lo while VXLAN datagrams (the tap_vxlan fixture's, re-sent through
    the kernel to port 4789), TZSP datagrams (a tunnel the reader does not open) and a ``hello``
    keep-alive to 5060 pass; a second dumpcap records the same traffic for tshark."""
    from test_live_capture import Capture

    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    sport = sender.getsockname()[1]
    bpf = f"udp src port {sport}"
    _, recs = pb.read_pcap((TAP / "tap_vxlan.pcap").read_bytes())
    vxlan = [frame[14 + 20 + 8:] for _, _, frame in recs]  # VXLAN header + the mirrored frame
    sip_frames = [v[8:] for v in vxlan if b"SIP/2.0" in v[:200]]
    tzsp = [b"\x01\x00\x00\x01\x01" + f for f in sip_frames[:3]]  # v1, received, Ethernet, END tag
    truth = tmp_path / "truth.pcap"
    dumpcap = subprocess.Popen(["dumpcap", "-q", "-P", "-i", "lo", "-f", bpf, "-w", str(truth)],
                               stderr=subprocess.PIPE, text=True)
    try:
        assert "Capturing on" in dumpcap.stderr.readline()
        with Capture(tmp_path, bpf, "127.0.0.1:35160") as cap:
            for v in vxlan:
                sender.sendto(v, ("127.0.0.1", 4789))
                time.sleep(0.005)
            for t in tzsp:
                sender.sendto(t, ("127.0.0.1", 37008))
            sender.sendto(b"hello", ("127.0.0.1", 5060))
            want_frames = len(vxlan) + len(tzsp) + 1
            deadline = time.monotonic() + 30  # generous: only a stuck capture takes this long
            while metric(scrape(cap.gw), "sipwatch_capture_frames_total") < want_frames \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
            m = scrape(cap.gw)
            assert cap.stop() == 0
    finally:
        time.sleep(0.3)
        stop_process(dumpcap, signal.SIGINT)
        sender.close()
    # tshark's reading of the same traffic
    _, in_vxlan_methods, in_vxlan_codes = sip_stat(str(truth), "vxlan")
    _, in_tzsp_methods, _ = sip_stat(str(truth), "tzsp")
    rows = _tshark_fields(truth, "frame.protocols")
    assert len(rows) == want_frames and sum(in_tzsp_methods.values()) > 0
    assert metric(m, "sipwatch_capture_frames_total") == len(rows)
    assert metric(m, "sipwatch_capture_encapsulated_frames_total", encapsulation="vxlan") == \
        sum(":vxlan:" in r[0] + ":" for r in rows) == len(vxlan)
    assert metric(m, "sipwatch_capture_undecoded_frames_total", type="tzsp") == \
        sum(":tzsp:" in r[0] + ":" for r in rows) == len(tzsp)
    for meth, n in in_vxlan_methods.items():
        assert metric(m, "sip_requests_total", method=meth) == n, meth
    assert metric(m, "sip_responses_total") == sum(in_vxlan_codes.values())
    assert metric(m, "sip_keepalives_total") == 1 and metric(m, "sip_parse_errors_total") == 0
    warned = [e for e in cap.events() if e.get("event") == "capture_undecoded"]
    assert warned and warned[0]["types"] == {"tzsp": len(tzsp)}
