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

import heapq
import mmap
import os
import re
import struct
from collections import OrderedDict
from _socket import AF_INET, AF_INET6, inet_ntop  # (the C module: socket.py builds its enums on import)
from typing import Iterator, NamedTuple

from sipwatch.sipmsg import KEEPALIVE_MAX, is_sip_keepalive  # re-exported: the SIP side owns them

__all__ = ["Packet", "read_packets", "PcapError", "Decoder", "is_sip_keepalive", "KEEPALIVE_MAX"]


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
LT_PPP, LT_PPP_HDLC, LT_PPP_ETHER, LT_C_HDLC = 9, 50, 51, 104
LT_RAW_ALIASES = (12, 14, 101)
LT_IPV4, LT_IPV6 = 228, 229
ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
VLAN_TAGS = (0x8100, 0x88A8, 0x9100, 0x9200)
ETH_PPPOE_SESSION, ETH_MPLS, ETH_MPLS_MC, ETH_TEB = 0x8864, 0x8847, 0x8848, 0x6558
ETH_ERSPAN2, ETH_ERSPAN3, ETH_PBB, ETH_PPP = 0x88BE, 0x22EB, 0x88E7, 0x880B
# Ethernet types that never carry IP: counted as non_ip (by type), no warning
ETH_NOT_IP = {0x0806: "arp", 0x8035: "rarp", 0x88CC: "lldp", 0x8863: "pppoe_discovery",
              0x888E: "eapol", 0x8809: "slow_protocols", 0x8808: "pause", 0x9000: "loopback",
              0x88F7: "ptp", 0x8899: "realtek", 0x88E1: "homeplug", 0x893A: "ieee1905",
              0x8902: "cfm", 0x22F0: "avb", 0x88B5: "local_exp", 0x88B6: "local_exp"}
_ETH_CARRIERS = frozenset((ETH_IPV4, ETH_IPV6, *VLAN_TAGS, ETH_PPPOE_SESSION, ETH_MPLS, ETH_MPLS_MC))
PPP_IPV4, PPP_IPV6 = 0x0021, 0x0057
# PPP control protocols (LCP, PAP, CHAP, IPCP, IPv6CP, CCP, ...): no IP inside
PPP_CONTROL_MIN = 0x8000
# IP protocols that carry no SIP: counted as other_ip_proto, no warning
IP_NOT_SIP = {1: "icmp", 2: "igmp", 58: "icmpv6", 59: "no_next_header", 88: "eigrp", 89: "ospf",
              103: "pim", 112: "vrrp"}
UDP_VXLAN, UDP_VXLAN_GPE, UDP_GENEVE, UDP_GTPU, UDP_L2TP, UDP_GRE, UDP_MPLS = \
    4789, 4790, 6081, 2152, 1701, 4754, 6635
UDP_TUNNELS = frozenset((UDP_VXLAN, UDP_VXLAN_GPE, UDP_GENEVE, UDP_GTPU, UDP_L2TP, UDP_GRE, UDP_MPLS))
# tunnels and capture protocols on UDP this reader does not open: counted as undecoded
UDP_TUNNELS_UNDECODED = {37008: "tzsp", 5247: "capwap_data", 9060: "hep"}
MAX_UNDECODED_TYPES = 64
MAX_TUNNEL_DEPTH = 8  # nested encapsulations; a forged packet nesting deeper is counted, not followed
IPV6_EXT = (0, 43, 60, 135, 139, 140)  # hop-by-hop, routing, dest opts, mobility, HIP, shim6
MAX_FRAG_SETS = 1024
# fragments of one datagram: a 64-KB datagram cut for a 576-byte MTU has 118; more are a forgery
# (each arrival looks for the whole, so the bound keeps that cost constant)
MAX_FRAG_PARTS = 128
MAX_FRAG_BYTES = 16 << 20  # bytes held in all unfinished datagrams (Linux holds 4 MB by default)
MAX_TCP_HELD = 64 << 20  # bytes held for all TCP connections: out of order, or a message's rest
MAX_SIP_MESSAGE = 1 << 20  # bytes: the largest SIP message framed over TCP (--max-sip-message)
MAX_SIP_HEADERS = 1 << 16  # bytes of a message's start line and headers
MAX_TCP_FLOWS = 10_000
# segments held past a hole in one connection's stream: past either bound, or once the hole has
# been open for TCP_GAP_WAIT seconds of capture time, the missing bytes are taken as never to come
# (dropped by the capture, not by the network: the peer got them, so nothing retransmits them) and
# reassembly goes on from the lowest held segment (counted in ``tcp_gaps``)
MAX_TCP_OOO = 256
MAX_TCP_OOO_BYTES = 4 << 20
TCP_GAP_WAIT = 3.0  # seconds: well past an RTO's first retransmission (1 s, RFC 6298)
TCP_FAR = 1 << 24  # bytes ahead of where a stream is: out of any window this reader follows
# segments in a row a flow refuses (behind it, or out of its window) before it starts again at the
# next one: its place was taken by a forged segment or SYN, or the capture lost more than a window
TCP_RESYNC = 32
MAX_RESYNC_TAIL = 512  # bytes of an unfinished last line kept while looking for a SIP start line
NON_SIP_AFTER = 16_384  # bytes without a SIP start line before a connection is ignored

_u16 = struct.Struct("!H").unpack_from
_u32 = struct.Struct("!I").unpack_from
_ip4 = struct.Struct("!BBHHHBBH4s4s").unpack_from
_ports = struct.Struct("!HHH").unpack_from  # src, dst, UDP length
_eth_ip4_udp = struct.Struct("!HBBHHHBBH4s4sHHH").unpack_from  # Ethernet type, _ip4, then _ports
_tcp = struct.Struct("!HHIIBB").unpack_from
_SIP_START = re.compile(rb"(?:[A-Za-z]+ \S+ SIP/2\.0\r?\n|SIP/2\.0 \d{3}[ \r\n])")
_SIP_RESYNC = re.compile(rb"\n(" + _SIP_START.pattern + rb")")
_CLEN = re.compile(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)")


