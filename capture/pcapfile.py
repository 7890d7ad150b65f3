"""Fast capture reader: pcap and pcapng decoded with ``struct``, no dissector in the loop.

``read_packets(path)`` yields :class:`Packet` tuples ``(ts, src, dst, transport, payload)`` for
every UDP datagram and every SIP message carried over TCP. It understands the link layers SIP
captures come in (Ethernet with VLAN/QinQ tags, Linux cooked SLL/SLL2, raw IP, BSD loopback),
IPv4 and IPv6 (extension headers, tunnels: IP-in-IP, IPv6-in-IPv4), reassembles IP fragments
and frames SIP over TCP by Content-Length. Anything it cannot decode is counted in the
``counters`` dict passed in, never raised: a capture is evidence, and one odd frame must not
hide the rest of it.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from socket import AF_INET, AF_INET6, inet_ntop
from typing import Iterator, NamedTuple

__all__ = ["Packet", "read_packets", "PcapError", "Decoder"]


class PcapError(Exception):
    """The file is not a pcap/pcapng capture we can read at all."""


class Packet(NamedTuple):
    ts: float  # capture time, seconds since the epoch
    src: tuple[str, int]
    dst: tuple[str, int]
    transport: str  # "udp" | "tcp"
    payload: bytes


# link-layer types (tcpdump.org/linktypes.html)
LT_NULL, LT_ETHERNET, LT_RAW, LT_LOOP, LT_SLL, LT_SLL2 = 0, 1, 101, 108, 113, 276
LT_RAW_ALIASES = (12, 14, 101)
LT_IPV4, LT_IPV6 = 228, 229
ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
VLAN_TAGS = (0x8100, 0x88A8, 0x9100, 0x9200)
IPV6_EXT = (0, 43, 60, 135, 139, 140)  # hop-by-hop, routing, dest opts, mobility, HIP, shim6
MAX_FRAG_SETS = 1024
MAX_TCP_BUFFER = 1 << 20
MAX_TCP_FLOWS = 10_000
NON_SIP_AFTER = 16_384  # bytes without a SIP start line before a connection is ignored

_u16 = struct.Struct("!H").unpack_from
_u32 = struct.Struct("!I").unpack_from
_ip4 = struct.Struct("!BBHHHBBH4s4s").unpack_from
_ports = struct.Struct("!HHH").unpack_from  # src, dst, UDP length
_tcp = struct.Struct("!HHIIBB").unpack_from
_SIP_START = re.compile(rb"(?:[A-Za-z]+ \S+ SIP/2\.0\r?\n|SIP/2\.0 \d{3}[ \r\n])")
_SIP_RESYNC = re.compile(rb"\n(" + _SIP_START.pattern + rb")")
_CLEN = re.compile(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)")


class _FragSet:
    __slots__ = ("parts", "total", "first")

    def __init__(self):
        self.parts: dict[int, bytes] = {}
        self.total = -1
        self.first = None  # the first fragment's header info (needed to decode the payload)


class _TcpFlow:
    __slots__ = ("next_seq", "buf", "ooo", "sip", "skipped")

    def __init__(self):
        self.next_seq = None
        self.buf = b""
        self.ooo: dict[int, bytes] = {}
        self.sip = None  # None: undecided; True once a SIP start line was seen
        self.skipped = 0


class Decoder:
    """Link layer → IP → UDP/TCP decoder with fragment and TCP state, one per capture."""

    def __init__(self, counters: dict):
        self.c = counters
        self.frags: dict[tuple, _FragSet] = {}
        self.flows: dict[tuple, _TcpFlow] = {}

    def _count(self, name: str, n: int = 1) -> None:
        self.c[name] = self.c.get(name, 0) + n

    # -- link layer ---------------------------------------------------------------------
    def frame(self, linktype: int, data: bytes, ts: float) -> list[Packet]:
        try:
            return self._frame(linktype, data, ts)
        except (struct.error, IndexError, ValueError):
            self._count("truncated")
            return []

    def _frame(self, lt: int, data: bytes, ts: float) -> list[Packet]:
        if lt == LT_ETHERNET:
            etype = _u16(data, 12)[0]
            off = 14
            while etype in VLAN_TAGS:
                etype = _u16(data, off + 2)[0]
                off += 4
        elif lt == LT_SLL:
            etype, off = _u16(data, 14)[0], 16
        elif lt == LT_SLL2:
            etype, off = _u16(data, 0)[0], 20
        elif lt in LT_RAW_ALIASES or lt == LT_IPV4 or lt == LT_IPV6:
            return self.ip(data, 0, ts)
        elif lt == LT_NULL or lt == LT_LOOP:
            fam = struct.unpack_from("<I" if lt == LT_NULL else "!I", data, 0)[0]
            if fam > 0xFFFF:  # written on a machine of the other byte order
                fam = struct.unpack_from(">I", data, 0)[0]
            if fam == 2:
                etype = ETH_IPV4
            elif fam in (10, 23, 24, 28, 30):
                etype = ETH_IPV6
            else:
                self._count("non_ip")
                return []
            off = 4
        else:
            self._count("unknown_linktype")
            return []
        if etype == ETH_IPV4 or etype == ETH_IPV6:
            return self.ip(data, off, ts)
        self._count("non_ip")
        return []

    # -- IP ------------------------------------------------------------------------------
    def ip(self, data: bytes, off: int, ts: float) -> list[Packet]:
        version = data[off] >> 4
        if version == 4:
            return self._ipv4(data, off, ts)
        if version == 6:
            return self._ipv6(data, off, ts)
        self._count("non_ip")
        return []

    def _ipv4(self, data: bytes, off: int, ts: float) -> list[Packet]:
        vihl, _, total, ident, frag, _, proto, _, s, d = _ip4(data, off)
        hl = (vihl & 15) * 4
        if hl < 20 or total < hl:
            self._count("bad_ip")
            return []
        end = off + total
        if end > len(data):
            self._count("truncated")
            return []
        payload = data[off + hl:end]
        mf, foff = frag & 0x2000, (frag & 0x1FFF) * 8
        if mf or foff:
            payload = self._reassemble((4, s, d, ident, proto), foff, bool(mf), payload)
            if payload is None:
                return []
        return self._transport(proto, AF_INET, s, d, payload, ts)

    def _ipv6(self, data: bytes, off: int, ts: float) -> list[Packet]:
        plen = _u16(data, off + 4)[0]
        nxt = data[off + 6]
        s, d = data[off + 8:off + 24], data[off + 24:off + 40]
        end = off + 40 + plen
        if end > len(data):
            self._count("truncated")
            return []
        p = off + 40
        frag = None
        while True:
            if nxt in IPV6_EXT:
                nxt, p = data[p], p + (data[p + 1] + 1) * 8
            elif nxt == 51:  # AH: length in 4-octet units minus 2
                nxt, p = data[p], p + (data[p + 1] + 2) * 4
            elif nxt == 44:  # fragment header
                fo = _u16(data, p + 2)[0]
                frag = ((fo >> 3) * 8, bool(fo & 1), _u32(data, p + 4)[0])
                nxt, p = data[p], p + 8
            else:
                break
            if p > end:
                self._count("truncated")
                return []
        payload = data[p:end]
        if frag is not None:
            foff, mf, ident = frag
            payload = self._reassemble((6, s, d, ident), foff, mf, payload)
            if payload is None:
                return []
        return self._transport(nxt, AF_INET6, s, d, payload, ts)

    def _reassemble(self, key, foff: int, mf: bool, part: bytes) -> bytes | None:
        """Collect fragments; return the whole payload once every byte up to the last is here."""
        self._count("ip_fragments")
        fs = self.frags.get(key)
        if fs is None:
            if len(self.frags) >= MAX_FRAG_SETS:
                self.frags.pop(next(iter(self.frags)))
                self._count("fragments_dropped")
            fs = self.frags[key] = _FragSet()
        fs.parts[foff] = part
        if not mf:
            fs.total = foff + len(part)
        if fs.total < 0:
            return None
        pos, out = 0, []
        for o in sorted(fs.parts):
            if o > pos:
                return None  # a hole
            chunk = fs.parts[o]
            if o + len(chunk) > pos:
                out.append(chunk[pos - o:])
                pos = o + len(chunk)
        if pos < fs.total:
            return None
        del self.frags[key]
        self._count("ip_reassembled")
        return b"".join(out)[:fs.total]

    # -- transport -----------------------------------------------------------------------
    def _transport(self, proto: int, fam: int, s: bytes, d: bytes, seg: bytes,
                   ts: float) -> list[Packet]:
        if proto == 17:
            if len(seg) < 8:
                self._count("truncated")
                return []
            sp, dp, ulen = _ports(seg, 0)
            if ulen < 8 or ulen > len(seg):
                ulen = len(seg)  # checksum offload / jumbo: trust the IP length
            self._count("udp")
            return [Packet(ts, (inet_ntop(fam, s), sp), (inet_ntop(fam, d), dp), "udp",
                           bytes(seg[8:ulen]))]
        if proto == 6:
            return self._tcp(fam, s, d, seg, ts)
        if proto == 4:  # IPv4 in IP
            return self._ipv4(seg, 0, ts)
        if proto == 41:  # IPv6 in IP
            return self._ipv6(seg, 0, ts)
        self._count("other_ip_proto")
        return []

    def _tcp(self, fam, s, d, seg, ts) -> list[Packet]:
        sp, dp, seq, _, doff, flags = _tcp(seg, 0)
        hl = (doff >> 4) * 4
        if hl < 20 or hl > len(seg):
            self._count("truncated")
            return []
        self._count("tcp")
        data = seg[hl:]
        src, dst = (inet_ntop(fam, s), sp), (inet_ntop(fam, d), dp)
        key = (src, dst)
        flow = self.flows.get(key)
        if flow is None:
            if not data and not flags & 0x02:
                return []
            if len(self.flows) >= MAX_TCP_FLOWS:
                self.flows.pop(next(iter(self.flows)))
            flow = self.flows[key] = _TcpFlow()
        if flags & 0x02:  # SYN: data starts at ISN + 1
            flow.next_seq = (seq + 1) & 0xFFFFFFFF
            flow.buf, flow.ooo = b"", {}
            return []
        if flags & 0x05 and not data:  # FIN/RST without data
            self.flows.pop(key, None)
            return []
        if not data or flow.sip is False:
            return []
        if flow.next_seq is None:
            flow.next_seq = seq  # capture started mid-connection
        rel = (seq - flow.next_seq) & 0xFFFFFFFF
        if rel >= 0x80000000:  # starts before what we have: retransmission, maybe overlapping
            back = 0x100000000 - rel
            if back >= len(data):
                self._count("tcp_retransmissions")
                return []
            data = data[back:]
            rel = 0
        if rel > 0:  # a gap: keep it until the missing bytes arrive
            if len(flow.ooo) < 256:
                flow.ooo[seq] = bytes(data)
            return []
        flow.buf += data
        flow.next_seq = (flow.next_seq + len(data)) & 0xFFFFFFFF
        while flow.ooo:
            nxt = flow.ooo.pop(flow.next_seq, None)
            if nxt is None:
                break
            flow.buf += nxt
            flow.next_seq = (flow.next_seq + len(nxt)) & 0xFFFFFFFF
        return self._frame_sip(flow, src, dst, ts)

    def _frame_sip(self, flow: _TcpFlow, src, dst, ts) -> list[Packet]:
        """Cut complete SIP messages off a TCP byte stream by Content-Length (RFC 3261 §18.3)."""
        out = []
        buf = flow.buf.lstrip(b"\r\n")  # CRLF keep-alives between messages
        while buf:
            if buf.find(b"\n", 0, 4096) < 0:  # no whole first line yet
                if len(buf) >= 4096:
                    self._count("tcp_skipped_bytes", len(buf))
                    buf = b""
                break
            if _SIP_START.match(buf) is None:
                # joined mid-message, or lost our place: skip to the next line that starts one
                m = _SIP_RESYNC.search(buf)
                if m is None:
                    self._count("tcp_skipped_bytes", len(buf))
                    flow.skipped += len(buf)
                    if flow.sip is None and flow.skipped > NON_SIP_AFTER:
                        self._count("tcp_non_sip_flows")
                        flow.sip = False  # stop buffering a connection that never spoke SIP
                    buf = b""
                    break
                self._count("tcp_skipped_bytes", m.start(1))
                buf = buf[m.start(1):]
            flow.sip = True
            end = buf.find(b"\r\n\r\n")
            sep = 4
            if end < 0:
                end, sep = buf.find(b"\n\n"), 2
            if end < 0:
                if len(buf) > MAX_TCP_BUFFER:
                    self._count("tcp_oversized")
                    buf = b""
                break
            m = _CLEN.search(buf, 0, end)
            blen = int(m.group(1)) if m else 0
            total = end + sep + blen
            if total > MAX_TCP_BUFFER:
                self._count("tcp_oversized")
                buf = b""
                break
            if len(buf) < total:
                break
            out.append(Packet(ts, src, dst, "tcp", buf[:total]))
            self._count("tcp_sip_messages")
            buf = buf[total:].lstrip(b"\r\n")
        flow.buf = buf
        return out


# -- file formats ------------------------------------------------------------------------
def read_packets(path, counters: dict | None = None) -> Iterator[Packet]:
    """Yield every UDP datagram and TCP-framed SIP message of a pcap or pcapng file.

    Raises :class:`PcapError` (or OSError) only when the file cannot be read as a capture at all;
    damage inside the file is counted in ``counters`` and reading stops or skips.
    """
    c = counters if counters is not None else {}
    c.setdefault("frames", 0)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 12:
            raise PcapError("file too short to be a capture")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            magic = mm[:4]
            dec = Decoder(c)
            if magic == b"\x0a\x0d\x0d\x0a":
                yield from _pcapng(mm, dec, c)
            elif magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1",
                           b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
                yield from _pcap(mm, dec, c)
            else:
                raise PcapError("not a pcap or pcapng file (unknown magic number)")


def _pcap(mm, dec: Decoder, c: dict) -> Iterator[Packet]:
    magic = mm[:4]
    end = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    # integer ticks / exact power of ten: the same instant gives the same float in every format
    div = 10**9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 10**6
    if len(mm) < 24:
        c["truncated"] = c.get("truncated", 0) + 1
        return
    linktype = struct.unpack_from(end + "I", mm, 20)[0] & 0x0FFFFFFF
    rec = struct.Struct(end + "IIII").unpack_from
    off, n = 24, len(mm)
    frame = dec.frame
    while off + 16 <= n:
        sec, frac, incl, _ = rec(mm, off)
        off += 16
        if off + incl > n:
            c["truncated"] = c.get("truncated", 0) + 1
            return
        c["frames"] += 1
        yield from frame(linktype, mm[off:off + incl], (sec * div + frac) / div)
        off += incl
    if off != n:
        c["truncated"] = c.get("truncated", 0) + 1


def _pcapng(mm, dec: Decoder, c: dict) -> Iterator[Packet]:
    n = len(mm)
    off = 0
    end = "<"
    ifaces: list[tuple[int, int, int]] = []  # (linktype, ticks per second, offset s)
    last_ts = 0.0
    frame = dec.frame
    while off + 12 <= n:
        btype = struct.unpack_from(end + "I", mm, off)[0]
        if btype == 0x0A0D0D0A:  # section header: byte order may change per section
            bom = mm[off + 8:off + 12]
            end = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
            ifaces = []
        blen = struct.unpack_from(end + "I", mm, off + 4)[0]
        if blen < 12 or blen % 4 or off + blen > n:
            c["truncated"] = c.get("truncated", 0) + 1
            return
        body = off + 8
        if btype == 1:  # interface description
            lt = struct.unpack_from(end + "H", mm, body)[0]
            per_s, tsoff = 10**6, 0
            for code, val in _options(mm, body + 8, off + blen - 4, end):
                if code == 9 and val:
                    r = val[0]
                    per_s = 2 ** (r & 0x7F) if r & 0x80 else 10**r
                elif code == 14 and len(val) == 8:
                    tsoff = struct.unpack(end + "q", val)[0]
            ifaces.append((lt, per_s, tsoff))
        elif btype in (6, 2):  # enhanced packet / obsolete packet block
            if btype == 6:
                iid, hi, lo, cap = struct.unpack_from(end + "IIII", mm, body)
            else:
                iid, _, hi, lo, cap = struct.unpack_from(end + "HHIII", mm, body)
            data_off = body + 20
            if iid >= len(ifaces) or data_off + cap > off + blen:
                k = "truncated" if iid < len(ifaces) else "unknown_interface"
                c[k] = c.get(k, 0) + 1
            else:
                lt, per_s, tsoff = ifaces[iid]
                last_ts = ((hi << 32) | lo) / per_s + tsoff
                c["frames"] += 1
                yield from frame(lt, mm[data_off:data_off + cap], last_ts)
        elif btype == 3:  # simple packet block: interface 0, no timestamp
            if ifaces:
                orig = struct.unpack_from(end + "I", mm, body)[0]
                cap = min(orig, blen - 16)
                c["frames"] += 1
                yield from frame(ifaces[0][0], mm[body + 4:body + 4 + cap], last_ts)
        off += blen
    if off != n:
        c["truncated"] = c.get("truncated", 0) + 1


def _options(mm, off: int, stop: int, end: str):
    while off + 4 <= stop:
        code, length = struct.unpack_from(end + "HH", mm, off)
        if code == 0:
            return
        yield code, mm[off + 4:off + 4 + length]
        off += 4 + ((length + 3) & ~3)
