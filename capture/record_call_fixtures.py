"""Record the call-state fixtures (issue "measurement truth": long ring, Call-ID reuse).

``python -m capture.record_call_fixtures OUTDIR [NAME ...]`` records them exactly like
:mod:`capture.record_fixtures` (real SIPp caller and callee on loopback, dumpcap capturing, facts
from tshark only) through a real sipwatch sidecar, in port blocks after that module's fixtures:

* ``long_ring``: the callee sends 100 and 180 at once and answers 40 s later, past Timer B
  (32 s): a call that must come out answered, not as a timeout with its 200 unmatched.
* ``register_then_call``: each Call-ID first registers (REGISTER/401, REGISTER/200), then places
  an INVITE on the same Call-ID: each must come out as one answered call.
"""
from __future__ import annotations

import sys

from capture.record_fixtures import FIXTURES as BASE_FIXTURES, Fixture, main as record_main, ports

RING_MS = 40_000

FIXTURES = [
    Fixture("long_ring", f"1 call through the sidecar: the callee sends 100 and 180 at once and answers "
            f"200 OK {RING_MS // 1000} s later (past Timer B, 32 s), ACK, BYE",
            "uac_call", "uas_long_ring", 1, rate=1,
            uac_args=("-d", "300", "-timeout", "90s"),
            uas_args=("-d", str(RING_MS), "-timeout", "90s"), sidecar=True,
            extra={"ring_ms": RING_MS}),
    Fixture("register_then_call", "2 Call-IDs through the sidecar, each used first by REGISTER/401, "
            "REGISTER/200, then by an INVITE (CSeq 3) answered 200, ACK, BYE",
            "uac_register_call", "uas_register_call", 2, rate=5, uac_args=("-d", "300"),
            sidecar=True),
]
FIRST_INDEX = len(BASE_FIXTURES)  # port blocks after record_fixtures' own
for _i, _fx in enumerate(FIXTURES):  # the callee's SDP names its block's media port
    _fx.uas_args = (*_fx.uas_args, "-set", "rtp_port", str(ports(FIRST_INDEX + _i)["uas_media"]))


def main(argv: list[str] | None = None) -> int:
    return record_main(argv, FIXTURES, FIRST_INDEX, "record_call_fixtures")


if __name__ == "__main__":
    sys.exit(main())