class _FragSet:
    __slots__ = ("parts", "total", "first", "size")

    def __init__(self):
        self.parts: dict[int, bytes] = {}
        self.total = -1
        self.size = 0  # bytes in parts
        self.first = None  # the first fragment's header info (needed to decode the payload)


class _TcpFlow:
    __slots__ = ("next_seq", "pos", "buf", "ooo", "ooo_ts", "heap", "ooo_bytes", "gap_ts", "sip", "skipped",
                 "pending", "plen", "need", "scan", "skip", "data", "closed", "alt", "refused")

    def __init__(self):
        self.next_seq = None
        self.pos = 0  # next_seq unwrapped (never taken modulo 2**32): held segments are keyed by it
        self.buf = b""  # bytes not yet framed into a message
        self.ooo: dict[int, bytes] = {}  # held past a hole, by unwrapped sequence number
        self.ooo_ts: dict[int, float] = {}  # the capture time of each held segment
        self.heap: list[int] = []  # ooo's keys, lowest first
        self.ooo_bytes = 0
        self.gap_ts = 0.0  # capture time the current hole opened
        self.sip = None  # None: undecided; True once a SIP start line was seen
        self.skipped = 0
        # linear cost for large messages: segments wait in ``pending`` until ``need`` bytes are
        # there (the rest of a body whose length is known), then are joined once
        self.pending: list = []
        self.plen = 0
        self.need = 0
        self.scan = 0  # where the search for the end of the headers goes on, from buf's start
        self.skip = 0  # bytes still to discard of a message over the size cap
        self.data = False  # a segment with payload was seen (a SYN then is out of window: ignored)
        self.closed = False  # a FIN or RST carried data: a SYN may open the 4-tuple again
        # where a SYN not taken (or the SYN a first segment did not follow) says the stream
        # starts: data there makes it the stream (see Decoder._tcp)
        self.alt: int | None = None
        self.refused = 0  # segments in a row behind the stream or out of its window

    def held(self) -> int:
        return len(self.buf) + self.plen + self.ooo_bytes


_new_packet = tuple.__new__  # Packet(...) without the Python-level __new__ of a NamedTuple
_UDP_NOT_PLAIN = UDP_TUNNELS | frozenset(UDP_TUNNELS_UNDECODED)
MAX_ADDR_CACHE = 4096


def _ip4_text(text: dict, raw: bytes) -> str:
    """An IPv4 address's text, remembered in ``text`` (emptied when full): a capture has few
    addresses and many packets, so the hit (``text.get``) stays inline at the callers."""
    if len(text) >= MAX_ADDR_CACHE:
        text.clear()
    t = text[raw] = inet_ntop(AF_INET, raw)
    return t


