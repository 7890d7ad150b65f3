"""Write the capture fuzz seeds into tests/fuzz/capture_seeds/ from the captures in pcaps/ (run
from the repository root: python -m tests.fuzz.make_capture_seeds): small captures whole (mode
0), and the frames of the tunnelled ones, of a SIP-over-TCP call and of a call with RTP, in a
classic pcap (mode 1) and a pcapng (mode 2). Layout: tests/fuzz/capture_target.py."""
from __future__ import annotations

import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))

from capture_target import LINKTYPES, pcapng_file  # noqa: E402

OUT = Path(__file__).resolve().parent / "capture_seeds"
WHOLE = ["callee_bye", "cancel_487", "options_keepalive", "register_401", "reinvite", "tcp_call",
         "tap/sip_keepalives"]
FRAMES = ["tap/tap_erspan2", "tap/tap_erspan3", "tap/tap_geneve", "tap/tap_gre", "tap/tap_gtpu",
          "tap/tap_ip_in_ipv6", "tap/tap_ipv6_in_ipv4", "tap/tap_l2tp", "tap/tap_mpls_pw",
          "tap/tap_pppoe", "tcp_call"]


def records(raw: bytes) -> tuple[int, list[bytes]]:
    """A little-endian classic pcap's link type and frames."""
    assert raw[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"), "little-endian pcap expected"
    lt = struct.unpack_from("<I", raw, 20)[0]
    out, off = [], 24
    while off + 16 <= len(raw):
        incl = struct.unpack_from("<I", raw, off + 8)[0]
        out.append(raw[off + 16:off + 16 + incl])
        off += 16 + incl
    return lt, out


def framed(mode: int, lt: int, frames: list[bytes], limit: int = 12) -> bytes:
    body = b"".join(struct.pack("<H", len(f)) + f for f in frames[:limit])
    return bytes([mode, LINKTYPES.index(lt)]) + body


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name in WHOLE:
        (OUT / f"whole_{Path(name).name}.bin").write_bytes(b"\0" + (ROOT / "pcaps" / f"{name}.pcap").read_bytes())
    for name in FRAMES:
        lt, frames = records((ROOT / "pcaps" / f"{name}.pcap").read_bytes())
        (OUT / f"pcap_{Path(name).name}.bin").write_bytes(framed(1, lt, frames))
    lt, frames = records((ROOT / "pcaps" / "rtp_loss_jitter.pcap").read_bytes())
    (OUT / "pcap_rtp.bin").write_bytes(framed(1, lt, frames, 40))
    lt, frames = records((ROOT / "pcaps" / "tcp_call.pcap").read_bytes())
    (OUT / "pcapng_tcp_call.bin").write_bytes(framed(2, lt, frames))
    # whole pcapng files too, so that mutations reach its block structure
    (OUT / "whole_pcapng_tcp_call.bin").write_bytes(b"\0" + pcapng_file(lt, 9, frames[:12]))
    raw = (ROOT / "pcaps" / "callee_bye.pcap").read_bytes()
    be = b"\xa1\xb2\x3c\x4d" + b"".join(struct.pack(">" + f, *struct.unpack_from("<" + f, raw, o))
                                       for f, o in (("HHiIII", 4),))
    lt, frames = records(raw)
    recs = b"".join(struct.pack(">IIII", 1_700_000_000, i * 1000, len(f), len(f)) + f for i, f in enumerate(frames))
    (OUT / "whole_big_endian_ns.bin").write_bytes(b"\0" + be + recs)


if __name__ == "__main__":
    main()
