"""HEP (Homer Encapsulation Protocol) v3 encoding and v2/v3 decoding, on bytes only.

HEP is how SIP servers and capture agents ship what they saw on the wire to Homer, SIP3 or
sngrep: the message plus its addresses, ports, transport and capture timestamp. sipwatch sends it
(:mod:`sipwatch.hep_sender`) and receives it (``sipwatch capture --hep-listen``).

HEPv3 layout (all big-endian): ``HEP3``, uint16 total length (equal to the datagram's length:
receivers drop anything else), then chunks of uint16 vendor, uint16 type, uint16 length (the
chunk's own 6-byte header included). Generic chunk types (vendor 0) used here: 1 IP family (2 or
10), 2 IP protocol (17 UDP, 6 TCP), 3/4 IPv4 source/destination, 5/6 IPv6 source/destination,
7/8 ports, 9 seconds, 10 microseconds, 11 payload type (1 SIP, 5 RTCP JSON, 100 LOG),
12 capture id (uint32: a 2-byte one is rejected by Homer), 14 auth key, 15 payload,
16 zlib-compressed payload, 17 correlation id, 19 node name. The encoder writes Kamailio's chunk
order (1, 2, 3/5, 4/6, 7, 8, 9, 10, 11, 12, 17, 14, 15) and puts the node name last.

HEPv1/v2 (Kamailio's and older agents' format): 8-byte header (version, header length, family,
protocol, source port, destination port), the two addresses and, in v2, a time header (seconds,
microseconds, capture id) in little-endian order, then the payload.

The decoder treats every byte as hostile: every length is checked against what is there, one
pass over the chunks (linear), a compressed payload is inflated to at most
:data:`MAX_PAYLOAD` bytes, and it never raises: it returns a :class:`HepPacket` or one of the
fixed reasons in :data:`REASONS`, which the caller counts.
"""
from __future__ import annotations

import hmac
import socket
import struct
import zlib

from . import optional_c

# the packet assembly in C (setup.py builds it); None without it or under SIPWATCH_NO_C=1, and
# the struct packs below do it
_hepenc = optional_c("_hepenc")

HEP3 = b"HEP3"
MAX_HEP = 65535  # uint16 total length
MAX_PAYLOAD = 65535  # what an inflated payload may grow to
# ... and at most this many times its compressed size (past INFLATE_FLOOR): SIP text deflates a
# few times over, while 100 bytes of zlib can hold 64 KB of zeros, ~0.15 ms to inflate; bounded,
# a forged packet costs about what reading its own bytes does
INFLATE_RATIO, INFLATE_FLOOR = 64, 8192
# real packets hold 10-20 chunks; 10,000 empty vendor chunks in one datagram cost ~200x a real
# packet's parse per byte
MAX_CHUNKS = 64
# a correlation id is a Call-ID (what RTCP reports are kept by, per call) or a short tag; one of
# 64 KB per call would have let a forged sender hold ~1 GB of reports
MAX_CORRELATION_ID = 1024
PROTO_UDP, PROTO_TCP = 17, 6
AF_INET, AF_INET6 = 2, 10  # HEP's family values (Linux numbering), whatever this host uses
TYPE_SIP, TYPE_RTCP_JSON, TYPE_LOG = 1, 5, 100

# why a datagram is not a HEP packet we can use: a fixed set, so it can be a metric label
REASONS = ("not_hep", "truncated", "bad_length", "bad_chunk", "missing_chunk", "bad_address",
           "bad_payload", "auth")

_CHUNK = struct.Struct(">HHH")
_U8 = struct.Struct(">HHHB")
_U16 = struct.Struct(">HHHH")
_U32 = struct.Struct(">HHHI")
# header, then chunks 1, 2, src, dst, 7, 8, 9, 10, 11, 12 for each family (fixed sizes)
_FIXED4 = struct.Struct(">4sH" "HHHB" "HHHB" "HHH4s" "HHH4s" "HHHH" "HHHH" "HHHI" "HHHI" "HHHB" "HHHI")
_FIXED6 = struct.Struct(">4sH" "HHHB" "HHHB" "HHH16s" "HHH16s" "HHHH" "HHHH" "HHHI" "HHHI" "HHHB" "HHHI")
_V2_TIME = struct.Struct("<IIH")


class HepError(ValueError):
    """A value that cannot be encoded (an address that is no IP literal, a payload too large)."""


