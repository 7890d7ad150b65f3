"""Folded header lines (RFC 3261 §7.3.1) are unfolded in one regular-expression pass. The
expression once began a match at every blank of a long run that no line end follows, so one
folded line plus a 60-KB run of spaces elsewhere in the head cost the proxy ~18 s of CPU for one
datagram (and `capture --hep-listen` as much per HEP packet). The C header scan declines folded
messages, so every path that reads SIP reached it.

What is asserted: the unfolding is the same as the plain expression's on random heads, and the
hostile shapes cost, all together, less CPU than one of them cost before (a limit on the child's
CPU seconds, far above the milliseconds they take now: a guard that cannot trip on a loaded
machine, as it counts CPU, not elapsed time)."""
from __future__ import annotations

import random
import re
import resource
import subprocess
import sys
import textwrap

from sipwatch import sipmsg

PLAIN_FOLD = re.compile(rb"[ \t]*\r?\n[ \t]+")  # the RFC's rule written plainly (n^2 on long runs)


def test_unfolding_is_the_plain_rule():
    rng = random.Random(7)
    alphabet = [b" ", b"\t", b"\r\n", b"\n", b"a", b":", b"  ", b"\r\n ", b"\n\t"]
    for _ in range(5000):
        head = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        assert sipmsg._FOLD.sub(b" ", head) == PLAIN_FOLD.sub(b" ", head), head


def test_a_fold_in_a_message_is_read_as_one_line():
    m = sipmsg.parse(b"OPTIONS sip:b@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1\r\n"
                     b"Subject: one  \r\n \t two\r\nX-Pad: a" + b" " * 3000 + b"b\r\nCall-ID: c\r\n"
                     b"CSeq: 1 OPTIONS\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nContent-Length: 0\r\n\r\n")
    assert m.get(b"subject") == b"one two"
    assert m.get(b"x-pad") == b"a" + b" " * 3000 + b"b"


CHILD = textwrap.dedent("""
    import resource, sys
    from sipwatch.core import CoreConfig, ProxyCore
    from sipwatch.observer import Observer
    from capture.hep_listen import HepReceiver
    from sipwatch.hep import encode_hep3
    gw, up = ("10.0.0.1", 5060), ("127.0.0.2", 5090)
    core = ProxyCore(CoreConfig(advertise=("127.0.0.1", 5060), upstream=up))
    obs = Observer()
    rx = HepReceiver(obs.feed)
    forwarded = 0
    for blank in (b" ", b"\\t"):
        for first in (b"INVITE sip:bob@10.0.0.2 SIP/2.0", b"SIP/2.0 180 Ringing"):
            msg = (first + b"\\r\\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabc\\r\\n"
                   b"From: <sip:a@x>;tag=1\\r\\nTo: <sip:b@y>\\r\\nCall-ID: c1\\r\\nCSeq: 1 INVITE\\r\\n"
                   b"Subject: x\\r\\n y\\r\\nX-Pad: a" + blank * 60000 + b"b\\r\\nContent-Length: 0\\r\\n\\r\\n")
            forwarded += len(core.receive_datagram(msg, gw, 1.0)) + len(core.receive_datagram(msg, up, 1.0))
            obs.feed(msg, gw, up, 1.0)
            rx.packet(encode_hep3(msg[:65000], gw, up, 1.0))
    used = resource.getrusage(resource.RUSAGE_SELF)
    print(forwarded, used.ru_utime + used.ru_stime)
""")


def test_long_blank_runs_beside_a_fold_cost_little():
    def limit():
        resource.setrlimit(resource.RLIMIT_CPU, (30, 30))  # (before: ~18 s for each of 16 reads)

    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, preexec_fn=limit,
                       timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # SIGXCPU: the limit was reached
    forwarded = int(r.stdout.split()[0])
    assert forwarded >= 2  # the INVITEs went upstream: the hostile head is still a message