class Decoder:
    """Link layer → IP → UDP/TCP decoder with fragment and TCP state, one per capture."""

    def __init__(self, counters: dict, max_sip_message: int = MAX_SIP_MESSAGE):
        self.c = counters
        self.frags: dict[tuple, _FragSet] = {}
        self.frag_bytes = 0  # held in frags
        # least recently active first (an OrderedDict: a dict's first key is a walk past the
        # slots of every flow moved or dropped before it)
        self.flows: OrderedDict[tuple, _TcpFlow] = OrderedDict()
        # the flows that only saw a SYN (no payload yet), oldest first: they go first when the
        # table is full, so a SYN flood pushes out no connection that carries SIP
        self.bare: OrderedDict[tuple, None] = OrderedDict()
        self.tcp_added = 0  # bytes given to flows to hold since their sum was last looked at
        self.last_ts = None  # the time of the last TCP segment with payload
        self.max_sip_message = max_sip_message
        self._ip4_text: dict[bytes, str] = {}  # packed IPv4 address → text, for the fast path

    def ether_udp4(self, buf, off: int, incl: int, ts: float) -> Packet | None:
        """The frame almost every SIP capture is made of, Ethernet → IPv4 (20-byte header, not
        a fragment) → UDP not on a tunnel port, read straight from the file's buffer: the same
        Packet and counters as :meth:`frame`, with one copy (the payload). None for any other
        frame (then :meth:`frame` decodes it)."""
        if incl < 42 or buf[off + 12] != 8 or buf[off + 13] != 0:
            return None
        vihl, _, total, _, frag, _, proto, _, s, d = _ip4(buf, off + 14)
        if vihl != 0x45 or proto != 17 or frag & 0x3FFF or total < 28 or total > incl - 14:
            return None
        sp, dp, ulen = _ports(buf, off + 34)
        if dp in _UDP_NOT_PLAIN:
            return None
        if ulen < 8 or ulen > total - 20:
            ulen = total - 20  # checksum offload / jumbo: trust the IP length
        c = self.c
        c["udp"] = c.get("udp", 0) + 1
        text = self._ip4_text
        src = text.get(s) or _ip4_text(text, s)
        dst = text.get(d) or _ip4_text(text, d)
        return _new_packet(Packet, (ts, (src, sp), (dst, dp), "udp", buf[off + 42:off + 34 + ulen]))

    def _count(self, name: str, n: int = 1) -> None:
        self.c[name] = self.c.get(name, 0) + n

    def _undecoded(self, what: str) -> None:
        """A frame (or the inside of a tunnel) in an encapsulation this reader does not decode:
        counted in total and by type, so the report can say so loudly."""
        c = self.c
        c["undecoded"] = c.get("undecoded", 0) + 1
        by = c.get("undecoded_types")
        if by is None:
            by = c["undecoded_types"] = {}
        if what not in by and len(by) >= MAX_UNDECODED_TYPES:  # forged variety stays bounded
            what = "other"
        by[what] = by.get(what, 0) + 1

    def _non_ip(self, what: str) -> None:
        """A frame of a protocol that never carries SIP (ARP, LLDP, PPP control, ...)."""
        c = self.c
        c["non_ip"] = c.get("non_ip", 0) + 1
        by = c.get("non_ip_types")
        if by is None:
            by = c["non_ip_types"] = {}
        by[what] = by.get(what, 0) + 1

    def _seen(self, kind: str) -> None:
        c = self.c
        by = c.get("encapsulations")
        if by is None:
            by = c["encapsulations"] = {}
        by[kind] = by.get(kind, 0) + 1

    def _tunnel(self, kind: str, depth: int) -> bool:
        """Entering one more encapsulation: counted by kind; False past the nesting bound."""
        if depth >= MAX_TUNNEL_DEPTH:
            self._undecoded("tunnel_depth")
            return False
        self._seen(kind)
        return True

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
            if etype == ETH_IPV4:  # the common case first
                return self._ipv4(data, 14, ts, 0)
            return self._ether(data, 14, etype, ts, 0)
        if lt == LT_SLL:
            return self._ether(data, 16, _u16(data, 14)[0], ts, 0)
        if lt == LT_SLL2:
            return self._ether(data, 20, _u16(data, 0)[0], ts, 0)
        if lt in LT_RAW_ALIASES or lt == LT_IPV4 or lt == LT_IPV6:
            return self.ip(data, 0, ts)
        if lt == LT_NULL or lt == LT_LOOP:
            fam = struct.unpack_from("<I" if lt == LT_NULL else "!I", data, 0)[0]
            if fam > 0xFFFF:  # written on a machine of the other byte order
                fam = struct.unpack_from(">I", data, 0)[0]
            if fam == 2:
                return self._ipv4(data, 4, ts, 0)
            if fam in (10, 23, 24, 28, 30):
                return self._ipv6(data, 4, ts, 0)
            self._undecoded(f"loopback_family:{fam}")
            return []
        if lt == LT_PPP or lt == LT_PPP_HDLC:
            off = 2 if data[0] == 0xFF and data[1] == 0x03 else 0  # HDLC address/control
            return self._ppp(data, off, ts, 0)
        if lt == LT_PPP_ETHER:
            return self._pppoe(data, 0, ts, 0)
        if lt == LT_C_HDLC:
            return self._ether(data, 4, _u16(data, 2)[0], ts, 0)
        self._count("unknown_linktype")
        self._undecoded(f"linktype:{lt}")
        return []

    def _ethernet(self, data: bytes, off: int, ts: float, depth: int) -> list[Packet]:
        """An Ethernet frame starting at ``off`` (inside a tunnel)."""
        return self._ether(data, off + 14, _u16(data, off + 12)[0], ts, depth)

    def _ether(self, data: bytes, off: int, etype: int, ts: float, depth: int) -> list[Packet]:
        """What follows an Ethernet type field at ``off``: IP, tags, PPPoE, MPLS, bridged frames."""
        while True:
            if etype == ETH_IPV4:
                return self._ipv4(data, off, ts, depth)
            if etype == ETH_IPV6:
                return self._ipv6(data, off, ts, depth)
            if etype in VLAN_TAGS:
                etype = _u16(data, off + 2)[0]
                off += 4
                continue
            if etype <= 1500:  # an 802.3 length: LLC follows; SNAP with OUI 0 carries a type
                if data[off:off + 6] == b"\xaa\xaa\x03\x00\x00\x00":
                    etype = _u16(data, off + 6)[0]
                    off += 8
                    continue
                self._non_ip("llc")
                return []
            if etype == ETH_PPPOE_SESSION:
                return self._pppoe(data, off, ts, depth)
            if etype == ETH_MPLS or etype == ETH_MPLS_MC:
                return self._mpls(data, off, ts, depth)
            if etype == ETH_TEB:  # transparent Ethernet bridging (GRE, Geneve): a whole frame
                etype = _u16(data, off + 12)[0]
                off += 14
                continue
            if etype == ETH_PBB:  # 802.1ah: I-TAG, then the customer's addresses and type
                etype = _u16(data, off + 16)[0]
                off += 18
                continue
            if etype == ETH_PPP:
                return self._ppp(data, off, ts, depth)
            name = ETH_NOT_IP.get(etype)
            if name is not None:
                self._non_ip(name)
            else:
                self._undecoded(f"ethertype:0x{etype:04x}")
            return []

    def _pppoe(self, data: bytes, off: int, ts: float, depth: int) -> list[Packet]:
        """PPPoE session stage (RFC 2516): ver/type 0x11, code 0, session id, length, PPP."""
        if data[off] != 0x11 or data[off + 1] != 0:
            self._undecoded("pppoe_header")
            return []
        length = _u16(data, off + 4)[0]
        if off + 6 + length > len(data):
            self._count("truncated")
            return []
        self._seen("pppoe")
        return self._ppp(data[:off + 6 + length], off + 6, ts, depth)

    def _ppp(self, data: bytes, off: int, ts: float, depth: int) -> list[Packet]:
        proto = data[off]
        if proto & 1:  # protocol field compression (RFC 1661 §6.5): one byte
            off += 1
        else:
            proto = _u16(data, off)[0]
            off += 2
        if proto == PPP_IPV4:
            return self._ipv4(data, off, ts, depth)
        if proto == PPP_IPV6:
            return self._ipv6(data, off, ts, depth)
        if proto == 0x0281 or proto == 0x0283:
            return self._mpls(data, off, ts, depth)
        if proto >= PPP_CONTROL_MIN:
            self._non_ip("ppp_control")
        else:  # compressed or encrypted datagrams (CCP/ECP), Van Jacobson, other network layers
            self._undecoded(f"ppp:0x{proto:04x}")
        return []

    def _mpls(self, data: bytes, off: int, ts: float, depth: int) -> list[Packet]:
        """An MPLS label stack (RFC 3032), then IP by its version nibble, or an Ethernet
        pseudowire (RFC 4448, with or without the control word)."""
        while not data[off + 2] & 1:  # bottom of stack bit
            off += 4
        off += 4
        if not self._tunnel("mpls", depth):
            return []
        nib = data[off] >> 4
        if nib == 4:
            return self._ipv4(data, off, ts, depth + 1)
        if nib == 6:
            return self._ipv6(data, off, ts, depth + 1)
        if nib == 1:  # associated channel (OAM)
            self._non_ip("mpls_ach")
            return []
        # an Ethernet pseudowire: the control word (first nibble 0) is optional, so prefer the
        # reading whose Ethernet type is one that carries IP (Wireshark guesses by MAC vendor)
        if nib == 0 and (_u16(data, off + 16)[0] in _ETH_CARRIERS
                         or _u16(data, off + 12)[0] not in _ETH_CARRIERS):
            off += 4
        return self._ethernet(data, off, ts, depth + 1)

    # -- IP ------------------------------------------------------------------------------
    def ip(self, data: bytes, off: int, ts: float, depth: int = 0) -> list[Packet]:
        version = data[off] >> 4
        if version == 4:
            return self._ipv4(data, off, ts, depth)
        if version == 6:
            return self._ipv6(data, off, ts, depth)
        self._undecoded(f"ip_version:{version}")
        return []

    def _ipv4(self, data: bytes, off: int, ts: float, depth: int = 0) -> list[Packet]:
        vihl, _, total, ident, frag, _, proto, _, s, d = _ip4(data, off)
        hl = (vihl & 15) * 4
        if hl < 20 or total < hl or vihl >> 4 != 4:
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
        return self._transport(proto, AF_INET, s, d, payload, ts, depth)

    def _ipv6(self, data: bytes, off: int, ts: float, depth: int = 0) -> list[Packet]:
        if data[off] >> 4 != 6:
            self._count("bad_ip")
            return []
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
        return self._transport(nxt, AF_INET6, s, d, payload, ts, depth)

    def _reassemble(self, key, foff: int, mf: bool, part: bytes) -> bytes | None:
        """Collect fragments; return the whole payload once every byte up to the last is here."""
        self._count("ip_fragments")
        fs = self.frags.get(key)
        if fs is None:
            if len(self.frags) >= MAX_FRAG_SETS:
                self._drop_frags(next(iter(self.frags)))
            fs = self.frags[key] = _FragSet()
        old = fs.parts.get(foff)
        if old is not None:  # the same offset again: the later copy wins
            fs.size -= len(old)
            self.frag_bytes -= len(old)
        elif len(fs.parts) >= MAX_FRAG_PARTS:
            self._drop_frags(key)
            return None
        fs.parts[foff] = part
        fs.size += len(part)
        self.frag_bytes += len(part)
        while self.frag_bytes > MAX_FRAG_BYTES:  # the oldest unfinished datagrams go first
            oldest = next(iter(self.frags))
            self._drop_frags(oldest)
            if oldest == key:
                return None
        if not mf:
            fs.total = foff + len(part)
        if fs.total < 0 or fs.size < fs.total:  # (cannot be whole yet)
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
        self.frag_bytes -= fs.size
        self._count("ip_reassembled")
        return b"".join(out)[:fs.total]

    def _drop_frags(self, key) -> None:
        """An unfinished datagram given up (too many fragments, or the bounds on what is held)."""
        self.frag_bytes -= self.frags.pop(key).size
        self._count("fragments_dropped")

    # -- transport -----------------------------------------------------------------------
    def _transport(self, proto: int, fam: int, s: bytes, d: bytes, seg: bytes,
                   ts: float, depth: int = 0) -> list[Packet]:
        if proto == 17:
            if len(seg) < 8:
                self._count("truncated")
                return []
            sp, dp, ulen = _ports(seg, 0)
            if ulen < 8 or ulen > len(seg):
                ulen = len(seg)  # checksum offload / jumbo: trust the IP length
            if dp in UDP_TUNNELS and ulen >= 12:
                got = self._udp_tunnel(dp, seg[:ulen], ts, depth)
                if got is not None:
                    return got
            elif dp in UDP_TUNNELS_UNDECODED:  # not SIP, not RTP: the frame is not opened
                self._undecoded(UDP_TUNNELS_UNDECODED[dp])
                return []
            self._count("udp")
            return [Packet(ts, (inet_ntop(fam, s), sp), (inet_ntop(fam, d), dp), "udp",
                           bytes(seg[8:ulen]))]
        if proto == 6:
            return self._tcp(fam, s, d, seg, ts)
        if proto == 4 or proto == 41 or proto == 47 or proto == 137 or proto == 97:
            return self._ip_tunnel(proto, seg, ts, depth)
        if proto in IP_NOT_SIP:
            self._count("other_ip_proto")
        else:  # SCTP, ESP, L2TPv3, ...: may carry SIP this reader cannot see
            self._undecoded(f"ip_proto:{proto}")
        return []

    def _ip_tunnel(self, proto: int, seg: bytes, ts: float, depth: int) -> list[Packet]:
        kind = {4: "ipip", 41: "ipv6_in_ip", 47: "gre", 137: "mpls_in_ip", 97: "etherip"}[proto]
        if not self._tunnel(kind, depth):
            return []
        depth += 1
        if proto == 4:  # IPv4 in IP
            return self._ipv4(seg, 0, ts, depth)
        if proto == 41:  # IPv6 in IP
            return self._ipv6(seg, 0, ts, depth)
        if proto == 137:
            return self._mpls(seg, 0, ts, depth)
        if proto == 97:  # EtherIP (RFC 3378): 4-bit version 3, 12 reserved bits
            return self._ethernet(seg, 2, ts, depth)
        return self._gre(seg, ts, depth)

    def _gre(self, seg: bytes, ts: float, depth: int) -> list[Packet]:
        """GRE (RFC 2784/2890, PPTP's enhanced GRE), with ERSPAN type I, II and III inside."""
        flags, proto = _u16(seg, 0)[0], _u16(seg, 2)[0]
        ver = flags & 7
        if ver > 1 or flags & 0x4000:  # unknown version, or RFC 1701 source routing
            self._undecoded(f"gre_flags:0x{flags:04x}")
            return []
        off = 4
        if flags & 0x8000:  # checksum + reserved
            off += 4
        if flags & 0x2000:  # key (PPTP: payload length + call id)
            off += 4
        if flags & 0x1000:  # sequence number
            off += 4
        if ver == 1 and flags & 0x0080:  # PPTP acknowledgment number
            off += 4
        if proto == ETH_ERSPAN2:
            if not flags & 0x1000:  # type I: no ERSPAN header, no sequence number
                return self._ethernet(seg, off, ts, depth) if self._tunnel("erspan1", depth) else []
            if seg[off] >> 4 != 1:
                self._undecoded(f"erspan2_version:{seg[off] >> 4}")
                return []
            return self._ethernet(seg, off + 8, ts, depth) if self._tunnel("erspan2", depth) else []
        if proto == ETH_ERSPAN3:
            if seg[off] >> 4 != 2:
                self._undecoded(f"erspan3_version:{seg[off] >> 4}")
                return []
            w = _u32(seg, off + 8)[0]
            ft = (w >> 10) & 0x1F
            off += 20 if w & 1 else 12  # O flag: an 8-byte platform-specific subheader follows
            if ft != 0:
                self._undecoded(f"erspan3_frame_type:{ft}")
                return []
            return self._ethernet(seg, off, ts, depth) if self._tunnel("erspan3", depth) else []
        if proto == 0x883E:  # WCCP redirect: an optional 4-byte header before the IP packet
            return self.ip(seg, off if seg[off] >> 4 == 4 else off + 4, ts, depth)
        return self._ether(seg, off, proto, ts, depth)

    def _udp_tunnel(self, dp: int, seg: bytes, ts: float, depth: int) -> list[Packet] | None:
        """VXLAN (RFC 7348), VXLAN-GPE, Geneve (RFC 8926), GTP-U, L2TPv2 (RFC 2661), GRE-in-UDP
        (RFC 8086) and MPLS-in-UDP (RFC 7510) by their IANA ports; None when the header does not
        fit (then the datagram is passed on as plain UDP)."""
        flags = seg[8]
        if dp == UDP_GTPU:
            return self._gtpu(seg, flags, ts, depth)
        if dp == UDP_L2TP:
            return self._l2tp(seg, ts, depth)
        if dp == UDP_GRE:
            return self._gre(seg[8:], ts, depth + 1) if self._tunnel("gre_in_udp", depth) else []
        if dp == UDP_MPLS:
            return self._mpls(seg, 8, ts, depth)
        if len(seg) < 16:
            return None
        if dp == UDP_VXLAN:
            if not flags & 0x08:  # the I flag (a valid VNI) is set in every VXLAN header
                return None
            return self._ethernet(seg, 16, ts, depth) if self._tunnel("vxlan", depth) else []
        if dp == UDP_GENEVE:
            if flags >> 6 != 0:  # version 0
                return None
            off = 16 + (flags & 0x3F) * 4
            if not self._tunnel("geneve", depth):
                return []
            return self._ether(seg, off, _u16(seg, 10)[0], ts, depth + 1)
        if flags & 0x0C != 0x0C:  # VXLAN-GPE: I and P (next protocol present)
            return None
        nxt = seg[11]
        if not self._tunnel("vxlan_gpe", depth):
            return []
        if nxt == 1:
            return self._ipv4(seg, 16, ts, depth + 1)
        if nxt == 2:
            return self._ipv6(seg, 16, ts, depth + 1)
        if nxt == 3:
            return self._ethernet(seg, 16, ts, depth + 1)
        if nxt == 5:
            return self._mpls(seg, 16, ts, depth + 1)
        self._undecoded(f"vxlan_gpe_next:{nxt}")
        return []

    def _gtpu(self, seg: bytes, flags: int, ts: float, depth: int) -> list[Packet] | None:
        """GTP-U v1 (3GPP TS 29.281): a G-PDU carries the subscriber's IP packet (VoLTE SIP)."""
        if flags >> 5 != 1 or not flags & 0x10:  # version 1, protocol type GTP
            return None
        if seg[9] != 0xFF:  # echo, error indication, end marker: signalling of the tunnel
            self._non_ip("gtpu_signalling")
            return []
        off = 16
        if flags & 0x07:  # sequence number, N-PDU number, next extension header type
            nxt = seg[off - 1 + 4]
            off += 4
            while nxt:  # extension headers: length in 4-octet units, last octet = next type
                n = seg[off] * 4
                if n == 0:
                    self._count("truncated")
                    return []
                nxt = seg[off + n - 1]
                off += n
        if not self._tunnel("gtpu", depth):
            return []
        return self.ip(seg, off, ts, depth + 1)

    def _l2tp(self, seg: bytes, ts: float, depth: int) -> list[Packet] | None:
        """L2TPv2 data messages (RFC 2661 §3.1): PPP sessions as a LAC/LNS tap sees them."""
        flags = _u16(seg, 8)[0]
        if flags & 0x0F != 2:  # version 2 (L2TPv3 over UDP has version 3 and is not opened)
            return None
        if flags & 0x8000:  # control message
            self._non_ip("l2tp_control")
            return []
        off = 10 + (2 if flags & 0x4000 else 0) + 4  # optional length, tunnel and session ids
        if flags & 0x0800:  # Ns, Nr
            off += 4
        if flags & 0x0200:  # offset size, then that many padding octets
            off += 2 + _u16(seg, off)[0]
        if not self._tunnel("l2tp", depth):
            return []
        if seg[off] == 0xFF and seg[off + 1] == 0x03:  # HDLC address and control
            off += 2
        return self._ppp(seg, off, ts, depth + 1)

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
        flows = self.flows
        flow = flows.get(key)
        if flow is None:
            if not data and not flags & 0x02:
                return []
            if len(flows) >= MAX_TCP_FLOWS and not self._evict(bool(data)):
                self._count("tcp_syn_ignored")  # a bare SYN does not push out a connection
                return []
            flow = flows[key] = _TcpFlow()
            if not data:
                self.bare[key] = None
        else:
            flows.move_to_end(key)  # (most recently active last)
        if flags & 0x02:  # SYN: data starts at ISN + 1
            if flow.data and not flow.closed:
                # on a connection that carried data: a forged SYN, or the 4-tuple opened again
                # without its close captured. An endpoint ignores one out of window (RFC 5961 §4);
                # an observer cannot tell, so the data decides: the stream goes on where it was
                # unless data comes where this SYN says (flow.alt)
                flow.alt = (seq + 1) & 0xFFFFFFFF
                self._count("tcp_syn_ignored")
                return []
            self._restart_stream(flow, (seq + 1) & 0xFFFFFFFF)
            flow.data = flow.closed = False
            flow.alt = None
            if key not in self.bare:
                self.bare[key] = None
            return []
        if flags & 0x05 and not data:  # FIN/RST without data: what is held past a hole is given up
            out = self._give_up(flow, src, dst) if flow.ooo else []
            self.flows.pop(key, None)
            self.bare.pop(key, None)
            return out
        if not data or flow.sip is False:
            return []
        if flags & 0x05:
            flow.closed = True
        self.last_ts = ts
        if flow.next_seq is None:
            flow.next_seq = flow.pos = seq  # capture started mid-connection
        rel = (seq - flow.next_seq) & 0xFFFFFFFF
        if rel and seq == flow.alt:  # data where the other start said: that is the stream now
            alt = flow.next_seq
            self._count("tcp_stream_switches")
            self._skip_held(flow)
            self._restart_stream(flow, seq)
            flow.alt = alt  # (the one left may win back the same way)
            rel = 0
        if not flow.data:
            flow.data = True
            self.bare.pop(key, None)
            if rel >= 0x80000000 or rel > TCP_FAR:
                # not where its SYN said (a forged SYN, or this a forged segment): followed, and
                # the SYN's word kept as the other start
                flow.alt = flow.next_seq
                flow.next_seq = flow.pos = seq
                rel = 0
        out = []
        while rel:
            if rel >= 0x80000000:  # starts before what we have: retransmission, maybe overlapping
                back = 0x100000000 - rel
                if back >= len(data):
                    self._count("tcp_retransmissions")
                    return self._refused(flow, seq, data, src, dst, ts, out)
                data = data[back:]
                break
            if rel > TCP_FAR:  # out of any window: not this stream's (forged, or our place lost)
                self._count("tcp_out_of_window")
                return self._refused(flow, seq, data, src, dst, ts, out)
            # a hole: keep this segment until the missing bytes arrive
            ooo = flow.ooo
            if not ooo:
                flow.gap_ts = ts
            elif len(ooo) >= MAX_TCP_OOO or flow.ooo_bytes + len(data) > MAX_TCP_OOO_BYTES \
                    or ts - flow.gap_ts > TCP_GAP_WAIT:
                # not filled: the capture lost those bytes (the peer got them, nothing resends
                # them); go on from the lowest held segment, then place this one again
                out += self._give_up(flow, src, dst, once=True)
                flow.gap_ts = ts
                rel = (seq - flow.next_seq) & 0xFFFFFFFF
                continue
            flow.refused = 0
            at = flow.pos + rel
            old = ooo.get(at)
            if old is None:
                heapq.heappush(flow.heap, at)
                ooo[at] = bytes(data)
                flow.ooo_ts[at] = ts
                flow.ooo_bytes += len(data)
            elif len(data) > len(old):  # (a retransmission carrying more)
                ooo[at] = bytes(data)
                flow.ooo_bytes += len(data) - len(old)
            else:
                return out
            self._held(len(data))
            return out
        flow.refused = 0
        flow.gap_ts = ts  # (a hole after this is timed from the stream's last step)
        self._take(flow, data)
        self._held(len(data))
        if flow.ooo:
            self._drain(flow)
        if key not in self.flows:  # (cut off by _held)
            return out
        if out:
            return out + self._ready(flow, src, dst, ts)
        return self._ready(flow, src, dst, ts)

    def _refused(self, flow: _TcpFlow, seq: int, data, src, dst, ts, out: list) -> list[Packet]:
        """A segment behind the stream or out of its window. TCP_RESYNC of them in a row, and
        none taken between: the stream is not where we think (a forged segment or SYN took our
        place, or the capture lost more than a window), so it starts again at this one."""
        flow.refused += 1
        if flow.refused < TCP_RESYNC:
            return out
        self._count("tcp_resyncs")
        self._skip_held(flow)
        self._restart_stream(flow, seq)
        flow.alt = None
        self._take(flow, data)
        self._held(len(data))
        return out + self._ready(flow, src, dst, ts)

    @staticmethod
    def _restart_stream(flow: _TcpFlow, next_seq: int) -> None:
        """Reassembly from ``next_seq`` on, with nothing held."""
        flow.next_seq = flow.pos = next_seq
        flow.buf, flow.ooo, flow.ooo_ts, flow.heap, flow.ooo_bytes = b"", {}, {}, [], 0
        flow.pending, flow.plen, flow.need, flow.scan, flow.skip = [], 0, 0, 0, 0
        flow.refused = 0

    def _skip_held(self, flow: _TcpFlow) -> None:
        """Count what a flow holds as skipped (its stream starts again elsewhere)."""
        lost = flow.held()
        if lost:
            self._count("tcp_skipped_bytes", lost)

    def flush(self, ts: float) -> list[Packet]:
        """The capture ended: the holes still open in connections will not be filled; what is
        held after them is framed (each message stamped with its last segment's time)."""
        out = []
        for key, flow in list(self.flows.items()):
            if flow.ooo:
                out += self._give_up(flow, key[0], key[1])
        return out

    def _give_up(self, flow: _TcpFlow, src, dst, once: bool = False) -> list[Packet]:
        """Give up the hole before the lowest held segment (every hole, unless ``once``) and
        frame what follows it, each segment's messages stamped with that segment's time."""
        out: list[Packet] = []
        while flow.ooo:
            self._gap(flow)
            self._drain(flow, (src, dst, out))
            if once:
                break
        return out

    def _ready(self, flow: _TcpFlow, src, dst, ts) -> list[Packet]:
        """Frame what a connection holds, unless the body of its message is still arriving."""
        if flow.plen < flow.need:
            return []
        if flow.pending:
            flow.buf = flow.buf + b"".join(flow.pending) if flow.buf else b"".join(flow.pending)
            flow.pending, flow.plen = [], 0
        return self._frame_sip(flow, src, dst, ts)

    def _evict(self, data: bool) -> bool:
        """Make room for one more connection in a full table: one that only saw a SYN goes first,
        else (for a segment with payload) the least recently active, counted in
        ``tcp_flows_dropped`` when it held bytes of a message. False: nothing was given up."""
        flows = self.flows
        if self.bare:
            flows.pop(self.bare.popitem(last=False)[0], None)
            return True
        if not data:
            return False
        _, old = flows.popitem(last=False)
        if old.held():
            self._count("tcp_flows_dropped")
        return True

    def _gap(self, flow: _TcpFlow) -> None:
        """Give up the hole before the lowest held segment: the bytes of an unfinished message
        before it are dropped, and framing starts afresh at the next SIP start line."""
        self._count("tcp_gaps")
        lost = len(flow.buf) + flow.plen
        if lost:
            self._count("tcp_skipped_bytes", lost)
        flow.buf, flow.pending, flow.plen, flow.need, flow.scan, flow.skip = b"", [], 0, 0, 0, 0
        at = flow.heap[0]
        flow.next_seq = (flow.next_seq + (at - flow.pos)) & 0xFFFFFFFF
        flow.pos = at

    def _drain(self, flow: _TcpFlow, frame: tuple | None = None) -> None:
        """Take the held segments the stream has reached, lowest first: the part of one that
        starts before ``next_seq`` is cut off, one wholly behind it dropped. With ``frame``
        (src, dst, out), each segment's messages are framed as it is taken, stamped with its own
        capture time, into ``out`` (a hole given up: they were not waiting for a later one)."""
        heap, ooo, stamps = flow.heap, flow.ooo, flow.ooo_ts
        while heap and heap[0] <= flow.pos:
            at = heapq.heappop(heap)
            nxt = ooo.pop(at)
            seg_ts = stamps.pop(at)
            flow.ooo_bytes -= len(nxt)
            back = flow.pos - at
            if back >= len(nxt):
                self._count("tcp_retransmissions")
                continue
            if back:
                nxt = nxt[back:]
            self._take(flow, nxt)
            if frame is not None:
                frame[2].extend(self._ready(flow, frame[0], frame[1], seg_ts))

    def _held(self, n: int) -> None:
        """``n`` more bytes given to the flows to hold: past a quarter of MAX_TCP_HELD since the
        last look, their sum is taken; above MAX_TCP_HELD, the connections holding the most are
        given up until three quarters are left. (Amortised: at most one walk over the flows per
        16 MB of TCP payload.)"""
        self.tcp_added += n
        if self.tcp_added <= MAX_TCP_HELD // 4:
            return
        self.tcp_added = 0
        held = [(len(f.buf) + f.plen + f.ooo_bytes, k) for k, f in self.flows.items()]
        total = sum(h for h, _ in held)
        if total <= MAX_TCP_HELD:
            return
        held.sort(reverse=True)
        for h, k in held:
            if total <= MAX_TCP_HELD * 3 // 4:
                break
            del self.flows[k]
            total -= h
            self._count("tcp_flows_dropped")

    @staticmethod
    def _take(flow: _TcpFlow, data) -> None:
        """``data``, next in the stream, to frame; the stream's place moves past it."""
        flow.next_seq = (flow.next_seq + len(data)) & 0xFFFFFFFF
        flow.pos += len(data)
        if flow.skip:  # the rest of a message over the size cap: dropped as it arrives
            k = min(flow.skip, len(data))
            flow.skip -= k
            data = data[k:]
            if not data:
                return
        flow.pending.append(data)
        flow.plen += len(data)

    def _frame_sip(self, flow: _TcpFlow, src, dst, ts) -> list[Packet]:
        """Cut complete SIP messages off a TCP byte stream by Content-Length (RFC 3261 §18.3),
        any size up to ``max_sip_message``; a larger one is counted (``sip_oversized``) and its
        bytes skipped, so the messages after it are still framed. Cost is linear in the bytes."""
        out = []
        buf, pos, n = flow.buf, 0, len(flow.buf)
        cap = self.max_sip_message
        flow.need = 0
        while pos < n:
            start = pos
            while pos < n and buf[pos] in (10, 13):  # CRLF keep-alives between messages
                pos += 1
            if pos - start >= 2:
                self._count("tcp_keepalives")
            if pos >= n:
                break
            if buf.find(b"\n", pos, pos + 4096) < 0:  # no whole first line yet
                if n - pos >= 4096:
                    self._count("tcp_skipped_bytes", n - pos)
                    pos = n
                break
            if _SIP_START.match(buf, pos) is None:
                # joined mid-message, or lost our place: skip to the next line that starts one
                m = _SIP_RESYNC.search(buf, pos)
                if m is None:
                    # an unfinished last line may be the head of a start line: kept (bounded)
                    cut = buf.rfind(b"\n", pos, n)
                    if cut < 0 or n - cut > MAX_RESYNC_TAIL:
                        cut = n
                    self._count("tcp_skipped_bytes", cut - pos)
                    flow.skipped += cut - pos
                    if flow.sip is None and flow.skipped > NON_SIP_AFTER:
                        self._count("tcp_non_sip_flows")
                        flow.sip = False  # stop buffering a connection that never spoke SIP
                    pos = cut
                    break
                self._count("tcp_skipped_bytes", m.start(1) - pos)
                pos = m.start(1)
                flow.scan = 0
            flow.sip = True
            look = pos + flow.scan
            e1, e2 = buf.find(b"\r\n\r\n", look), buf.find(b"\n\n", look)
            if e1 < 0 and e2 < 0:
                if n - pos > MAX_SIP_HEADERS:  # no end of headers: lost; resynchronise
                    self._count("sip_oversized")
                    self._count("tcp_skipped_bytes", n - pos)
                    pos, flow.scan = n, 0
                else:
                    flow.scan = max(0, n - pos - 3)
                break
            end, sep = (e1, 4) if e2 < 0 or 0 <= e1 < e2 else (e2, 2)
            flow.scan = 0
            m = _CLEN.search(buf, pos, end)
            blen = (int(m.group(1)) if len(m.group(1)) <= 12 else cap + 1) if m else 0
            total = end + sep + blen - pos
            if total > cap:
                self._count("sip_oversized")
                if n - pos >= total:
                    pos += total
                    continue
                flow.skip = total - (n - pos)
                pos = n
                break
            if n - pos < total:
                flow.need = total - (n - pos)
                break
            out.append(Packet(ts, src, dst, "tcp", buf[pos:pos + total]))
            self._count("tcp_sip_messages")
            pos += total
        flow.buf = buf[pos:] if pos else buf
        return out


