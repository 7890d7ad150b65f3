"""One fuzz input -> a capture file -> the capture reader, the analysis and its report.

A capture is network bytes written down, and ``sipwatch capture`` feeds the same decoder from a
live interface: every header in it may be forged. The input becomes a file one of three ways
(its first byte says which):

- 0: the rest is the file, as is (the seeds are real captures: the fuzzer mutates their headers);
- 1: the rest is frames (2-byte little-endian length, then the frame), written into a classic
  pcap of the link type the second byte picks;
- 2: the same frames in a pcapng file (interface block with a time resolution, packet blocks).

Properties (an AssertionError names the one that broke; anything raised is a finding too):
- ``read_packets`` yields only well-formed packets (UDP or TCP, ports 0..65535, addresses that
  parse, a payload no larger than the file, or than ``max_sip_message`` over TCP), counts only
  non-negative integers, or raises ``PcapError`` for a file that is no capture at all;
- an Ethernet pcap gives the same packets and counters through the reader's fast path as frame
  by frame through ``Decoder.frame`` (the path every other link type and the live capture take);
- ``analyse`` then ``render`` and the JSON encoding of the report never raise, and no packet
  reached an internal error (which ``analyse`` would count and skip).
"""
from __future__ import annotations

import ipaddress
import os
import struct
import tempfile

import orjson

from capture.analyze import analyse, render
from capture.pcapfile import LT_ETHERNET, MAX_UNDECODED_TYPES, Decoder, PcapError, read_packets

LINKTYPES = (1, 113, 276, 101, 228, 229, 0, 108, 9, 50, 51, 104, 12, 14)
MAX_SIP = 4096  # a small --max-sip-message, so the fuzzer can reach past it
_u16le = struct.Struct("<H").unpack_from
_PATH = os.path.join(tempfile.gettempdir(), f"sipwatch-fuzz-capture-{os.getpid()}.pcap")


def frames_of(body: bytes) -> list[bytes]:
    out, off = [], 0
    while off + 2 <= len(body):
        n = _u16le(body, off)[0]
        out.append(body[off + 2:off + 2 + n])
        off += 2 + n
    return out


def pcap_file(linktype: int, frames: list[bytes]) -> bytes:
    parts = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)]
    for i, f in enumerate(frames):
        parts.append(struct.pack("<IIII", 1_700_000_000 + i // 50, (i % 50) * 20_000, len(f), len(f)))
        parts.append(f)
    return b"".join(parts)


def pcapng_file(linktype: int, tsresol: int, frames: list[bytes]) -> bytes:
    def block(btype: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)
        return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)

    parts = [block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)),
             block(1, struct.pack("<HHI", linktype, 0, 65535)
                   + struct.pack("<HHB3x", 9, 1, tsresol) + struct.pack("<HH", 0, 0))]
    for i, f in enumerate(frames):
        t = 1_700_000_000_000_000 + i * 20_000
        parts.append(block(6, struct.pack("<IIIII", 0, t >> 32, t & 0xFFFFFFFF, len(f), len(f)) + f))
    return b"".join(parts)


def capture_file(data: bytes) -> tuple[bytes, int | None]:
    """The file an input stands for, and the link type when the input was frames."""
    mode = data[0] % 3 if data else 0
    if mode == 0 or len(data) < 2:
        return data[1:], None
    lt = LINKTYPES[data[1] % len(LINKTYPES)]
    frames = frames_of(data[2:])
    if mode == 1:
        return pcap_file(lt, frames), lt
    return pcapng_file(lt, data[1] >> 4 if data[1] & 8 else 6, frames), lt


def _check_counters(c: dict) -> None:
    for k, v in c.items():
        if isinstance(v, dict):
            assert len(v) <= MAX_UNDECODED_TYPES + 1 or k != "undecoded_types", f"{k}: {len(v)} types"
            for kk, vv in v.items():
                assert type(vv) is int and vv >= 0, f"counter {k}[{kk}] = {vv!r}"
        else:
            assert type(v) is int and v >= 0, f"counter {k} = {v!r}"


def _check_packet(p, size: int) -> None:
    ts, src, dst, transport, payload = p
    assert transport in ("udp", "tcp"), f"transport {transport!r}"
    assert isinstance(ts, float), f"timestamp {ts!r}"
    for ip, port in (src, dst):
        assert 0 <= port <= 65535, f"port {port}"
        ipaddress.ip_address(ip)
    assert len(payload) <= size, f"a {len(payload)}-byte payload out of a {size}-byte file"
    if transport == "tcp":
        assert len(payload) <= MAX_SIP, f"a {len(payload)}-byte message over TCP past the cap"


def _frame_by_frame(raw: bytes) -> tuple[list, dict]:
    """An Ethernet pcap's records through Decoder.frame, as the generic reader does."""
    c: dict = {"frames": 0}
    dec, out, off = Decoder(c, MAX_SIP), [], 24
    end = "<" if raw[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    div = 10**9 if raw[:4] in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 10**6
    while off + 16 <= len(raw):
        sec, frac, incl, _ = struct.unpack_from(end + "IIII", raw, off)
        off += 16
        if off + incl > len(raw):
            c["truncated"] = c.get("truncated", 0) + 1
            break
        c["frames"] += 1
        out += dec.frame(LT_ETHERNET, raw[off:off + incl], (sec * div + frac) / div)
        off += incl
    else:
        if off != len(raw):
            c["truncated"] = c.get("truncated", 0) + 1
    if dec.last_ts is not None:  # the end of the capture: holes still open are given up
        out += dec.flush(dec.last_ts)
    return out, c


def _plain(pkts) -> list:
    return [(p[0], p[1], p[2], p[3], bytes(p[4])) for p in pkts]


def run_one_capture(data: bytes) -> None:
    raw, _ = capture_file(data)
    with open(_PATH, "wb") as f:
        f.write(raw)
    try:
        _run(raw)
    finally:  # (per input: libFuzzer ends the process without atexit handlers)
        os.remove(_PATH)


def _run(raw: bytes) -> None:
    counters: dict = {}
    try:
        pkts = _plain(read_packets(_PATH, counters, MAX_SIP))
    except PcapError:
        try:
            analyse(_PATH)
        except PcapError:
            return
        raise AssertionError("read_packets refused the file, analyse did not") from None
    for p in pkts:
        _check_packet(p, len(raw))
    _check_counters(counters)
    is_pcap = raw[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d")
    if is_pcap and len(raw) >= 24:
        end = "<" if raw[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        if struct.unpack_from(end + "I", raw, 20)[0] & 0x0FFFFFFF == LT_ETHERNET:
            slow, c2 = _frame_by_frame(raw)
            assert _plain(slow) == pkts, "the Ethernet fast path and Decoder.frame give different packets"
            assert c2 == counters, f"the fast path counted {counters}, Decoder.frame {c2}"
    rep = analyse(_PATH, max_sip_message=MAX_SIP)
    assert rep["decoded_packets"] == len(pkts), "analyse decoded another number of packets"
    # (analyse skips and counts a packet that reaches a bug, so that the report survives it)
    assert "internal_errors" not in rep["capture_counters"], rep["capture_counters"].get("internal_error_first")
    assert isinstance(render(rep), str)
    orjson.dumps(rep, default=str, option=orjson.OPT_NON_STR_KEYS)
