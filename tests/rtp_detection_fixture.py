"""Builds ``pcaps/rtp_detection/dns_netbios_rtp.pcap`` and its tshark facts.

``python tests/rtp_detection_fixture.py [OUT_DIR]`` (needs scapy and tshark).

The capture puts UDP that is not RTP next to real RTP, on the same timeline:

* the recorded SIPp calls of ``pcaps/basic_call_rtp.pcap`` (3 calls, G.711 both ways, streams
  tied to the calls by SDP);
* the RTP alone (its SIP left out) of the first call of ``pcaps/rtp_loss_jitter.pcap``: two
  streams only a heuristic can find, one of them with 10 lost packets and late ones;
* DNS (stub resolver on port 53, A/AAAA with answers), legacy-unicast mDNS (ephemeral port to
  5353 and back), LLMNR (to 5355), NetBIOS name service (137) and datagram service (138), all
  made with scapy; their transaction ids are chosen so that many start with a byte 0x80-0xBF
  (RTP's version 2) and some continue with 200-207 (RTCP's packet types);
* media keep-alives on the RTP addresses: an empty datagram, a zero byte, CRLFCRLF, a STUN
  binding indication, and RTP packets without payload under an SSRC of their own.

The facts file holds only what tshark says about the result (``-z rtp,streams`` with and without
heuristic RTP, and per-frame fields), see :func:`tshark_facts`.
"""
from __future__ import annotations

import json
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import pcapbuild as pb  # noqa: E402

NAME = "dns_netbios_rtp"
LO = "127.0.0.1"

_ROW = re.compile(
    r"^\s*[\d.]+\s+[\d.]+\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)\s+(0x[0-9A-Fa-f]+)\s+(.+?)\s+(\d+)\s+"
    r"(-?\d+) \(-?[\d.]+%\)\s+[-\d.]+\s+[-\d.]+\s+([-\d.]+)\s+[-\d.]+\s+([-\d.]+)\s+([-\d.]+)")


