"""Tiny capture builders for tests: link layers, IPv4/IPv6 (fragments, tunnels), UDP, TCP.

Everything written here is checked against tshark in the tests that use it, so a mistake in a
builder shows up as a disagreement with tshark, not as a silently wrong expectation.
"""
from __future__ import annotations

import struct
from socket import AF_INET, AF_INET6, inet_pton


def pcap(linktype: int, frames, nsec: bool = False) -> bytes:
    """A little-endian pcap file of ``[(ts, frame_bytes)]``."""
    magic = 0xA1B23C4D if nsec else 0xA1B2C3D4
    out = [struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)]
    for ts, data in frames:
        sec = int(ts)
        frac = round((ts - sec) * (1e9 if nsec else 1e6))
        out.append(struct.pack("<IIII", sec, frac, len(data), len(data)) + data)
    return b"".join(out)


def read_pcap(data: bytes) -> tuple[int, list[tuple[int, int, bytes]]]:
    """(linktype, [(sec, frac, frame)]) of a little-endian microsecond pcap."""
    lt = struct.unpack_from("<I", data, 20)[0]
    off, recs = 24, []
    while off + 16 <= len(data):
        s, u, n, _ = struct.unpack_from("<IIII", data, off)
        recs.append((s, u, data[off + 16:off + 16 + n]))
        off += 16 + n
    return lt, recs


def write_raw(linktype: int, recs) -> bytes:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, linktype)]
    for s, u, data in recs:
        out.append(struct.pack("<IIII", s, u, len(data), len(data)) + data)
    return b"".join(out)


def eth(payload: bytes, etype: int = 0x0800, vlans=()) -> bytes:
    hdr = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"
    tags = b""
    for tpid, vid in vlans:
        tags += struct.pack("!HH", tpid, vid)
    return hdr + tags + struct.pack("!H", etype) + payload


def sll(payload: bytes, proto: int = 0x0800) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00", proto) + payload


def sll2(payload: bytes, proto: int = 0x0800) -> bytes:
    return struct.pack("!HHIHBB8s", proto, 0, 1, 1, 0, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00") \
        + payload


def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1, frag_off: int = 0,
         mf: bool = False) -> bytes:
    flags = (0x2000 if mf else 0) | (frag_off // 8)
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, flags, 64, proto, 0,
                    inet_pton(AF_INET, src), inet_pton(AF_INET, dst))
    h = h[:10] + struct.pack("!H", _csum(h)) + h[12:]
    return h + payload


def ipv4_fragments(src, dst, proto, payload, mtu_payload=1480, ident=7) -> list[bytes]:
    out, off = [], 0
    while off < len(payload):
        chunk = payload[off:off + mtu_payload]
        out.append(ipv4(src, dst, proto, chunk, ident, off, off + len(chunk) < len(payload)))
        off += len(chunk)
    return out


def ipv6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), nh, 64,
                       inet_pton(AF_INET6, src), inet_pton(AF_INET6, dst)) + payload


def ipv6_fragments(src, dst, nh, payload, chunk=1232, ident=0x1234,
                   dest_opts: bool = True) -> list[bytes]:
    """Fragments with a destination-options header in front of the fragment header."""
    out, off = [], 0
    while off < len(payload):
        part = payload[off:off + chunk]
        more = off + len(part) < len(payload)
        frag = struct.pack("!BBHI", nh, 0, off | (1 if more else 0), ident)
        if dest_opts:  # 8-byte dest options (PadN), then the fragment header
            ext = struct.pack("!BB", 44, 0) + b"\x01\x04\0\0\0\0"
            out.append(ipv6(src, dst, 60, ext + frag + part))
        else:
            out.append(ipv6(src, dst, 44, frag + part))
        off += len(part)
    return out


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, seq: int, payload: bytes = b"", flags: int = 0x18,
        ack: int = 1) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack, 5 << 4, flags, 65535,
                       0, 0) + payload


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def sip_invite(call_id: str, branch: str, src: str = "10.0.0.1", dst: str = "10.0.0.2",
               body: bytes = b"", cseq: int = 1, extra: str = "", transport: str = "UDP") -> bytes:
    src, dst = _host(src), _host(dst)
    head = (f"INVITE sip:bob@{dst} SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport} {src}:5060;branch={branch}\r\n"
            f"From: \"Alice\" <sip:+4930123456@{src}>;tag=a1\r\n"
            f"To: <sip:+4940987654@{dst}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\nMax-Forwards: 70\r\n"
            f"Contact: <sip:alice@{src}>\r\n{extra}"
            + ("Content-Type: application/sdp\r\n" if body else "")
            + f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def sip_response(request: bytes, status: int, reason: str, to_tag: str = "b1",
                 body: bytes = b"") -> bytes:
    lines = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    keep = []
    for ln in lines:
        name = ln.split(b":", 1)[0].lower()
        if name == b"to":
            ln += b";tag=" + to_tag.encode()
        if name in (b"via", b"from", b"to", b"call-id", b"cseq"):
            keep.append(ln)
    head = [b"SIP/2.0 %d %s" % (status, reason.encode())] + keep
    if body:
        head.append(b"Content-Type: application/sdp")
    head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def sdp(ip: str, port: int, pts=(0, 8, 101)) -> bytes:
    fam = "IP6" if ":" in ip else "IP4"
    lines = ["v=0", f"o=- 1 1 IN {fam} {ip}", "s=-", f"c=IN {fam} {ip}", "t=0 0",
             f"m=audio {port} RTP/AVP {' '.join(map(str, pts))}",
             "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000",
             "a=rtpmap:101 telephone-event/8000", "a=ptime:20"]
    return ("\r\n".join(lines) + "\r\n").encode()


def rtp(seq: int, ts: int, ssrc: int, pt: int = 8, marker: bool = False,
        payload: bytes = b"\xd5" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                       ts & 0xFFFFFFFF, ssrc) + payload
