"""A small G.711 RTP sender with known, deliberate impairments, for recording fixtures.

SIPp starts it (``<exec command=...>``) right after the ACK, so the media lies inside the call.
It sends both directions of one call from the SDP ports themselves (``A -> B`` and ``B -> A``),
20 ms per packet, payload type 0 (PCMU, a 400 Hz tone). The A -> B direction can be impaired so
the capture holds a stream whose loss and jitter are known in advance:

* ``--drop-every N``: packets whose index ``i`` has ``i % N == N - 1`` are never sent (their
  sequence numbers are skipped, so a receiver sees exactly ``count // N`` lost packets);
* ``--delay-every M --delay-ms D``: packets with ``i % M == M - 1`` leave ``D`` ms late
  (``D`` < 20 keeps the order, so the loss count stays exact).

Usage: ``python rtpsend.py A_IP:PORT B_IP:PORT COUNT [--drop-every N] [--delay-every M
--delay-ms D] [--ssrc-base X]``.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import struct
import time

PTIME = 0.020
SAMPLES = 160  # 20 ms at 8000 Hz


def _ulaw(sample: int) -> int:
    """ITU-T G.711 mu-law encoding of one 16-bit linear sample."""
    bias, clip = 0x84, 32635
    sign = 0x80 if sample < 0 else 0
    sample = min(abs(sample), clip) + bias
    exponent = max(0, sample.bit_length() - 8)
    exponent = min(exponent, 7)
    mantissa = (sample >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def tone_frames(n: int, freq: float = 400.0) -> list[bytes]:
    return [bytes(_ulaw(int(8000 * math.sin(2 * math.pi * freq * (i * SAMPLES + j) / 8000)))
                  for j in range(SAMPLES)) for i in range(n)]


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("count", type=int)
    ap.add_argument("--drop-every", type=int, default=0)
    ap.add_argument("--delay-every", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--ssrc-base", type=lambda x: int(x, 0), default=None)
    args = ap.parse_args(argv)
    a, b = _addr(args.a), _addr(args.b)
    sa = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (sa, sb):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sa.bind(a)
    sb.bind(b)
    base = args.ssrc_base if args.ssrc_base is not None else int.from_bytes(os.urandom(4), "big")
    ssrc_ab, ssrc_ba = base & 0xFFFFFFFF, (base + 1) & 0xFFFFFFFF
    seq0_ab, seq0_ba = 1000, 5000
    frames = tone_frames(args.count)
    plan = []  # (send time offset, socket, dest, packet)
    for i in range(args.count):
        ts = i * SAMPLES
        marker = 0x80 if i == 0 else 0
        pay = frames[i]
        hdr_ba = struct.pack("!BBHII", 0x80, marker, (seq0_ba + i) & 0xFFFF, ts, ssrc_ba)
        plan.append((i * PTIME, sb, a, hdr_ba + pay))
        if args.drop_every and i % args.drop_every == args.drop_every - 1:
            continue
        late = args.delay_every and i % args.delay_every == args.delay_every - 1
        hdr_ab = struct.pack("!BBHII", 0x80, marker, (seq0_ab + i) & 0xFFFF, ts, ssrc_ab)
        plan.append((i * PTIME + (args.delay_ms / 1000.0 if late else 0.0), sa, b, hdr_ab + pay))
    plan.sort(key=lambda p: p[0])
    t0 = time.monotonic()
    for offset, sock, dest, pkt in plan:
        wait = t0 + offset - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        sock.sendto(pkt, dest)
    sa.close()
    sb.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