def tshark_rtp_streams(path, heuristic: bool = True) -> list[dict]:
    """``tshark -z rtp,streams`` as a list of rows (ssrc, src, dst, payload, pkts, lost, ...)."""
    args = ["tshark", "-n", "-q", "-r", str(path), "-z", "rtp,streams"]
    if heuristic:
        args[5:5] = ["-o", "rtp.heuristic_rtp:TRUE"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        m = _ROW.match(line)
        if m:
            g = m.groups()
            rows.append({"ssrc": g[4], "src": f"{g[0]}:{g[1]}", "dst": f"{g[2]}:{g[3]}",
                         "payload": g[5], "pkts": int(g[6]), "lost": int(g[7]),
                         "max_delta_ms": float(g[8]), "mean_jitter_ms": float(g[9]),
                         "max_jitter_ms": float(g[10])})
    return rows


def tshark_frames(path) -> list[dict]:
    """Per UDP frame, from tshark with heuristic RTP on: top protocol, ends, RTP SSRC and
    whether it carries an RTP payload."""
    fields = ("frame.protocols", "ip.src", "udp.srcport", "ip.dst", "udp.dstport", "udp.length",
              "rtp.ssrc", "rtp.payload", "rtp.padding.count")
    args = ["tshark", "-n", "-r", str(path), "-o", "rtp.heuristic_rtp:TRUE", "-Y", "udp",
            "-T", "fields", "-E", "separator=/t", "-E", "occurrence=f"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    frames = []
    for line in out.splitlines():
        v = line.split("\t")
        v += [""] * (len(fields) - len(v))
        frames.append({"top": v[0].split(":")[-1], "src": f"{v[1]}:{v[2]}", "dst": f"{v[3]}:{v[4]}",
                       "udp_payload": int(v[5]) - 8, "rtp_ssrc": v[6] or None,
                       "rtp_payload": bool(v[7])})
    return frames


def tshark_facts(path) -> dict:
    frames = tshark_frames(path)
    by_top: dict[str, int] = {}
    for f in frames:
        by_top[f["top"]] = by_top.get(f["top"], 0) + 1
    with_payload = {(f["rtp_ssrc"].lower(), f["src"], f["dst"]) for f in frames
                    if f["rtp_ssrc"] and f["rtp_payload"]}
    heur, sdp = tshark_rtp_streams(path, True), tshark_rtp_streams(path, False)
    for s in heur + sdp:
        # a stream of RTP packets without payload (keep-alives) carries no media
        s["carries_media"] = (s["ssrc"].lower(), s["src"], s["dst"]) in with_payload
    return {
        "udp_frames": len(frames),
        "udp_frames_by_top_protocol": dict(sorted(by_top.items())),
        "udp_payloads_under_12_bytes": sum(1 for f in frames if f["udp_payload"] < 12),
        "rtp_frames_without_payload": sum(1 for f in frames if f["rtp_ssrc"] and not f["rtp_payload"]),
        "rtp_sdp_streams": sdp,
        "rtp_heur_streams": heur,
    }


# -- building -------------------------------------------------------------------------------------
def _frames_of(path: Path) -> list[tuple[float, bytes]]:
    lt, recs = pb.read_pcap(path.read_bytes())
    assert lt == 1, lt
    return [(s + u / 1e6, f) for s, u, f in recs]


def _udp(src, sport, dst, dport, payload: bytes) -> bytes:
    return pb.eth(pb.ipv4(src, dst, 17, pb.udp(sport, dport, payload)))


def _ids(rnd: random.Random, n: int) -> list[int]:
    """Transaction ids: 3 of 4 read as RTP version 2, some of those as RTCP (200-207)."""
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append(rnd.randrange(0x4000))
        elif i % 4 == 1:
            out.append(0x8000 | rnd.randrange(0x40) << 8 | rnd.randrange(200, 208))
        else:
            out.append(0x8000 | rnd.randrange(0x4000))
    return out


def build() -> list[tuple[float, bytes]]:
    from scapy.all import DNS, DNSQR, DNSRR, IP, UDP, Ether, raw
    from scapy.layers.llmnr import LLMNRQuery
    from scapy.layers.netbios import NBNSHeader, NBNSQueryRequest, NBTDatagram

    def scapy_udp(src, sport, dst, dport, layer) -> bytes:
        return raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst)
                   / UDP(sport=sport, dport=dport) / layer)

    rnd = random.Random(20261201)
    frames = _frames_of(ROOT / "pcaps" / "basic_call_rtp.pcap")
    t0 = frames[0][0]
    # heuristic-only RTP: the first call's media of rtp_loss_jitter, without its SIP
    lj = _frames_of(ROOT / "pcaps" / "rtp_loss_jitter.pcap")
    keep = {0xC16FC8C5, 0xC16FC8C6}
    media = [(ts, f) for ts, f in lj if len(f) >= 54 and f[23] == 17
             and f[42] >> 6 == 2 and struct.unpack_from("!I", f, 50)[0] in keep]
    assert len(media) == 192, len(media)
    shift = t0 + 2.5 - media[0][0]
    frames += [(ts + shift, f) for ts, f in media]

    # DNS from a stub resolver: a fresh source port per query, A then AAAA, answered
    for i, qid in enumerate(_ids(rnd, 40)):
        t = t0 + 0.05 + i * 0.13
        port = 33000 + rnd.randrange(20000)
        name = f"host{i}.example.org"
        qtype = "AAAA" if i % 2 else "A"
        rdata = f"2001:db8::{i + 1:x}" if i % 2 else f"192.0.2.{i + 1}"
        frames.append((t, scapy_udp(LO, port, "127.0.0.53", 53,
                                    DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype=qtype)))))
        frames.append((t + 0.0007, scapy_udp("127.0.0.53", 53, LO, port, DNS(
            id=qid, qr=1, rd=1, ra=1, qd=DNSQR(qname=name, qtype=qtype),
            an=DNSRR(rrname=name, type=qtype, ttl=300, rdata=rdata)))))
    # legacy unicast mDNS: one client port, queries to 5353 and answers back (both ports high)
    for i, qid in enumerate(_ids(rnd, 24)):
        t = t0 + 0.11 + i * 0.21
        name = f"printer{i % 3}.local"
        frames.append((t, scapy_udp(LO, 47000, LO, 5353, DNS(id=qid, qd=DNSQR(qname=name)))))
        frames.append((t + 0.0011, scapy_udp(LO, 5353, LO, 47000, DNS(
            id=qid, qr=1, aa=1, qd=DNSQR(qname=name),
            an=DNSRR(rrname=name, ttl=10, rdata=f"192.0.2.{100 + i % 3}")))))
    # LLMNR queries from one port
    for i, qid in enumerate(_ids(rnd, 16)):
        frames.append((t0 + 0.07 + i * 0.3, scapy_udp(LO, 48000, "224.0.0.252", 5355,
                                                      LLMNRQuery(id=qid, qd=DNSQR(qname=f"ws{i}")))))
    # NetBIOS name service broadcasts and datagram service
    for i, tid in enumerate(_ids(rnd, 20)):
        frames.append((t0 + 0.03 + i * 0.25, scapy_udp(LO, 137, "127.255.255.255", 137, NBNSHeader(
            NAME_TRN_ID=tid) / NBNSQueryRequest(QUESTION_NAME=f"WORKGROUP{i % 4}"))))
    for i, did in enumerate(_ids(rnd, 8)):
        frames.append((t0 + 0.2 + i * 0.6, scapy_udp(LO, 138, "127.255.255.255", 138, NBTDatagram(
            Type=0x11, ID=did, SourceIP=LO, SourcePort=138, SourceName="HOST", DestinationName="WORKGROUP")
            / (b"\xff" + b"SMB" + b"\x25" + bytes(27)))))

    # keep-alives on media addresses (SDP-tied 35140/35150, heuristic 35240/35250)
    stun = struct.pack("!HHI", 0x0011, 0, 0x2112A442) + bytes(range(12))
    ka = [(t0 + 0.50, 35150, 35140, b""), (t0 + 0.55, 35140, 35150, b"\x00"),
          (t0 + 0.60, 35150, 35140, b"\r\n\r\n"), (t0 + 0.65, 35140, 35150, stun),
          (t0 + 3.50, 35250, 35240, b"\x00"), (t0 + 3.60, 35240, 35250, b"")]
    for t, sport, dport, data in ka:
        frames.append((t, _udp(LO, sport, LO, dport, data)))
    # RTP without payload, an SSRC of its own, on the first call's media ports
    for k in range(3):
        frames.append((t0 + 0.3 + k * 0.5, _udp(LO, 35150, LO, 35140,
                                                 struct.pack("!BBHII", 0x80, 0, 7 + k, 160 * k, 0xBEEF))))
    frames.sort(key=lambda f: f[0])
    return frames


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else ROOT / "pcaps" / "rtp_detection"
    out.mkdir(parents=True, exist_ok=True)
    pcap = out / f"{NAME}.pcap"
    pcap.write_bytes(pb.pcap(1, build()))
    facts = tshark_facts(pcap)
    (out / f"{NAME}.facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    print(json.dumps({k: v for k, v in facts.items() if not k.startswith("rtp_")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
