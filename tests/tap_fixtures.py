"""Tap and mirror-port fixtures: recorded SIPp traffic wrapped in the encapsulations a tap delivers.

``python -m tests.tap_fixtures OUTDIR [NAME ...]`` reads the first call of
``pcaps/basic_call_rtp.pcap`` (real SIPp signalling plus the first RTP packets of each direction),
wraps every IP packet of it with scapy (PyPI ``scapy``; only this generator needs it) in one
encapsulation per ``tap_*`` fixture, keeps each packet's timestamp, and writes
``OUTDIR/<name>.pcap`` with ``OUTDIR/<name>.facts.json`` whose figures come only from tshark
(:mod:`capture.tshark_facts`). Two more are recorded on loopback with dumpcap (root, SIPp):
``tcp_big_message`` (a SIP/TCP message over 64 KiB) and ``sip_keepalives`` (keep-alives on 5060).
The tests make pcapng copies (``editcap``/``mergecap``), so both file formats are covered.

The inner packets stay as recorded (127.0.0.1, the fixture's ports); outer addresses are from
the documentation ranges (192.0.2.0/24, 198.51.100.0/24, 2001:db8::/32).
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from capture.tshark_facts import facts

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "pcaps" / "basic_call_rtp.pcap"
RTP_PER_STREAM = 12  # RTP packets kept per direction (contiguous from the first: no induced loss)
GATEWAY, SIGNALING = "127.0.0.1:35161", "127.0.0.1:35160"
O4A, O4B = "192.0.2.1", "198.51.100.1"
O6A, O6B = "2001:db8::1", "2001:db8::2"
MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"


def source_packets():
    """(timestamp, inner IPv4 packet) of the source's first call, as scapy packets."""
    from scapy.all import IP, UDP, rdpcap

    out, per_stream = [], {}
    first_call = None
    for p in rdpcap(str(SOURCE)):
        if IP not in p or UDP not in p:
            continue
        payload = bytes(p[UDP].payload)
        if b"SIP/2.0" in payload[:200]:
            cid = next((ln for ln in payload.split(b"\r\n") if ln.lower().startswith(b"call-id:")), b"")
            first_call = first_call or cid
            if cid != first_call:
                break
            out.append((p.time, p[IP]))
        elif payload[:1] and payload[0] >> 6 == 2:
            key = (p[UDP].sport, p[UDP].dport)
            per_stream[key] = per_stream.get(key, 0) + 1
            if per_stream[key] <= RTP_PER_STREAM:
                out.append((p.time, p[IP]))
    return out


def _to_ipv6(ip):
    """The same UDP datagram over IPv6 (::1 for 127.0.0.1; checksum recomputed). SDP addresses
    say ``IN IP6 ::1`` (Content-Length adjusted), so the media is still tied to its call."""
    from scapy.all import UDP, IPv6, Raw

    udp = ip[UDP]
    payload = bytes(udp.payload)
    if b"IN IP4 127.0.0.1" in payload:
        head, sep, body = payload.partition(b"\r\n\r\n")
        body = body.replace(b"IN IP4 127.0.0.1", b"IN IP6 ::1")
        head = re.sub(rb"(?im)^(Content-Length:\s*)\d+", lambda m: m.group(1) + str(len(body)).encode(), head)
        payload = head + sep + body
    return IPv6(src="::1", dst="::1", hlim=64) / UDP(sport=udp.sport, dport=udp.dport) / Raw(payload)