class HepPacket:
    """One decoded HEP packet: the captured message and where and when it was on the wire."""
    __slots__ = ("version", "family", "proto", "src", "dst", "ts_sec", "ts_usec", "payload_type",
                 "capture_id", "auth_key", "correlation_id", "node_name", "payload")

    def __init__(self, version, family, proto, src, dst, ts_sec, ts_usec, payload_type,
                 capture_id, auth_key, correlation_id, node_name, payload):
        self.version = version
        self.family = family  # 4 or 6
        self.proto = proto  # IP protocol number: 17 UDP, 6 TCP, ...
        self.src = src  # (ip text, port)
        self.dst = dst
        self.ts_sec = ts_sec
        self.ts_usec = ts_usec
        self.payload_type = payload_type
        self.capture_id = capture_id
        self.auth_key = auth_key  # bytes or None
        self.correlation_id = correlation_id  # bytes or None
        self.node_name = node_name  # bytes or None
        self.payload = payload

    @property
    def ts(self) -> float:
        return self.ts_sec + self.ts_usec / 1e6

    @property
    def transport(self) -> str:
        """As the observer names it: tcp (TLS senders say TCP too), sctp, else udp."""
        return "tcp" if self.proto == PROTO_TCP else "sctp" if self.proto == 132 else "udp"

    def __repr__(self) -> str:
        return (f"HepPacket(v{self.version} {self.src}->{self.dst} proto={self.proto} "
                f"type={self.payload_type} capture_id={self.capture_id} ts={self.ts_sec}.{self.ts_usec:06d} "
                f"payload={len(self.payload)}B)")


def ip_bytes(host: str) -> bytes:
    """The 4 or 16 bytes of an IP literal (an IPv6 zone is dropped); HepError for anything else."""
    try:
        return socket.inet_pton(socket.AF_INET, host)
    except (OSError, TypeError, ValueError):
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except (OSError, TypeError, ValueError, AttributeError):
        raise HepError(f"not an IP literal: {host!r}") from None


def encode_hep3(payload: bytes, src: tuple, dst: tuple, ts: float, *, proto: int = PROTO_UDP,
                payload_type: int = TYPE_SIP, capture_id: int = 0, auth_key: bytes = b"",
                correlation_id: bytes = b"", node_name: bytes = b"") -> bytes:
    """One HEPv3 packet. ``src``/``dst`` are (IP literal, port); an IPv4 and an IPv6 end are
    both written as IPv6 (the v4 one mapped). Raises :class:`HepError` on what cannot be encoded."""
    s, d = ip_bytes(src[0]), ip_bytes(dst[0])
    if len(s) != len(d):
        s, d = (s if len(s) == 16 else b"\0" * 10 + b"\xff\xff" + s), \
               (d if len(d) == 16 else b"\0" * 10 + b"\xff\xff" + d)
    sec = int(ts)
    usec = int(round((ts - sec) * 1e6))
    if usec >= 1_000_000:
        sec, usec = sec + 1, usec - 1_000_000
    tail = []
    if correlation_id:
        tail.append(_CHUNK.pack(0, 17, 6 + len(correlation_id)) + correlation_id)
    if auth_key:
        tail.append(_CHUNK.pack(0, 14, 6 + len(auth_key)) + auth_key)
    tail.append(_CHUNK.pack(0, 15, 6 + len(payload)) + payload)
    if node_name:
        tail.append(_CHUNK.pack(0, 19, 6 + len(node_name)) + node_name)
    v4 = len(s) == 4
    fixed = _FIXED4 if v4 else _FIXED6
    total = fixed.size + sum(map(len, tail))
    if total > MAX_HEP:
        raise HepError(f"HEP packet of {total} bytes (at most {MAX_HEP})")
    try:
        head = fixed.pack(
            HEP3, total,
            0, 1, 7, AF_INET if v4 else AF_INET6,
            0, 2, 7, proto,
            0, 3 if v4 else 5, 6 + len(s), s,
            0, 4 if v4 else 6, 6 + len(d), d,
            0, 7, 8, src[1],
            0, 8, 8, dst[1],
            0, 9, 10, sec,
            0, 10, 10, usec,
            0, 11, 7, payload_type,
            0, 12, 10, capture_id)
    except struct.error as exc:
        raise HepError(str(exc)) from None
    return head + b"".join(tail)


_TIME_TYPE_ID = struct.Struct(">HHHI" "HHHI" "HHHB" "HHHI")
_LEN = struct.Struct(">H")


