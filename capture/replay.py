"""Replay a recorded SIP conversation through a running sidecar, playing both of its ends.

``sipwatch replay FILE --to HOST:PORT [--bind HOST:PORT] [--speed X] [--gateway IP[:PORT]]``

The capture's gateway side (``--gateway``, else the sender of the first SIP request) is played
from one UDP socket towards the sidecar at ``--to``; its peer, the signaling side, is played from
a second socket at ``--bind``, which must be the sidecar's upstream. Each recorded message is
sent when the message its sender last received in the same call (in the recording) has really
arrived, plus the recorded gap divided by ``--speed``; a message with nothing before it runs on
the capture's own clock. So a response leaves the signaling socket the recorded delay after its
request came through the sidecar, and the sidecar's RTTs reproduce the capture's (divided by the
speed), give or take loopback and scheduling time.

The replayer measures its own timing errors instead of assuming punctual timers: each message's
send lateness (actual send − scheduled time), and per transaction the two intervals its sockets
see (``inner_ms``: first request copy received → response sent, on the answering socket;
``outer_ms``: first request copy sent → response received, on the asking socket). Any RTT a
proxy between the sockets measures lies between the two, however loaded the machine is; see
:meth:`Replayer.summary`.

SIP over TCP in the capture is replayed over TCP (``--transport auto``, the default): the gateway
side connects to the sidecar, and the signaling side listens on ``--bind`` for TCP as well as UDP,
answering on whichever the sidecar used (so the sidecar's ``--upstream`` may be ``udp:`` or
``tcp:``). Messages read off a connection are framed as the sidecar frames them
(:mod:`sipwatch.framing`).

Rewrites (the rest of each message is sent as recorded): a request's Via becomes one Via naming
the socket that sends it (with its transport); a response carries the Via and Record-Route lines of the
request as it really arrived (so it routes back through the sidecar); in-dialog requests get
the route set learned from Record-Route in this replay instead of the recorded Route lines;
every signaling-side request is addressed to the gateway socket (its Request-URI's host:port
rewritten, ``maddr`` dropped, ``transport`` set to the replay's), and the Route it carries keeps
only the sidecar's own entries: whatever the capture names, the sidecar can only be made to send
to the replayer's own sockets. IPv6 literals are written in brackets (RFC 3261 §25, RFC 5118).

Hostile captures: only what comes from the sidecar (``--to``; over TCP, connections from its IP)
is read, anything else is counted as ``ignored``; a gap between consecutive recorded messages
longer than ``--max-gap`` recorded seconds (default 60: longer than SIP's longest transaction
timers, Timer B/F = 64×T1 = 32 s) is replayed as ``--max-gap`` long, so no timestamp in the
capture can make the replay wait longer than that per message (divided by ``--speed``).

Limits: SIP only (RTP is not replayed); only the hop between
the gateway and its peer is played (other hops in the capture are ignored); a sidecar that
drops or invents messages makes the replay wait, then report what never arrived. Exit status 1
if any recorded message never arrived at its receiving end, 2 on usage errors.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import selectors
import socket
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from sipwatch.config import ConfigError, call_id_masker
from sipwatch.framing import StreamFramer
from sipwatch.masking import MODES, add_call_id_mask_arguments
from sipwatch.sipmsg import SipMessage, SipParseError, header_tag, parse, split_values, uri_hostport

from .pcapfile import read_packets

Addr = tuple[str, int]
GW, SIG = 0, 1
SIDES = ("gateway", "signaling")
DIALOG_CREATING = {b"INVITE", b"SUBSCRIBE", b"REFER", b"NOTIFY"}
SPIN = 0.002  # seconds before a due send during which the loop polls instead of sleeping
MAX_GAP = 60.0  # default --max-gap: recorded seconds between consecutive messages, at most


@dataclass
class Rec:
    """One recorded SIP message between the gateway and its peer."""

    i: int
    ts: float
    sender: int
    raw: bytes
    msg: SipMessage
    key: tuple  # (call_id, cseq number, cseq method, method or status)
    anchor: int | None = None  # last message the sender received in this call before this one
    due_at: float | None = None  # when it was scheduled to leave (monotonic clock)
    sent_at: float | None = None  # read just before its sendto
    arrived_at: float | None = None  # read just after the recvfrom that got it
    t: float = 0.0  # replay timeline: ts with gaps longer than the max gap compressed to it

    @property
    def late(self) -> float | None:
        """Send lateness in seconds: actual send time − scheduled time."""
        return None if self.sent_at is None else self.sent_at - self.due_at


@dataclass
class Conversation:
    recs: list[Rec]
    gateway: Addr
    peer: set = field(default_factory=set)
    transport: str = "udp"  # what the gateway's first request was captured on


def _key(msg: SipMessage) -> tuple:
    n, m = msg.cseq()
    return (msg.call_id(), n, m, msg.method if msg.method is not None else msg.status)


def _parse_addr(s: str, default_port: int | None = None) -> Addr:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        if default_port is None:
            raise ValueError(f"need HOST:PORT, got {s!r}")
        return s.strip("[]"), default_port
    return host.strip("[]"), int(port)


def _bracket(host: str | bytes):
    """An IPv6 literal in brackets, as a URI or Via sent-by writes it (RFC 3261 §25, RFC 5118)."""
    if isinstance(host, bytes):
        return b"[%s]" % host if b":" in host and not host.startswith(b"[") else host
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _numeric(addr: Addr, kind=socket.SOCK_DGRAM) -> Addr:
    """``addr`` with its host as the numeric address recvfrom/getpeername report."""
    try:
        return socket.getaddrinfo(addr[0], addr[1], type=kind)[0][4][:2]
    except (OSError, UnicodeError):
        return addr


def compress_gaps(recs: list[Rec], max_gap: float) -> None:
    """Set each message's replay time ``t``: capture time with every gap to the previous message
    clamped to [0, max_gap] (a timestamp years out, or going back, cannot stall the replay)."""
    t = 0.0
    for k, r in enumerate(recs):
        if k:
            gap = r.ts - recs[k - 1].ts
            t += min(gap, max_gap) if gap > 0 else 0.0  # (NaN: 0)
        r.t = t


def load(path: str, gateway: str | None = None) -> Conversation:
    """The SIP messages to or from the gateway, in capture order, with their anchors."""
    msgs = []
    for p in read_packets(path):
        if not p.payload[:16].strip():
            continue
        try:
            msg = parse(p.payload, check_length=False)
            key = _key(msg)
        except (SipParseError, ValueError, IndexError):
            continue  # RTP, RTCP, keep-alives, garbage: not replayed
        msgs.append((p, msg, key))
    if not msgs:
        raise ValueError("no SIP messages in the capture")
    gw: Addr | None = None
    if gateway:
        host, _, port = gateway.rpartition(":") if gateway.count(":") == 1 or "]:" in gateway else ("", "", "")
        if host and port.isdigit():
            gw = (host.strip("[]"), int(port))
        else:
            ip = gateway.strip("[]")
            gw = next((p.src for p, m, _ in msgs if m.method is not None and p.src[0] == ip), None)
            if gw is None:
                raise ValueError(f"no SIP request from {ip} in the capture")
    else:
        gw = next(p.src for p, m, _ in msgs if m.method is not None)
    conv = Conversation([], gw)
    conv.transport = next((p.transport for p, m, _ in msgs if p.src == gw and m.method is not None), "udp")
    last_received: dict[tuple[int, bytes], int] = {}
    for p, msg, key in msgs:
        if p.src == gw:
            sender = GW
            conv.peer.add(p.dst)
        elif p.dst == gw:
            sender = SIG
            conv.peer.add(p.src)
        else:
            continue
        rec = Rec(len(conv.recs), p.ts, sender, p.payload, msg, key)
        rec.anchor = last_received.get((sender, key[0]))
        last_received[(1 - sender, key[0])] = rec.i
        conv.recs.append(rec)
    if not conv.recs:
        raise ValueError("no SIP messages to or from the gateway %s in the capture" % _fmt(gw))
    compress_gaps(conv.recs, MAX_GAP)
    return conv


def _fmt(addr: Addr) -> str:
    return "%s:%d" % (_bracket(addr[0]), addr[1])


class Replayer:
    def __init__(self, conv: Conversation, to: Addr, bind: Addr, speed: float = 1.0,
                 gateway_bind: Addr | None = None, grace: float = 3.0, transport: str = "udp",
                 max_gap: float = MAX_GAP):
        self.conv = conv
        to = _numeric(to)
        self.to = to
        self.max_gap = max_gap
        compress_gaps(conv.recs, max_gap)
        self.speed = speed
        self.grace = grace
        self.tcp = transport == "tcp"
        self.socks = []
        for addr in (gateway_bind or (bind[0], 0), bind):
            s = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(addr)
            s.setblocking(False)
            self.socks.append(s)
        # over TCP: the gateway side's connection to the sidecar, and the signaling side's
        # listener (beside its UDP socket); conn[side] is where that side's messages go (None: UDP)
        self.conn: list[socket.socket | None] = [None, None]
        self.listener: socket.socket | None = None
        self.streams: dict[socket.socket, tuple[int, StreamFramer, Addr]] = {}
        if self.tcp:
            fam = socket.AF_INET6 if ":" in to[0] else socket.AF_INET
            gw = socket.socket(fam, socket.SOCK_STREAM)
            gw.bind(gateway_bind or (bind[0], 0))
            gw.connect(to)
            gw.setblocking(False)
            self.socks[GW].close()
            self.socks[GW] = gw
            self.conn[GW] = gw
            self.streams[gw] = (GW, StreamFramer(), to)
            lst = socket.socket(socket.AF_INET6 if ":" in bind[0] else socket.AF_INET, socket.SOCK_STREAM)
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind(bind)
            lst.listen(16)
            lst.setblocking(False)
            self.listener = lst
        self.addr = [s.getsockname()[:2] for s in self.socks]
        self.reply_to: list[Addr] = [to, to]  # where each side's messages go (learned on arrival)
        # expected arrivals per receiving side and key, in recorded order
        self.expect = [defaultdict(deque), defaultdict(deque)]
        for r in conv.recs:
            self.expect[1 - r.sender][r.key].append(r.i)
        self.requests_seen: list[dict] = [{}, {}]  # (call_id, cseq, method) -> real request
        self.routes: list[dict] = [{}, {}]  # call_id -> route set for in-dialog requests
        self.unexpected = [0, 0]
        self.ignored = [0, 0]  # datagrams and connections not from the sidecar
        self.arrivals: deque[int] = deque()  # recorded messages arrived, for run() to schedule after
        self.n_arrived = 0
        self.send_errors = 0

    def close(self) -> None:
        for s in {*self.socks, *self.streams, *([self.listener] if self.listener else [])}:
            s.close()

    # -- rewriting ----------------------------------------------------------------------
    def build(self, rec: Rec) -> bytes:
        msg = parse(rec.raw, check_length=False)
        side = rec.sender
        lines, names = msg.lines, msg.names
        cid, cseq_n, cseq_m, _ = rec.key
        if msg.method is not None:
            via_i = names.index(b"via") if b"via" in names else 0
            host, port = self.addr[side]
            top = split_values(msg.value_at(via_i))[0] if b"via" in names else b""
            params = top[top.find(b";"):] if b";" in top else b""
            params = b";".join(p for p in params.split(b";")
                               if not p.lower().startswith((b"received", b"rport")))
            proto = b"TCP" if self.conn[side] is not None else b"UDP"
            new_via = b"Via: SIP/2.0/%s %s:%d%s;rport" % (proto, _bracket(host.encode()), port, params)
            keep = [(ln, n) for ln, n in zip(lines, names) if n not in (b"via", b"route")]
            lines[:] = [new_via] + [ln for ln, _ in keep]
            names[:] = [b"via"] + [n for _, n in keep]
            in_dialog = header_tag(msg.get(b"to")) is not None
            route = self._sidecar_routes(self.routes[side].get(cid))
            if in_dialog and route:
                lines.insert(1, b"Route: " + b", ".join(route))
                names.insert(1, b"route")
            if side == SIG:
                msg.uri = self._readdress(msg.uri)
                msg.start = b"%s %s SIP/2.0" % (msg.method, msg.uri)
        else:
            req = self.requests_seen[side].get((cid, cseq_n, cseq_m))
            if req is not None:
                vias = [ln for ln, n in zip(req.lines, req.names) if n == b"via"]
                rrs = [ln for ln, n in zip(req.lines, req.names) if n == b"record-route"] \
                    if cseq_m in DIALOG_CREATING else []
                keep = [(ln, n) for ln, n in zip(lines, names) if n not in (b"via", b"record-route")]
                lines[:] = vias + rrs + [ln for ln, _ in keep]
                names[:] = [b"via"] * len(vias) + [b"record-route"] * len(rrs) + [n for _, n in keep]
        return msg.to_bytes()

    def _readdress(self, uri: bytes) -> bytes:
        """Any signaling-side Request-URI, addressed to the gateway socket: the user part and
        parameters are kept (the bytes as recorded, nothing decoded), the host:port becomes the
        socket's, ``maddr`` goes and ``transport`` says the replay's, so the sidecar, which routes
        such a request by its Request-URI, can only send it to the replayer."""
        scheme, colon, rest = uri.partition(b":")
        if not colon or scheme.lower() not in (b"sip", b"sips"):
            rest = b""  # not a SIP URI (tel:, garbage): nothing of it is kept
        rest = rest.split(b"?", 1)[0]  # URI headers: dropped
        at = rest.rfind(b"@")
        user = rest[:at + 1] if at >= 0 else b""
        hostpart = rest[at + 1:]
        semi = hostpart.find(b";")
        params = [p for p in (hostpart[semi + 1:].split(b";") if semi >= 0 else [])
                  if p and p.partition(b"=")[0].strip().lower() not in (b"maddr", b"transport")]
        if self.tcp:
            params.append(b"transport=tcp")
        h, p = self.addr[GW]
        return b"sip:%s%s:%d%s" % (user, _bracket(h.encode()), p, b"".join(b";" + x for x in params))

    def _names_sidecar(self, value: bytes) -> bool:
        """A Route value whose host:port is the sidecar's (``--to``), with no ``maddr``."""
        try:
            host, port, params = uri_hostport(value)
            host_s = host.strip(b"[]").decode("ascii")
        except (SipParseError, UnicodeDecodeError):
            return False
        if b"maddr" in params or (port or 5060) != self.to[1]:
            return False
        return host_s == self.to[0] or _numeric((host_s, self.to[1]))[0] == self.to[0]

    def _sidecar_routes(self, route: list[bytes] | None) -> list[bytes]:
        """The entries of a learned route set that name the sidecar (``--to``); the rest go, so
        the sidecar routes by the Request-URI (the gateway socket) once it has removed its own."""
        if not route:
            return []
        return [v for line in route for v in split_values(line) if self._names_sidecar(v)]

    # -- receiving ----------------------------------------------------------------------
    def on_datagram(self, side: int, data: bytes, src: Addr, now: float, stream: bool = False) -> bool:
        """Take a message read on ``side``; True if it was one the recording said comes next.
        Only the sidecar is listened to: a datagram from any other address (``src``; a message
        read off a connection was checked when it was accepted) is counted as ignored."""
        if not stream and tuple(src[:2]) != tuple(self.to[:2]):
            self.ignored[side] += 1
            return False
        try:
            msg = parse(data, check_length=False)
            key = _key(msg)
        except (SipParseError, ValueError, IndexError):
            self.unexpected[side] += 1
            return False
        q = self.expect[side].get(key)
        if not q:
            self.unexpected[side] += 1
            return False
        # (only expected messages teach anything: requests_seen holds at most one per recording)
        cid, cseq_n, cseq_m, _ = key
        if msg.method is not None:
            self.requests_seen[side][(cid, cseq_n, cseq_m)] = msg
            if side == SIG and msg.method in DIALOG_CREATING and header_tag(msg.get(b"to")) is None:
                rr = msg.get_all(b"record-route")
                if rr:
                    self.routes[SIG][cid] = rr
        elif side == GW and 100 < msg.status < 300 and cseq_m in DIALOG_CREATING:
            rr = msg.get_all(b"record-route")
            if rr:
                self.routes[GW][cid] = list(reversed(rr))
        i = q.popleft()
        self.conv.recs[i].arrived_at = now
        self.arrivals.append(i)
        self.n_arrived += 1
        return True

    # -- main loop ----------------------------------------------------------------------
    def run(self) -> None:
        recs = self.conv.recs
        if not recs:
            return
        t0 = recs[0].t
        # a message is scheduled once its due time is known: at the start when it runs on the
        # capture's clock, else when its anchor arrives (on_datagram notes arrivals in
        # self.arrivals); each loop pass then looks at the due ones only, not every message
        speed = self.speed
        waiters: dict[int, list[Rec]] = defaultdict(list)
        ready: list[tuple[float, int]] = []
        start = time.monotonic()
        for r in recs:
            if r.anchor is None:
                ready.append((start + (r.t - t0) / speed, r.i))
            else:
                waiters[r.anchor].append(r)
        heapq.heapify(ready)
        unsent = len(recs)
        sel = selectors.DefaultSelector()
        for side, s in enumerate(self.socks):
            sel.register(s, selectors.EVENT_READ, side)
        if self.listener is not None:
            sel.register(self.listener, selectors.EVENT_READ, "accept")
        deadline = start + (recs[-1].t - t0) / speed + self.grace
        while True:
            while self.arrivals:
                a = recs[self.arrivals.popleft()]
                for r in waiters.pop(a.i, ()):
                    heapq.heappush(ready, (a.arrived_at + max(r.t - a.t, 0.0) / speed, r.i))
            now = time.monotonic()
            due_now = []
            while ready and ready[0][0] <= now:
                due_now.append(heapq.heappop(ready))
            for due, i in sorted(due_now, key=lambda d: d[1]):  # (in recorded order, as due)
                self._send(recs[i], due)
            unsent -= len(due_now)
            next_due = ready[0][0] if ready else None
            if not unsent and self.n_arrived == len(recs):
                break
            if now > deadline:
                break
            now = time.monotonic()
            timeout = (deadline - now) if next_due is None else next_due - now - SPIN
            # sleep until shortly before the next send, then poll: select() oversleeps by up to
            # a millisecond or two, which would show up in every replayed RTT
            for k, _ in sel.select(min(max(timeout, 0.0), 0.05)):
                side = k.data
                if side == "accept" or k.fileobj in self.streams:
                    self._stream_ready(sel, k.fileobj)
                    continue
                while True:
                    try:
                        data, src = k.fileobj.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        self.send_errors += 1
                        break
                    self.on_datagram(side, data, src[:2], time.monotonic())
            # sends that became due late still leave as soon as possible; the delay is reported
        sel.close()

    def _stream_ready(self, sel, sock) -> None:
        """Accept the sidecar's connection to the signaling side, or read one that has data."""
        if sock is self.listener:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            if peer[0] != self.to[0]:  # only the sidecar connects to the signaling side
                self.ignored[SIG] += 1
                conn.close()
                return
            conn.setblocking(False)
            self.streams[conn] = (SIG, StreamFramer(), peer[:2])
            sel.register(conn, selectors.EVENT_READ, SIG)
            return
        side, framer, peer = self.streams[sock]
        try:
            data = sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # closed by the sidecar
            sel.unregister(sock)
            del self.streams[sock]
            if self.conn[side] is sock:
                self.conn[side] = None
            sock.close()
            return
        now = time.monotonic()
        for m in framer.feed(data):
            if self.on_datagram(side, m, peer, now, stream=True):
                self.conn[side] = sock  # answers go back on the connection (RFC 3261 18.2.2)
        if framer.error is not None:
            self.unexpected[side] += 1

    def _send(self, r: Rec, due: float) -> None:
        data = self.build(r)
        r.due_at = due
        r.sent_at = time.monotonic()  # before the sendto: the peer cannot have it earlier
        try:
            conn = self.conn[r.sender]
            if conn is not None:
                conn.setblocking(True)
                try:
                    conn.sendall(data)
                finally:
                    conn.setblocking(False)
            else:
                self.socks[r.sender].sendto(data, self.reply_to[r.sender])
        except OSError:
            self.send_errors += 1

    # -- report -------------------------------------------------------------------------
    def summary(self, call_id_mask=None) -> dict:
        """What was replayed, with the replayer's own timing errors measured; Call-IDs shown
        through ``call_id_mask`` (a :class:`~sipwatch.masking.CallIdMasker`; None: as captured).

        Per message, ``late_ms``: actual send time − scheduled time (the replayer's timers are
        not punctual on a loaded machine). Per transaction (first copy of a request, first
        response to it), two intervals measured on the replayer's own sockets bracket any RTT a
        proxy between the two sockets can measure, by causality alone:

        * ``inner_ms`` = response sent by the answering socket − first request copy received
          there (the proxy forwarded the request before it arrived and got the response after
          it left), so an RTT below it is impossible;
        * ``outer_ms`` = response received by the asking socket − first request copy sent from
          it (``replayed_rtt_ms``), so an RTT above it is impossible;

        ``late_ms`` = ``inner_ms`` − recorded RTT ÷ speed: how much later than the recording the
        replayer answered (the response's send lateness, plus the drift of the request copy it
        answered when that was a retransmission). ``transit_ms`` = ``outer_ms`` − ``inner_ms``:
        the two trips through the proxy.
        """
        recs = self.conv.recs
        show = _show_call_id(call_id_mask)
        missing = [r for r in recs if r.arrived_at is None]
        unsent = [r for r in recs if r.sent_at is None]
        txs = []
        first_req: dict = {}
        answered: set[int] = set()
        for r in recs:
            cid, n, m, what = r.key
            if r.msg.method is not None:
                if m != b"ACK":
                    first_req.setdefault((cid, n, m, r.sender), r)
                continue
            req = first_req.get((cid, n, m, 1 - r.sender))
            if req is None or req.i in answered:
                continue
            answered.add(req.i)
            rec_rtt = (r.ts - req.ts) * 1000.0
            sched_rtt = max(r.t - req.t, 0.0) * 1000.0  # (as replayed: gaps over --max-gap compressed)
            outer = inner = None
            if req.sent_at is not None and r.arrived_at is not None:
                outer = (r.arrived_at - req.sent_at) * 1000.0
            if req.arrived_at is not None and r.sent_at is not None:
                inner = (r.sent_at - req.arrived_at) * 1000.0
            txs.append({"call_id": show(cid), "method": m.decode(), "cseq": n,
                        "from": SIDES[req.sender], "recorded_rtt_ms": round(rec_rtt, 3),
                        "replayed_rtt_ms": _ms(outer), "inner_ms": _ms(inner), "outer_ms": _ms(outer),
                        "late_ms": None if inner is None else round(inner - sched_rtt / self.speed, 3),
                        "transit_ms": None if inner is None or outer is None else round(outer - inner, 3),
                        "response_send_late_ms": _ms(None if r.late is None else r.late * 1000.0)})
        lates = sorted(r.late * 1000.0 for r in recs if r.sent_at is not None)
        return {
            "messages": len(recs),
            "sent": {SIDES[s]: sum(1 for r in recs if r.sender == s and r.sent_at is not None) for s in (GW, SIG)},
            "received": {SIDES[s]: sum(1 for r in recs if r.sender != s and r.arrived_at is not None) for s in (GW, SIG)},
            "unexpected": {SIDES[s]: self.unexpected[s] for s in (GW, SIG)},
            "ignored": {SIDES[s]: self.ignored[s] for s in (GW, SIG)},
            "missing": [_describe(r, show) for r in missing],
            "unsent": [_describe(r, show) for r in unsent],
            "send_errors": self.send_errors,
            "transport": "tcp" if self.tcp else "udp",
            "speed": self.speed,
            "max_gap_s": self.max_gap,
            "send_lateness_ms": {"max": _ms(lates[-1] if lates else None),
                                 "median": _ms(lates[len(lates) // 2] if lates else None),
                                 "per_message": [_ms(None if r.late is None else r.late * 1000.0) for r in recs]},
            "transactions": txs,
        }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _show_call_id(call_id_mask):
    """Call-ID bytes -> text for the report: through the masker (its ``none`` shows them as is)."""
    return call_id_mask if call_id_mask is not None else (lambda cid: cid.decode(errors="replace"))


def _describe(r: Rec, show) -> str:
    cid, n, m, what = r.key
    what = what.decode() if isinstance(what, bytes) else str(what)
    return f"{SIDES[r.sender]}->{SIDES[1 - r.sender]} {what} ({n} {m.decode()}) {show(cid)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sipwatch replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--to", required=True, help="the sidecar's listen address HOST:PORT")
    ap.add_argument("--bind", default="127.0.0.1:5070",
                    help="signaling-side socket HOST:PORT; make it the sidecar's upstream (default %(default)s)")
    ap.add_argument("--gateway-bind", default=None, help="gateway-side socket HOST:PORT (default: any port)")
    ap.add_argument("--gateway", default=None,
                    help="recorded gateway IP[:PORT] (default: sender of the first SIP request)")
    ap.add_argument("--speed", type=float, default=1.0, help="time scale: 2 plays twice as fast")
    ap.add_argument("--grace", type=float, default=3.0, help="seconds to wait for stragglers")
    ap.add_argument("--max-gap", type=float, default=MAX_GAP,
                    help="recorded seconds between consecutive messages, at most: longer gaps are "
                         "replayed as this long (default %(default)s)")
    ap.add_argument("--transport", choices=("auto", "udp", "tcp"), default="auto",
                    help="replay over UDP or TCP (default: what the gateway's requests were captured on)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--mask-numbers", choices=MODES, default="partial",
                    help="decides the Call-IDs' default masking (none: shown as captured)")
    add_call_id_mask_arguments(ap)
    try:
        args = ap.parse_args(argv)
        call_id_mask = call_id_masker(args)  # the report shows Call-IDs as the sidecar's logs do
        if not (math.isfinite(args.speed) and args.speed > 0):
            raise ValueError(f"--speed must be a positive finite number, got {args.speed}")
        if not (math.isfinite(args.grace) and args.grace >= 0):
            raise ValueError(f"--grace must be a finite number of seconds >= 0, got {args.grace}")
        if not (math.isfinite(args.max_gap) and args.max_gap >= 0):
            raise ValueError(f"--max-gap must be a finite number of seconds >= 0, got {args.max_gap}")
        conv = load(args.file, args.gateway)
        to = _parse_addr(args.to)
        bind = _parse_addr(args.bind)
        gwb = _parse_addr(args.gateway_bind) if args.gateway_bind else None
    except (ValueError, OSError, ConfigError) as exc:
        sys.stderr.write(f"sipwatch replay: error: {exc}\n")
        return 2
    transport = conv.transport if args.transport == "auto" else args.transport
    try:
        rp = Replayer(conv, to, bind, args.speed, gwb, args.grace, transport, args.max_gap)
    except OSError as exc:
        sys.stderr.write(f"sipwatch replay: error: cannot open the {transport} sockets: {exc}\n")
        return 2
    try:
        rp.run()
    except KeyboardInterrupt:
        pass
    finally:
        rp.close()
    s = rp.summary(call_id_mask)
    if args.json:
        sys.stdout.write(json.dumps(s, indent=1) + "\n")
    else:
        gw = _fmt(conv.gateway)
        sys.stdout.write(f"replayed {s['messages']} SIP messages of {args.file} (gateway {gw}, {transport}) at x{args.speed}\n"
                         f"  sent: {s['sent']}  received: {s['received']}  unexpected: {s['unexpected']}"
                         f"  ignored (not from the sidecar): {s['ignored']}\n")
        for t in s["transactions"]:
            sys.stdout.write(f"  {t['method']:8} {t['cseq']:>3} from {t['from']:9} recorded {t['recorded_rtt_ms']:9.3f} ms"
                             f"  replayed {t['replayed_rtt_ms'] if t['replayed_rtt_ms'] is not None else '-':>9} ms"
                             f"  (answered {t['late_ms'] if t['late_ms'] is not None else '-'} ms late)\n")
        lat = s["send_lateness_ms"]
        sys.stdout.write(f"  send lateness ms: median {lat['median']}, max {lat['max']}\n")
        for m in s["missing"]:
            sys.stdout.write(f"  NEVER ARRIVED: {m}\n")
    return 1 if s["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