# -- file formats ------------------------------------------------------------------------
def read_packets(path, counters: dict | None = None,
                 max_sip_message: int = MAX_SIP_MESSAGE) -> Iterator[Packet]:
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
            dec = Decoder(c, max_sip_message)
            if magic == b"\x0a\x0d\x0d\x0a":
                yield from _pcapng(mm, dec, c)
            elif magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1",
                           b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
                yield from _pcap(mm, dec, c)
            else:
                raise PcapError("not a pcap or pcapng file (unknown magic number)")
            if dec.last_ts is not None:
                yield from dec.flush(dec.last_ts)


def _pcap(mm, dec: Decoder, c: dict) -> Iterator[Packet]:
    """The packets of a classic pcap file: a function returning the records' generator, so
    ``read_packets`` delegates to it directly (one generator level less per packet)."""
    magic = mm[:4]
    end = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    # integer ticks / exact power of ten: the same instant gives the same float in every format
    div = 10**9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 10**6
    if len(mm) < 24:
        c["truncated"] = c.get("truncated", 0) + 1
        return iter(())
    linktype = struct.unpack_from(end + "I", mm, 20)[0] & 0x0FFFFFFF
    rec = struct.Struct(end + "IIII").unpack_from
    if linktype == LT_ETHERNET:
        return _pcap_ethernet(mm, dec, c, rec, div)
    return _pcap_records(mm, dec, c, linktype, rec, div)