def wrappers():
    """name -> (what it holds, function(inner IP packet, index) -> outer frame)."""
    from scapy.all import GRE, IP, PPP, UDP, Dot1AD, Dot1Q, Ether, IPv6, PPPoE
    from scapy.contrib.erspan import ERSPAN_II, ERSPAN_III, ERSPAN_PlatformSpecific
    from scapy.contrib.geneve import GENEVE, GeneveOptions
    from scapy.all import Raw
    from scapy.contrib.gtp import GTP_U_Header, GTPPDUSessionContainer
    from scapy.contrib.mpls import MPLS
    from scapy.layers.l2tp import L2TP
    from scapy.layers.vxlan import VXLAN

    def eth(etype=None):
        return Ether(src=MAC_A, dst=MAC_B) if etype is None else Ether(src=MAC_A, dst=MAC_B, type=etype)

    def inner_eth(ip):
        return Ether(src="02:00:00:00:01:01", dst="02:00:00:00:01:02") / ip

    def outer4(proto=None):
        return IP(src=O4A, dst=O4B, ttl=64) if proto is None else IP(src=O4A, dst=O4B, ttl=64, proto=proto)

    return {
        "tap_pppoe": ("PPPoE session (RFC 2516), PPP IPv4, as a BNG-side mirror port delivers it",
                      lambda ip, i: eth() / PPPoE(code=0, sessionid=0x1a2b) / PPP(proto=0x0021) / ip),
        "tap_qinq_pppoe": ("QinQ (802.1ad S-tag 100, 802.1Q C-tag 200) carrying PPPoE session traffic",
                           lambda ip, i: eth() / Dot1AD(vlan=100) / Dot1Q(vlan=200) / PPPoE(code=0, sessionid=7)
                           / PPP(proto=0x0021) / ip),
        "tap_mpls": ("MPLS, two-label stack (RFC 3032), IPv4 inside",
                     lambda ip, i: eth(0x8847) / MPLS(label=16010, s=0, ttl=64) / MPLS(label=24001, s=1, ttl=64)
                     / ip),
        "tap_mpls_pw": ("Ethernet over an MPLS pseudowire (RFC 4448) with the control word (sequence number "
                        "per frame) under a two-label stack, as a provider-network tap delivers it",
                        lambda ip, i: eth(0x8847) / MPLS(label=16020, s=0, ttl=64) / MPLS(label=30001, s=1, ttl=64)
                        / Raw(struct.pack("!HH", 0, i + 1))
                        / Ether(src="02:42:ac:11:00:03", dst="02:42:ac:11:00:02") / ip),
        "tap_gtpu": ("GTP-U (UDP 2152, TEID 0x1001) with a PDU session container extension header, as a "
                     "VoLTE/5G user-plane tap delivers the subscriber's SIP",
                     lambda ip, i: eth() / outer4() / UDP(sport=2152, dport=2152)
                     / GTP_U_Header(teid=0x1001, gtp_type=255, E=1, next_ex=0x85)
                     / GTPPDUSessionContainer(type=0, QFI=5) / ip),
        "tap_l2tp": ("L2TPv2 data messages (UDP 1701, tunnel 5, session 9) carrying PPP, as an LNS tap sees "
                     "a broadband session",
                     lambda ip, i: eth() / outer4() / UDP(sport=1701, dport=1701)
                     / L2TP(hdr=0x0002, tunnel_id=5, session_id=9) / Raw(b"\xff\x03\x00\x21") / ip),
        "tap_gre": ("GRE (RFC 2784) with key and sequence number, IPv4 in IPv4",
                    lambda ip, i: eth() / outer4() / GRE(key_present=1, key=42, seqnum_present=1, seqence_number=i,
                                                         proto=0x0800) / ip),
        "tap_erspan1": ("ERSPAN type I: GRE 0x88BE without sequence number, the mirrored Ethernet frame inside",
                        lambda ip, i: eth() / outer4() / GRE(proto=0x88BE) / inner_eth(ip)),
        "tap_erspan2": ("ERSPAN type II (GRE with sequence number, 8-byte ERSPAN header, session 1)",
                        lambda ip, i: eth() / outer4() / GRE(seqnum_present=1, seqence_number=i, proto=0x88BE)
                        / ERSPAN_II(session_id=1, vlan=0, index=5) / inner_eth(ip)),
        "tap_erspan3": ("ERSPAN type III with the optional platform-specific subheader (O flag)",
                        lambda ip, i: eth() / outer4() / GRE(seqnum_present=1, seqence_number=i, proto=0x22EB)
                        / ERSPAN_III(session_id=2, o=1, timestamp=1000 + i, hw=3)
                        / ERSPAN_PlatformSpecific(platf_id=3, info1=0, info2=0) / inner_eth(ip)),
        "tap_vxlan": ("VXLAN (RFC 7348, UDP 4789, VNI 5001) with the mirrored Ethernet frame inside, as cloud "
                      "traffic mirroring delivers it",
                      lambda ip, i: eth() / outer4() / UDP(sport=49152 + i % 1000, dport=4789)
                      / VXLAN(vni=5001, flags=0x08) / inner_eth(ip)),
        "tap_geneve": ("Geneve (RFC 8926, UDP 6081) over IPv6 with one 8-byte TLV option, Ethernet inside",
                       lambda ip, i: eth() / IPv6(src=O6A, dst=O6B) / UDP(sport=50000, dport=6081)
                       / GENEVE(vni=77, proto=0x6558, optionlen=2,
                                options=[GeneveOptions(classid=0x0102, type=1, length=1, data=b"abcd")])
                       / inner_eth(ip)),
        "tap_ipip": ("IP-in-IP (IPv4 protocol 4)",
                     lambda ip, i: eth() / outer4(4) / ip),
        "tap_ip_in_ipv6": ("IPv4 in IPv6 (next header 4, RFC 2473)",
                           lambda ip, i: eth() / IPv6(src=O6A, dst=O6B, nh=4) / ip),
        "tap_ipv6_in_ipv4": ("IPv6 in IPv4 (6in4, protocol 41), the recorded datagrams carried over IPv6 ::1",
                             lambda ip, i: eth() / outer4(41) / _to_ipv6(ip)),
        "tap_undecoded_sctp": ("the recorded SIP messages as SIP over SCTP (RFC 4168, one DATA chunk each): "
                               "a transport the fast reader does not decode, so it must say so",
                               None),
    }


