"""Writes the HEP fuzz seeds: packets as Kamailio, sngrep and old agents send them, built from
the format here (``python tests/fuzz/make_hep_seeds.py tests/fuzz/hep_seeds``)."""
from __future__ import annotations

import socket
import struct
import sys
import zlib
from pathlib import Path

SIP = (b"INVITE sip:bob@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1\r\n"
       b"From: <sip:alice@10.0.0.1>;tag=1\r\nTo: <sip:bob@10.0.0.2>\r\nCall-ID: seed-1@10.0.0.1\r\n"
       b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")


def chunk(t: int, v: bytes, vendor: int = 0) -> bytes:
    return struct.pack(">HHH", vendor, t, 6 + len(v)) + v


def hep3(*cs: bytes) -> bytes:
    body = b"".join(cs)
    return b"HEP3" + struct.pack(">H", 6 + len(body)) + body


def v3(family=socket.AF_INET, src="10.0.0.1", dst="10.0.0.2", payload_chunk=None, extra=(), ptype=1):
    af = 2 if family == socket.AF_INET else 10
    return hep3(chunk(1, bytes([af])), chunk(2, b"\x11"),
                chunk(3 if af == 2 else 5, socket.inet_pton(family, src)),
                chunk(4 if af == 2 else 6, socket.inet_pton(family, dst)),
                chunk(7, struct.pack(">H", 5060)), chunk(8, struct.pack(">H", 5080)),
                chunk(9, struct.pack(">I", 1700000000)), chunk(10, struct.pack(">I", 123456)),
                chunk(11, bytes([ptype])), chunk(12, struct.pack(">I", 2001)), *extra,
                payload_chunk or chunk(15, SIP))


def main(out: str) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    seeds = {
        "kamailio_v3": v3(extra=(chunk(17, b"seed-1@10.0.0.1"),)),
        "auth_node": v3(extra=(chunk(17, b"seed-1@10.0.0.1"), chunk(14, b"k"), chunk(19, b"node"))),
        "ipv6": v3(socket.AF_INET6, "2001:db8::1", "::1"),
        "compressed": v3(payload_chunk=chunk(16, zlib.compress(SIP))),
        "vendor_chunk": v3(extra=(chunk(7, b"xyz", vendor=0x0b),)),
        "log_type_100": v3(payload_chunk=chunk(15, b'{"event":"call_summary"}'), ptype=100),
        "rtcp_json": v3(extra=(chunk(17, b"seed-1@10.0.0.1"),), ptype=5, payload_chunk=chunk(
            15, b'{"type":200,"ssrc":1,"report_count":1,"sender_information":{"packets":5},'
                b'"report_blocks":[{"source_ssrc":2,"fraction_lost":3,"ia_jitter":4,"packets_lost":5}]}')),
        "v2": struct.pack(">BBBBHH", 2, 28, 2, 17, 5060, 5080) + socket.inet_aton("10.0.0.1")
        + socket.inet_aton("10.0.0.2") + struct.pack("<IIHH", 1700000000, 5, 7, 0) + SIP,
        "v1": struct.pack(">BBBBHH", 1, 16, 2, 17, 5060, 5080) + socket.inet_aton("10.0.0.1")
        + socket.inet_aton("10.0.0.2") + SIP,
    }
    for name, data in seeds.items():
        (d / f"{name}.bin").write_bytes(data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fuzz/hep_seeds")
