"""Mutations of real SIP messages for the live fuzz test (tests/test_fuzz_live.py).

Two families, so that SIPp's call counts stay a fair judge of the sidecar:

- ``ooc``: out-of-dialog OPTIONS/INFO/NOTIFY/UPDATE with a fresh Call-ID, mutated in every way
  except their method token. A sidecar may forward what is still valid; the callee (SIPp with
  ``-aa``) answers such requests 200 automatically without counting a call as failed.
- ``must_drop``: INVITEs (fresh Call-ID) carrying a defect that issue 8 says must not be
  forwarded (NUL or control bytes in the header section, a line without colon, conflicting or
  too long Content-Length, CSeq out of range, more Vias than any real path). Forwarding one
  makes the callee start a call nobody completes, and SIPp counts it as failed.
- ``forged``: responses that claim the sidecar's Via (any branch with its prefix) and name a
  victim as the next hop; no genuine transaction matches, so none may be relayed.

Every family also aims at the victim: forged ``received``/``rport``, Route and Contact entries.
"""
from __future__ import annotations

import random
import re

_NUM = re.compile(rb"\d+")


def lines_of(msg: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = msg.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def join(lines: list[bytes], body: bytes) -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def set_header(lines: list[bytes], name: bytes, value: bytes) -> None:
    low = name.lower() + b":"
    for i, ln in enumerate(lines):
        if ln.lower().startswith(low):
            lines[i] = name + b": " + value
            return
    lines.insert(1, name + b": " + value)


class Mutator:
    def __init__(self, seed: int, options: bytes, invite: bytes, responses: list[bytes],
                 sidecar: tuple[str, int], victim: tuple[str, int], sender: tuple[str, int]):
        self.r = random.Random(seed)
        self.options, self.invite, self.responses = options, invite, responses
        self.sidecar = b"%s:%d" % (sidecar[0].encode(), sidecar[1])
        self.victim = victim
        self.vhost = victim[0].encode()
        self.vport = victim[1]
        self.sender = b"%s:%d" % (sender[0].encode(), sender[1])
        self.n = 0
        self.kinds: dict[str, int] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _fresh(self, msg: bytes, method: bytes | None = None) -> tuple[list[bytes], bytes]:
        self.n += 1
        lines, body = lines_of(msg)
        if method is not None:
            first = lines[0].split(b" ", 1)
            lines[0] = method + b" " + first[1]
            for i, ln in enumerate(lines):
                if ln.lower().startswith(b"cseq:"):
                    lines[i] = b"CSeq: %d %s" % (self.r.randint(1, 9999), method)
        set_header(lines, b"Call-ID", b"fz-%d-%08x@127.0.0.1" % (self.n, self.r.getrandbits(32)))
        for i, ln in enumerate(lines):
            if ln.lower().startswith(b"via:"):
                lines[i] = b"Via: SIP/2.0/UDP %s;branch=z9hG4bK-fz%d;rport" % (self.sender, self.n)
                break
        return lines, body

    def _size(self, usual: tuple, huge: tuple) -> int:
        """A flood size: one in ten is huge (20-64 KB datagrams, a few per second at 300/s), so
        the big shapes are exercised without the run becoming a bandwidth test."""
        if self.r.random() < 0.1:
            self._count("huge_flood")
            return self.r.choice(huge)
        return self.r.choice(usual)

    def _count(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    # -- families --------------------------------------------------------------------------
    def next(self) -> bytes:
        x = self.r.random()
        if x < 0.70:
            return self.ooc()
        if x < 0.85:
            return self.must_drop()
        return self.forged()

    def ooc(self) -> bytes:
        r = self.r
        method = r.choice((b"OPTIONS", b"OPTIONS", b"INFO", b"NOTIFY", b"UPDATE"))
        lines, body = self._fresh(self.options, method)
        if r.random() < 0.3:  # give it the INVITE's SDP, so bodies are checked too
            body = lines_of(self.invite)[1]
            set_header(lines, b"Content-Type", b"application/sdp")
            set_header(lines, b"Content-Length", b"%d" % len(body))
        kind = r.choice(("flip", "flip", "dup", "remove", "reorder", "huge", "nul", "cl_conflict",
                         "cl_short", "cl_long", "bare_lf", "via_flood", "route_flood", "forge_via",
                         "victim_uris", "fold_flood", "tiny_headers", "comma_flood", "nesting",
                         "non_utf8", "plain"))
        self._count("ooc_" + kind)
        first, rest = lines[0], lines[1:]
        if kind == "flip":
            msg = bytearray(join(lines, body))
            start = len(method) + 1
            for _ in range(r.randint(1, 8)):
                i = r.randrange(start, len(msg))
                msg[i] = r.randrange(256)
            return bytes(msg)
        if kind == "dup":
            for _ in range(r.randint(1, 3)):
                i = r.randrange(len(rest))
                rest.insert(i, rest[i])
        elif kind == "remove":
            del rest[r.randrange(len(rest))]
        elif kind == "reorder":
            r.shuffle(rest)
        elif kind == "huge":
            i = r.randrange(len(rest))
            big = r.choice((b"18446744073709551616", b"2147483648", b"99999999999999999999999", b"4294967296"))
            rest[i] = _NUM.sub(big, rest[i], count=1)
        elif kind == "nul":
            i = r.randrange(len(rest))
            j = r.randrange(len(rest[i]) + 1)
            rest[i] = rest[i][:j] + r.choice((b"\x00", b"\x01", b"\x7f", b"\x1b", b"\r")) + rest[i][j:]
        elif kind == "cl_conflict":
            rest.append(b"Content-Length: %d" % (len(body) + r.randint(1, 5)))
        elif kind == "cl_short":
            set_header(rest, b"Content-Length", b"%d" % max(0, len(body) - r.randint(1, 10)))
        elif kind == "cl_long":
            set_header(rest, b"Content-Length", b"%d" % (len(body) + r.randint(1, 1000)))
        elif kind == "bare_lf":
            rest = [ln for ln in rest if not ln.lower().startswith(b"content-length")]
            return (b"\n".join([first, *rest]) + b"\n\n" + b"X-Injected: 1\r\n\r\nv=0\r\n" + body)
        elif kind == "via_flood":
            n = self._size((5, 60, 80), (300, 1000))
            rest.insert(1, b"Via: " + b", ".join(b"SIP/2.0/UDP 10.9.%d.%d:5060;branch=z9hG4bK%d"
                                                  % (k // 250, k % 250, k) for k in range(n)))
        elif kind == "route_flood":
            n = self._size((3, 50, 100), (1000, 2400))
            entry = b"<sip:" + self.sidecar + b";lr>"
            if r.random() < 0.5:
                rest.append(b"Route: " + b", ".join([entry] * n))
            else:
                rest.extend([b"Route: " + entry] * min(n, 1800))
        elif kind == "forge_via":
            v = next(k for k, ln in enumerate(rest) if ln.lower().startswith(b"via:"))
            rest[v] = (b"Via: SIP/2.0/UDP %s;branch=z9hG4bK-fz%d;received=%s;rport=%d"
                       % (self.sender, self.n, self.vhost, self.vport))
            if r.random() < 0.5:  # a sent-by naming the victim, no received/rport
                rest[v] = b"Via: SIP/2.0/UDP %s:%d;branch=z9hG4bK-fz%d" % (self.vhost, self.vport, self.n)
        elif kind == "victim_uris":
            v = b"%s:%d" % (self.vhost, self.vport)
            first = first.split(b" ")[0] + b" sip:victim@" + v + b" SIP/2.0"
            rest += [b"Route: <sip:" + self.sidecar + b";lr>, <sip:" + v + b";lr>",
                     b"Contact: <sip:victim@" + v + b">", b"Record-Route: <sip:" + v + b";lr>"]
        elif kind == "fold_flood":
            rest.append(b"Subject: x" + b"\r\n y" * self._size((10, 500), (3000,)))
        elif kind == "tiny_headers":
            rest.extend([b"a:b"] * self._size((10, 500), (5000,)))
        elif kind == "comma_flood":
            rest.append(b"Contact: <sip:x@127.0.0.1>" + b"," * self._size((10, 1000), (30000,)))
        elif kind == "nesting":
            n = self._size((10, 1000), (10000,))
            rest.append(b"Route: " + b"<" * n + b"sip:" + self.sidecar + b";lr" + b">" * n)
        elif kind == "non_utf8":
            rest.append(b"Subject: \xff\xfe\xc3\x28 caf\xe9")
        return join([first, *rest], body)

    def must_drop(self) -> bytes:
        r = self.r
        lines, body = self._fresh(self.invite)
        kind = r.choice(("nul", "ctl", "no_colon", "cl_conflict", "cl_long", "cseq_range", "via_count"))
        self._count("drop_" + kind)
        i = r.randrange(1, len(lines))
        if kind == "nul":
            lines[i] += b"\x00"
        elif kind == "ctl":
            lines[i] += r.choice((b"\x01", b"\x1b", b"\x7f", b"\x08"))
        elif kind == "no_colon":
            lines.insert(i, b"This line has no colon")
        elif kind == "cl_conflict":
            lines.append(b"Content-Length: %d" % (len(body) + 1))
        elif kind == "cl_long":
            set_header(lines, b"Content-Length", b"%d" % (len(body) + r.randint(1, 500)))
        elif kind == "cseq_range":
            set_header(lines, b"CSeq", r.choice((b"2147483648", b"18446744073709551616")) + b" INVITE")
        elif kind == "via_count":
            lines[1:1] = [b"Via: SIP/2.0/UDP 10.8.0.%d:5060;branch=z9hG4bKv%d" % (k % 250, k) for k in range(100)]
        return join(lines, body)

    def forged(self) -> bytes:
        r = self.r
        lines, body = lines_of(r.choice(self.responses))
        self._count("forged_response")
        lines = [ln for ln in lines if not ln.lower().startswith(b"via:")]
        branch = b"z9hG4bKsw%012x.%012x" % (r.getrandbits(48), r.getrandbits(48))
        nxt = r.choice((b"Via: SIP/2.0/UDP %s:%d;branch=z9hG4bKx;received=%s;rport=%d"
                        % (self.vhost, self.vport, self.vhost, self.vport),
                        b"Via: SIP/2.0/UDP %s:%d;branch=z9hG4bKx" % (self.vhost, self.vport),
                        b"Via: SIP/2.0/UDP [::1]:%d;branch=z9hG4bKx;rport=99999999999" % self.vport))
        lines[1:1] = [b"Via: SIP/2.0/UDP %s;branch=%s;rport" % (self.sidecar, branch), nxt]
        return join(lines, body)