def _sctp(ip, i):
    """SIP over SCTP: one DATA chunk per message on the same ports (only SIP is kept)."""
    from scapy.all import IP, Ether, Raw, UDP
    from scapy.layers.sctp import SCTP, SCTPChunkData

    udp = ip[UDP]
    payload = bytes(udp.payload)
    if b"SIP/2.0" not in payload[:200]:
        return None
    return Ether(src=MAC_A, dst=MAC_B) / IP(src=ip.src, dst=ip.dst, ttl=64) / \
        SCTP(sport=udp.sport, dport=udp.dport, tag=0x1234) / \
        SCTPChunkData(tsn=i + 1, stream_id=0, stream_seq=i, proto_id=0, data=Raw(payload), ending=1, beginning=1)


def build(outdir: Path, names: list[str]) -> list[str]:
    from scapy.all import wrpcap

    src = source_packets()
    table = wrappers()
    written = []
    for name, (about, wrap) in table.items():
        if names and name not in names:
            continue
        frames = []
        for i, (ts, ip) in enumerate(src):
            f = _sctp(ip, i) if wrap is None else wrap(ip.copy(), i)
            if f is None:
                continue
            f.time = ts
            frames.append(f)
        path = outdir / f"{name}.pcap"
        wrpcap(str(path), frames)
        fx = facts(str(path))
        fx["fixture"] = {"about": about, "source": "basic_call_rtp.pcap (first call)", "calls": 1,
                         "gateway": GATEWAY, "signaling": SIGNALING, "rtp_per_stream": RTP_PER_STREAM,
                         "made_with": "scapy"}
        (outdir / f"{name}.facts.json").write_text(json.dumps(fx, indent=1) + "\n")
        written.append(name)
    return written


# -- recorded on loopback: SIP over TCP beyond 64 KiB, keep-alives on 5060 ----------------------
BIG_BASE = 36300  # port block of the TCP fixture (record_fixtures uses 35100-36299)
BIG_BODY_LINES = 720  # 720 lines of 100 bytes: a 72,000-byte body