def _pcap_records(mm, dec: Decoder, c: dict, linktype: int, rec, div: int) -> Iterator[Packet]:
    off, n = 24, len(mm)
    frame = dec.frame
    while off + 16 <= n:
        sec, frac, incl, _ = rec(mm, off)
        off += 16
        if off + incl > n:
            c["truncated"] = c.get("truncated", 0) + 1
            return
        c["frames"] += 1
        ts = (sec * div + frac) / div
        yield from frame(linktype, mm[off:off + incl], ts)
        off += incl
    if off != n:
        c["truncated"] = c.get("truncated", 0) + 1


def _pcap_ethernet(mm, dec: Decoder, c: dict, rec, div: int) -> Iterator[Packet]:
    """The records of an Ethernet pcap, with :meth:`Decoder.ether_udp4` written out in the loop
    (one Python call less per frame, the two counters it bumps kept in locals until the end):
    the same packets, and the same counters in the same key order."""
    off, n = 24, len(mm)
    frame = dec.frame
    text = dec._ip4_text
    eth_ip4_udp, new_packet, not_plain = _eth_ip4_udp, _new_packet, _UDP_NOT_PLAIN
    frames = udp = 0
    try:
        while off + 16 <= n:
            sec, frac, incl, _ = rec(mm, off)
            off += 16
            if off + incl > n:
                c["truncated"] = c.get("truncated", 0) + 1
                return
            frames += 1
            ts = (sec * div + frac) / div
            if incl >= 42:
                # the Ethernet type, the IPv4 header and the UDP ports and length in one unpack
                etype, vihl, _, total, _, frag, _, proto, _, s, d, sp, dp, ulen = eth_ip4_udp(mm, off + 12)
                if etype == ETH_IPV4 and vihl == 0x45 and proto == 17 and not frag & 0x3FFF \
                        and 28 <= total <= incl - 14:
                    if dp not in not_plain:
                        if ulen < 8 or ulen > total - 20:
                            ulen = total - 20  # checksum offload / jumbo: trust the IP length
                        if not udp and "udp" not in c:
                            c["udp"] = 0  # (where ether_udp4 would have made the key)
                        udp += 1
                        src = text.get(s) or _ip4_text(text, s)
                        dst = text.get(d) or _ip4_text(text, d)
                        yield new_packet(Packet, (ts, (src, sp), (dst, dp), "udp", mm[off + 42:off + 34 + ulen]))
                        off += incl
                        continue
            yield from frame(LT_ETHERNET, mm[off:off + incl], ts)
            off += incl
        if off != n:
            c["truncated"] = c.get("truncated", 0) + 1
    finally:
        c["frames"] += frames
        if udp:
            c["udp"] += udp