class Hep3Encoder:
    """:func:`encode_hep3` for a sender whose capture id, auth key and node name are fixed: the
    address and port chunks are packed once per (source, destination, protocol) and kept (at most
    ``cache_max`` pairs), so a packet costs one call of the C assembly (``sipwatch._hepenc``, the
    same bytes), or one small ``struct.pack`` and a join without it."""

    def __init__(self, capture_id: int = 0, auth_key: bytes = b"", node_name: bytes = b"",
                 cache_max: int = 4096):
        self.capture_id = capture_id
        self.auth = _CHUNK.pack(0, 14, 6 + len(auth_key)) + auth_key if auth_key else b""
        self.node = _CHUNK.pack(0, 19, 6 + len(node_name)) + node_name if node_name else b""
        self.cache: dict = {}
        self.cache_max = cache_max

    def _addresses(self, src: tuple, dst: tuple, proto: int) -> bytes:
        key = (src, dst, proto)
        head = self.cache.get(key)
        if head is None:
            # the fixed part of encode_hep3 without its first 6 bytes and time/type/id chunks
            full = encode_hep3(b"", src, dst, 0.0, proto=proto)
            head = full[6:len(full) - _TIME_TYPE_ID.size - 6]  # 6: the empty payload chunk
            if len(self.cache) >= self.cache_max:
                self.cache.clear()
            self.cache[key] = head
        return head

    def encode(self, payload: bytes, src: tuple, dst: tuple, ts: float, proto: int = PROTO_UDP,
               payload_type: int = TYPE_SIP, correlation_id: bytes = b"") -> bytes:
        """The same bytes as ``encode_hep3`` with this encoder's capture id, key and node name."""
        head = self._addresses(src, dst, proto)
        if _hepenc is not None:
            packet = _hepenc.encode(head, payload, ts, payload_type, self.capture_id, correlation_id,
                                    self.auth, self.node)
            if packet is None:
                raise HepError(f"cannot encode a HEP packet of a {len(payload)}-byte payload at {ts!r} "
                               f"(type {payload_type}, capture id {self.capture_id})")
            return packet
        return self._encode_py(head, payload, ts, payload_type, correlation_id)

    def _encode_py(self, head: bytes, payload: bytes, ts: float, payload_type: int,
                   correlation_id: bytes) -> bytes:
        """:meth:`encode` without the C extension (and its reference in tests)."""
        sec = int(ts)
        usec = int(round((ts - sec) * 1e6))
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        try:
            mid = _TIME_TYPE_ID.pack(0, 9, 10, sec, 0, 10, 10, usec, 0, 11, 7, payload_type,
                                     0, 12, 10, self.capture_id)
        except struct.error as exc:
            raise HepError(str(exc)) from None
        corr = _CHUNK.pack(0, 17, 6 + len(correlation_id)) + correlation_id if correlation_id else b""
        total = 6 + len(head) + len(mid) + len(corr) + len(self.auth) + 6 + len(payload) + len(self.node)
        if total > MAX_HEP:
            raise HepError(f"HEP packet of {total} bytes (at most {MAX_HEP})")
        return b"".join((HEP3, _LEN.pack(total), head, mid, corr, self.auth,
                         _CHUNK.pack(0, 15, 6 + len(payload)), payload, self.node))


def decode_hep(data: bytes) -> HepPacket | None:
    """The packet in ``data``, or None if it is not a usable HEP packet (see :func:`parse_hep`)."""
    r = parse_hep(data)
    return r if type(r) is HepPacket else None


def parse_hep(data: bytes, auth_key: bytes = b"") -> HepPacket | str:
    """A :class:`HepPacket`, or the reason (one of :data:`REASONS`) ``data`` is none. Never raises.

    With ``auth_key``, a packet without that key (compared in constant time; HEP v1/v2 have none)
    is ``auth``, found before its payload is inflated: work a forged packet makes is bounded by
    its own bytes."""
    try:
        if data[:4] == HEP3:
            return _parse_v3(data, auth_key)
        if data[:1] in (b"\x01", b"\x02"):
            return "auth" if auth_key else _parse_v2(data)
        return "not_hep" if len(data) >= 4 else "truncated"
    except Exception:  # noqa: BLE001  (a bug must not escape into a datagram handler)
        return "bad_chunk"


def _ip_text(raw: bytes) -> str | None:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return None


