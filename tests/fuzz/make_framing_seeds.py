"""Write the framer's fuzz seeds (tests/fuzz/framing_seeds): real SIP streams and the faults a
hostile peer sends. Each seed is one cut byte (see framing_target._cuts) and the stream.

    python tests/fuzz/make_framing_seeds.py tests/fuzz/framing_seeds
"""
from __future__ import annotations

import sys
from pathlib import Path

INVITE = (b"INVITE sip:b@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5061;branch=z9hG4bK1\r\n"
          b"From: <sip:a@x>;tag=1\r\nTo: <sip:b@y>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n"
          b"Content-Type: application/sdp\r\nContent-Length: 13\r\n\r\nv=0\r\no=- 1 1\r\n")
OK = (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 127.0.0.1:5061;branch=z9hG4bK1\r\nFrom: <sip:a@x>;tag=1\r\n"
      b"To: <sip:b@y>;tag=2\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nl: 0\r\n\r\n")

SEEDS = {
    "two_messages_whole": b"\xff" + INVITE + OK,
    "byte_at_a_time": b"\x00" + INVITE + OK,
    "pings_between": b"\x05" + b"\r\n\r\n" + INVITE + b"\r\n\r\n\r\n" + OK + b"\r\n",
    "bare_lf": b"\x40" + INVITE.replace(b"\r\n", b"\n"),
    "no_content_length": b"\x40" + OK.replace(b"l: 0\r\n", b""),
    "two_content_lengths": b"\x40" + OK.replace(b"l: 0\r\n", b"l: 0\r\nContent-Length: 0\r\n"),
    "huge_content_length": b"\x40" + OK.replace(b"l: 0", b"l: 99999999999"),
    "not_sip": b"\x40" + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "endless_header": b"\x41" + b"OPTIONS sip:x SIP/2.0\r\n" + b"X: y\r\n" * 400,
    "body_split": b"\x02" + INVITE[:-5] + INVITE[-5:] + OK,
}


def main(out: str) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    for name, data in SEEDS.items():
        (d / f"{name}.bin").write_bytes(data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent / "framing_seeds"))