# pcapng block types read here, and their least total length (the fixed fields, no data)
_BLOCK_MIN = {1: 20, 2: 32, 3: 16, 6: 32}


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
        if struct.unpack_from(end + "I", mm, off + blen - 4)[0] != blen:
            # the trailing copy of the length differs: the block is damaged and not read; reading
            # goes on after the first trailing copy that fits its start, if one does (a leading
            # length that lies does not swallow the blocks after it), else stops
            c["truncated"] = c.get("truncated", 0) + 1
            u32 = struct.Struct(end + "I").unpack_from
            for p in range(off + 12, off + blen - 4, 4):
                if u32(mm, p)[0] == p + 4 - off:
                    off = p + 4
                    break
            else:
                return
            continue
        body = off + 8
        if blen < _BLOCK_MIN.get(btype, 12):  # too short for its own fixed fields: skipped
            c["truncated"] = c.get("truncated", 0) + 1
        elif btype == 1:  # interface description
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
                pkt = dec.ether_udp4(mm, data_off, cap, last_ts) if lt == LT_ETHERNET else None
                if pkt is not None:
                    yield pkt
                else:
                    yield from frame(lt, mm[data_off:data_off + cap], last_ts)
        elif btype == 3:  # simple packet block: interface 0, no timestamp
            if ifaces:
                orig = struct.unpack_from(end + "I", mm, body)[0]
                cap = min(orig, blen - 16)
                c["frames"] += 1
                yield from frame(ifaces[0][0], mm[body + 4:body + 4 + cap], last_ts)
            else:  # before any interface description: its link type is unknown
                c["unknown_interface"] = c.get("unknown_interface", 0) + 1
        off += blen
    if off != n:
        c["truncated"] = c.get("truncated", 0) + 1


def _options(mm, off: int, stop: int, end: str):
    while off + 4 <= stop:
        code, length = struct.unpack_from(end + "HH", mm, off)
        if code == 0 or off + 4 + length > stop:  # the end, or an option past its block's end
            return
        yield code, mm[off + 4:off + 4 + length]
        off += 4 + ((length + 3) & ~3)