def _parse_v3(data: bytes, auth_key: bytes = b"") -> HepPacket | str:
    n = len(data)
    if n < 6:
        return "truncated"
    if int.from_bytes(data[4:6], "big") != n:
        return "bad_length"
    family = proto = sport = dport = sec = None
    usec, ptype, capture_id = 0, TYPE_SIP, 0
    src = dst = auth = corr = node = payload = None
    compressed = False
    unpack, off, chunks = _CHUNK.unpack_from, 6, 0
    while off < n:
        if n - off < 6:
            return "bad_chunk"
        vendor, ctype, clen = unpack(data, off)
        end = off + clen
        chunks += 1
        if clen < 6 or end > n or chunks > MAX_CHUNKS:
            return "bad_chunk"
        if vendor == 0:
            size = clen - 6
            if ctype in (1, 2, 11):
                if size != 1:
                    return "bad_chunk"
                v = data[off + 6]
                if ctype == 1:
                    family = v
                elif ctype == 2:
                    proto = v
                else:
                    ptype = v
            elif ctype in (3, 4):
                if size != 4:
                    return "bad_chunk"
                if ctype == 3:
                    src = data[off + 6:end]
                else:
                    dst = data[off + 6:end]
            elif ctype in (5, 6):
                if size != 16:
                    return "bad_chunk"
                if ctype == 5:
                    src = data[off + 6:end]
                else:
                    dst = data[off + 6:end]
            elif ctype in (7, 8):
                if size != 2:
                    return "bad_chunk"
                v = int.from_bytes(data[off + 6:end], "big")
                if ctype == 7:
                    sport = v
                else:
                    dport = v
            elif ctype in (9, 10):
                if size != 4:
                    return "bad_chunk"
                v = int.from_bytes(data[off + 6:end], "big")
                if ctype == 9:
                    sec = v
                else:
                    usec = v
            elif ctype == 12:
                if size not in (2, 4):  # old agents wrote 2 bytes; read both
                    return "bad_chunk"
                capture_id = int.from_bytes(data[off + 6:end], "big")
            elif ctype == 14:
                auth = data[off + 6:end]
            elif ctype in (15, 16):
                if payload is not None:  # one payload a packet (each would have been inflated)
                    return "bad_chunk"
                payload, compressed = data[off + 6:end], ctype == 16
            elif ctype in (17, 19):
                if size > MAX_CORRELATION_ID:
                    return "bad_chunk"
                if ctype == 17:
                    corr = data[off + 6:end]
                else:
                    node = data[off + 6:end]
            elif ctype == 0:
                return "bad_chunk"
        off = end
    if payload is None or src is None or dst is None or sport is None or dport is None \
            or sec is None:
        return "missing_chunk"
    if len(src) != len(dst) or (family is not None and family != (AF_INET if len(src) == 4 else AF_INET6)):
        return "bad_address"
    if usec >= 1_000_000:
        return "bad_chunk"
    if auth_key and (auth is None or not hmac.compare_digest(auth, auth_key)):
        return "auth"
    if compressed:
        payload = _inflate(payload)
        if payload is None:
            return "bad_payload"
    return HepPacket(3, 4 if len(src) == 4 else 6, PROTO_UDP if proto is None else proto,
                     (_ip_text(src), sport), (_ip_text(dst), dport), sec, usec, ptype, capture_id,
                     auth, corr, node, payload)


def _parse_v2(data: bytes) -> HepPacket | str:
    n = len(data)
    if n < 8:
        return "truncated"
    version, _hlen, family, proto = data[0], data[1], data[2], data[3]
    sport = int.from_bytes(data[4:6], "big")
    dport = int.from_bytes(data[6:8], "big")
    if family == AF_INET:
        alen = 4
    elif family == AF_INET6:
        alen = 16
    else:
        return "bad_address"
    off = 8 + 2 * alen
    sec = usec = capture_id = 0
    if version == 2:
        if n < off + 12:
            return "truncated"
        sec, usec, capture_id = _V2_TIME.unpack_from(data, off)
        off += 12
        if usec >= 1_000_000:
            return "bad_chunk"
    if n < off:
        return "truncated"
    src, dst = data[8:8 + alen], data[8 + alen:8 + 2 * alen]
    return HepPacket(version, 4 if alen == 4 else 6, proto, (_ip_text(src), sport),
                     (_ip_text(dst), dport), sec, usec, TYPE_SIP, capture_id, None, None, None,
                     data[off:])


def _inflate(raw: bytes) -> bytes | None:
    """A zlib payload inflated to at most MAX_PAYLOAD bytes and INFLATE_RATIO times its own
    size (past INFLATE_FLOOR), or None (corrupt or larger)."""
    try:
        d = zlib.decompressobj()
        out = d.decompress(raw, min(MAX_PAYLOAD, max(INFLATE_FLOOR, INFLATE_RATIO * len(raw))))
        if d.unconsumed_tail or not d.eof:
            return None
        return out
    except zlib.error:
        return None


def hep3_frame_length(head: bytes) -> int | None:
    """For a HEP-over-TCP stream: the length of the packet whose first 6 bytes are ``head``,
    or None if they are not a HEPv3 header (the stream is then not HEP and is closed)."""
    if len(head) < 6 or head[:4] != HEP3:
        return None
    n = int.from_bytes(head[4:6], "big")
    return n if n >= 6 else None


__all__ = ["HepPacket", "HepError", "Hep3Encoder", "encode_hep3", "decode_hep", "parse_hep", "hep3_frame_length",
           "REASONS", "TYPE_SIP", "TYPE_RTCP_JSON", "TYPE_LOG", "PROTO_UDP", "PROTO_TCP"]