def _message(cseq: int, body: bytes, local: tuple, remote: tuple, call_id: str) -> bytes:
    head = (f"MESSAGE sip:service@{remote[0]}:{remote[1]};transport=tcp SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP {local[0]}:{local[1]};branch=z9hG4bK-big-{cseq}\r\n"
            f"From: <sip:gateway@{local[0]}:{local[1]}>;tag=big{cseq}\r\n"
            f"To: <sip:service@{remote[0]}:{remote[1]}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} MESSAGE\r\nMax-Forwards: 70\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def _ok(req: bytes) -> bytes:
    head = req.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    keep = [ln for ln in head[1:] if ln.split(b":", 1)[0].lower() in (b"via", b"from", b"call-id", b"cseq")]
    to = next(ln for ln in head if ln.lower().startswith(b"to:"))
    return b"\r\n".join([b"SIP/2.0 200 OK", *keep, to + b";tag=uas1", b"Content-Length: 0", b"", b""])


def _read_message(sock, buf: bytearray) -> bytes:
    """One SIP message off a TCP stream (Content-Length framing; CRLF keep-alives skipped)."""
    while True:
        while buf[:2] == b"\r\n":
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            m = re.search(rb"(?im)^content-length:\s*(\d+)", bytes(buf[:end]))
            total = end + 4 + (int(m.group(1)) if m else 0)
            if len(buf) >= total:
                msg = bytes(buf[:total])
                del buf[:total]
                return msg
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk


def record_big_tcp(outdir: Path) -> str:
    """SIP over one TCP connection with an MSS of 1460 (as on Ethernet): MESSAGE (small), CRLFCRLF
    ping and CRLF pong (RFC 5626), MESSAGE with a 72,000-byte body, MESSAGE (small), each
    answered 200. SIPp 3.6 cannot carry this (its message buffer is 64 KiB: the body is cut at
    65,540 bytes), so both ends are plain sockets here; dumpcap records, tshark gives the facts."""
    import socket
    import threading

    from capture.record_fixtures import Dumpcap

    name = "tcp_big_message"
    pcap = outdir / f"{name}.pcap"
    host = "127.0.0.1"
    uas, uac = (host, BIG_BASE + 60), (host, BIG_BASE + 61)
    body = b"".join(b"line %04d " % i + b"x" * 88 + b"\r\n" for i in range(BIG_BODY_LINES))
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(uas)
    srv.listen(1)
    errors = []

    def serve():
        try:
            conn, _ = srv.accept()
            conn.settimeout(10)
            buf = bytearray()
            for _ in range(3):
                req = _read_message(conn, buf)
                time.sleep(0.02)  # the callee takes 20 ms to answer
                conn.sendall(_ok(req))
                if b"CSeq: 1 " in req:
                    conn.sendall(b"\r\n")  # pong to the ping that follows
            conn.close()
        except (OSError, ConnectionError, StopIteration) as exc:
            errors.append(exc)

    with Dumpcap(pcap, f"tcp portrange {BIG_BASE}-{BIG_BASE + 99}"):
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        cli.bind(uac)
        cli.connect(uas)
        cli.settimeout(10)
        buf = bytearray()
        call_id = f"big-{int(time.time())}@{host}"
        for cseq, b in ((1, b"small one\r\n"), (2, body), (3, b"small three\r\n")):
            cli.sendall(_message(cseq, b, uac, uas, call_id))
            if cseq == 1:
                cli.sendall(b"\r\n\r\n")  # RFC 5626 keep-alive ping
            _read_message(cli, buf)
            time.sleep(0.05)
        cli.close()
        t.join(10)
        srv.close()
    if errors:
        raise RuntimeError(f"{name}: {errors[0]}")
    pcap.chmod(0o644)
    fx = facts(str(pcap))
    fx["fixture"] = {"about": "3 MESSAGE/200 over one SIP/TCP connection (MSS 1460); the second carries "
                              f"a {len(body)}-byte body (> 64 KiB); an RFC 5626 CRLFCRLF ping and CRLF pong",
                     "calls": 0, "transport": "TCP", "gateway": f"{uac[0]}:{uac[1]}",
                     "signaling": f"{uas[0]}:{uas[1]}", "big_body_bytes": len(body),
                     "crlf_keepalives": 2, "made_with": "dumpcap on lo, plain sockets"}
    (outdir / f"{name}.facts.json").write_text(json.dumps(fx, indent=1) + "\n")
    return name


KA_SERVER, KA_CLIENT, KA_PHONE, KA_OTHER = ("127.0.0.2", 5060), ("127.0.0.3", 5061), ("127.0.0.3", 5062), \
    ("127.0.0.4", 5060)
KEEPALIVES = (  # (from, to, payload): what phones and servers send on 5060 between messages
    (KA_PHONE, KA_SERVER, b"hello"),
    (KA_PHONE, KA_SERVER, b"jaK\r\n"),
    (KA_PHONE, KA_SERVER, b"\r\n\r\n"),
    (KA_OTHER, KA_PHONE, b"\r\n"),
    (KA_PHONE, KA_SERVER, b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"sipwatch-ka1"),  # STUN binding
    (KA_PHONE, KA_SERVER, b"\x00\x00\x00\x00"),
    (KA_OTHER, KA_PHONE, b"hello"),
    (KA_PHONE, KA_SERVER, b"jaK\r\n"),
)


def record_keepalives(outdir: Path) -> str:
    """SIPp sends 5 OPTIONS to a SIPp responder on 127.0.0.2:5060 while a phone socket
    (127.0.0.3:5062) and a server socket (127.0.0.4:5060) exchange the keep-alives phones send:
    ``hello``, ``jaK\\r\\n`` (5 bytes), CRLFCRLF / CRLF (RFC 5626), NUL fill, a STUN binding."""
    import socket

    from capture.record_fixtures import SCENARIOS, Dumpcap

    name = "sip_keepalives"
    pcap = outdir / f"{name}.pcap"
    hosts = " or ".join(f"host {h}" for h in ("127.0.0.2", "127.0.0.3", "127.0.0.4"))
    socks = {}
    for addr in (KA_PHONE, KA_OTHER):
        socks[addr] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks[addr].bind(addr)
    with tempfile.TemporaryDirectory(prefix="rec-keepalive-") as tmp, Dumpcap(pcap, f"udp and ({hosts})"):
        common = ["-nostdin", "-timeout", "30s", "-m", "5", "-trace_err"]
        uas = subprocess.Popen(["sipp", "-sf", str(SCENARIOS / "uas_options.xml"), "-i", KA_SERVER[0], "-p",
                                str(KA_SERVER[1]), *common], cwd=tmp, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
        time.sleep(0.4)
        uac = subprocess.Popen(["sipp", "-sf", str(SCENARIOS / "uac_options.xml"), "-i", KA_CLIENT[0], "-p",
                                str(KA_CLIENT[1]), "-r", "4", *common, f"{KA_SERVER[0]}:{KA_SERVER[1]}"],
                               cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for src, dst, payload in KEEPALIVES:
            time.sleep(0.15)
            socks[src].sendto(payload, dst)
        rcs = (uac.wait(30), uas.wait(30))
    for s in socks.values():
        s.close()
    if rcs != (0, 0):
        raise RuntimeError(f"{name}: SIPp exit codes {rcs}")
    pcap.chmod(0o644)
    fx = facts(str(pcap))
    fx["fixture"] = {"about": "5 OPTIONS/200 (SIPp) on 127.0.0.2:5060 with keep-alives between: hello, jaK "
                              "CRLF, CRLFCRLF, CRLF, STUN binding request, NUL fill, in both directions",
                     "calls": 0, "gateway": f"{KA_CLIENT[0]}:{KA_CLIENT[1]}",
                     "signaling": f"{KA_SERVER[0]}:{KA_SERVER[1]}", "keepalives": len(KEEPALIVES),
                     "made_with": "dumpcap on lo, SIPp, plain sockets"}
    (outdir / f"{name}.facts.json").write_text(json.dumps(fx, indent=1) + "\n")
    return name


RECORDED = {"tcp_big_message": record_big_tcp, "sip_keepalives": record_keepalives}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.stderr.write("usage: python -m tests.tap_fixtures OUTDIR [NAME ...]\n"
                         f"recorded on lo (root, SIPp, dumpcap): {', '.join(RECORDED)}\n")
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    names = argv[1:]
    for name in build(out, names) if (not names or set(names) - set(RECORDED)) else []:
        sys.stdout.write(f"{name}\n")
    for name, rec in RECORDED.items():
        if not names or name in names:
            sys.stdout.write(f"{rec(out)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
