"""Ships every SIP message sipwatch receives and sends to a HEP collector (Homer/heplify-server,
SIP3, sngrep), without slowing forwarding.

The datagram handler only calls :meth:`HepSender.tap`, which appends ``(payload, src, dst, ts)``
to a bounded deque (about 0.2 µs): no encoding, no Call-ID search, no system call. The
housekeeping tick calls :meth:`HepSender.flush`, which encodes the queued messages
(:func:`sipwatch.hep.encode_hep3`, correlation id = the Call-ID found with ``bytes.find``) and
sends them on a non-blocking socket: UDP, one datagram per message (what every receiver
expects), or TCP, all of a batch in as few ``send`` calls as the kernel takes. Nothing ever
waits: a full queue, a full socket buffer, an ICMP port-unreachable from a dead UDP collector
or a TCP collector that is down drops the messages and counts them
(``sipwatch_hep_dropped_total{reason}``); a failed collector is retried with back-off (0.5 s
doubling to 30 s). ``sipwatch_hep_sent_total`` counts packets handed to the kernel.

With ``--hep-log`` each finished call's summary (the ``call_summary`` JSON of the logs) goes as
a HEP LOG record (payload type 100) with the call's Call-ID as correlation id, so Homer shows it
next to the call's messages.
"""
from __future__ import annotations

import errno
import select
import socket
import time
from collections import deque
from itertools import islice

from .hep import PROTO_TCP, PROTO_UDP, TYPE_LOG, TYPE_SIP, Hep3Encoder, HepError, _hepenc, ip_bytes

Addr = tuple[str, int]
QUEUE_MAX = 65536  # messages waiting for the next flush (about 9 s of 1000 calls/s)
TCP_BUFFER_MAX = 4 << 20  # bytes waiting for a slow TCP collector before new packets are dropped
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
FLUSH_MAX = 20000  # messages encoded per flush at most (the rest waits for the next tick)
DROP_REASONS = ("queue_full", "send_error", "collector_down", "too_large")
# the largest UDP payload over IPv4 / IPv6 (65535 less the headers): a HEP packet may be up to
# 65535 bytes, but a larger datagram is refused by send (EMSGSIZE), which no collector causes
UDP_MAX = {socket.AF_INET: 65507, socket.AF_INET6: 65527}
HEADER_SCAN = 8192  # bytes searched for the Call-ID; a header section is rarely longer (_hepenc.c too)
_c_call_id = _hepenc.call_id if _hepenc is not None else None


class EndpointError(ValueError):
    """A ``--hep-endpoint``/``--hep-listen`` value that cannot be used."""


def parse_endpoint(text: str, what: str = "--hep-endpoint") -> tuple[str, Addr]:
    """``udp:IP:PORT`` or ``tcp:IP:PORT`` (IPv6 as ``[::1]:9060``; port 9060 when left out) as
    (transport, (ip, port)). IP literals only: host names are not resolved."""
    t = (text or "").strip()
    proto, sep, rest = t.partition(":")
    if not sep or proto.lower() not in ("udp", "tcp"):
        raise EndpointError(f"{what}: {text!r} is not udp:IP:PORT or tcp:IP:PORT")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_s = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, port_s = rest.split(":")
    else:
        host, port_s = rest, ""
    try:
        ip_bytes(host)
    except HepError:
        raise EndpointError(f"{what}: {host!r} in {text!r} is not an IP address "
                            "(host names are not resolved)") from None
    port = 9060
    if port_s:
        if not (port_s.isascii() and port_s.isdigit()) or not 0 < int(port_s) < 65536:
            raise EndpointError(f"{what}: port {port_s!r} in {text!r} is not 1-65535")
        port = int(port_s)
    return proto.lower(), (host, port)


def call_id_of(payload: bytes) -> bytes:
    """The Call-ID of a SIP message (the ``X-CID`` header's value when there is one: Homer's
    convention for the A-leg's Call-ID), or b"" -- found with bytes.find, no parse (in C when
    ``sipwatch._hepenc`` is built: the same search, without slicing the head)."""
    if _c_call_id is not None:
        return _c_call_id(payload)
    return _call_id_py(payload)


def _call_id_py(payload: bytes) -> bytes:
    """:func:`call_id_of` without the C extension (and its reference in tests)."""
    # the header section ends at the first empty line, whatever its line ends (the body's lines
    # name no Call-ID)
    ends = [i for i in (payload.find(b"\n\n", 0, HEADER_SCAN), payload.find(b"\n\r\n", 0, HEADER_SCAN)) if i >= 0]
    head = payload[:min(ends) if ends else HEADER_SCAN]
    for name in (b"\nX-CID:", b"\nCall-ID:", b"\ni:"):
        i = head.find(name)
        if i >= 0:
            return _value(head, i + len(name))
    low = head.lower()  # names are case-insensitive: the rare odd spelling
    for name in (b"\nx-cid:", b"\ncall-id:", b"\ni:", b"\ncall-id :", b"\ni :"):
        i = low.find(name)
        if i >= 0:
            return _value(head, i + len(name))
    return b""


def _value(head: bytes, start: int) -> bytes:
    end = head.find(b"\n", start)
    return head[start:end if end >= 0 else len(head)].strip()[:256]


class HepSender:
    """The HEP output of a proxy or a capture. Also a Prometheus collector."""

    def __init__(self, endpoint: tuple[str, Addr], capture_id: int = 0, auth_key: bytes = b"",
                 node_name: bytes = b"", local: Addr = ("127.0.0.1", 5060),
                 queue_max: int = QUEUE_MAX, clock=None):
        self.transport, self.collector = endpoint
        self.capture_id = capture_id
        self.auth_key = auth_key
        self.node_name = node_name
        self.encoder = Hep3Encoder(capture_id, auth_key, node_name)
        self.local = local  # our address, for messages tapped with src or dst None
        self.queue: deque = deque()
        self.queue_max = queue_max
        self.clock = clock or time.monotonic
        self.sent = 0
        self.cpu_seconds = 0.0  # CPU time of this thread spent in flush (encoding and sending)
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.last_error: str | None = None
        self.sock: socket.socket | None = None
        self.connected = False  # TCP: connection established
        self.pending: deque = deque()  # TCP: packets not yet fully written
        self.pending_bytes = 0
        self.pending_offset = 0  # TCP: bytes of pending[0] already written
        self.retry_at = 0.0
        self.backoff = BACKOFF_MIN
        self.opened_at = 0.0  # when the socket was opened: the back-off resets once it outlived one
        self.proto = PROTO_UDP

    # -- hot path ---------------------------------------------------------------------------
    def tap(self, payload: bytes, src, dst, ts: float, transport: str = "udp") -> None:
        """One message seen on the wire (``src``/``dst`` None: this process's own address)."""
        q = self.queue
        if len(q) < self.queue_max:
            q.append((payload, src, dst, ts, transport))
        else:
            self.dropped["queue_full"] += 1

    # -- housekeeping -----------------------------------------------------------------------
    def call_summary(self, call_id: bytes, summary_json: bytes, ts: float) -> None:
        """A finished call's summary as a HEP LOG record (queued like a message)."""
        q = self.queue
        if len(q) < self.queue_max:
            q.append((summary_json, None, None, ts, "log", call_id))
        else:
            self.dropped["queue_full"] += 1

    def flush(self) -> int:
        """Encode and send what is queued; returns packets sent. Never blocks, never raises."""
        if not self.queue and not self.pending:
            return 0
        t0 = time.thread_time()
        try:
            return self._flush()
        finally:
            self.cpu_seconds += time.thread_time() - t0

    def _flush(self) -> int:
        q = self.queue
        now = self.clock()
        if not self._ready(now):
            n = len(q)
            q.clear()
            self.dropped["collector_down"] += n
            return 0
        packets = []
        local = self.local
        encode, popleft, append = self.encoder.encode, q.popleft, packets.append
        for _ in range(min(len(q), FLUSH_MAX)):
            item = popleft()
            payload, src, dst, ts, transport = item[:5]
            try:
                if transport == "udp":
                    append(encode(payload, src or local, dst or local, ts, PROTO_UDP, TYPE_SIP,
                                  call_id_of(payload)))
                elif transport == "log":
                    append(encode(payload, local, local, ts, PROTO_UDP, TYPE_LOG, item[5]))
                else:
                    append(encode(payload, src or local, dst or local, ts, PROTO_TCP, TYPE_SIP,
                                  call_id_of(payload)))
            except (HepError, ValueError, TypeError, IndexError):
                self.dropped["too_large"] += 1
        if self.transport == "udp":
            return self._send_udp(packets, now)
        return self._send_tcp(packets, now)

    def _ready(self, now: float) -> bool:
        """A socket to send on (opening one when the back-off allows), else False."""
        if self.sock is not None:
            return True
        if now < self.retry_at:
            return False
        host = self.collector[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            if self.transport == "udp":
                s = socket.socket(family, socket.SOCK_DGRAM)
                s.setblocking(False)
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                except OSError:
                    pass
                s.connect(self.collector)  # connected: ICMP unreachable comes back as an error
                self.connected = True
            else:
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rc = s.connect_ex(self.collector)
                if rc not in (0, errno.EINPROGRESS):
                    s.close()
                    raise OSError(rc, errno.errorcode.get(rc, str(rc)))
                self.connected = rc == 0
        except OSError as exc:
            self._failed(exc, now)
            return False
        self.sock = s
        self.opened_at = now
        return True

    def _succeeded(self, n: int, now: float) -> None:
        """``n`` packets handed to the kernel. The back-off starts again from its minimum only
        once the socket has lived a back-off period: a dead UDP collector takes the first send
        (its ICMP error answers the next), and a TCP collector may accept and close at once, so
        a first success proves nothing."""
        self.sent += n
        if now - self.opened_at >= self.backoff:
            self.backoff = BACKOFF_MIN

    def _failed(self, exc: Exception, now: float) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        self._close_socket()
        self.connected = False
        lost = len(self.pending)
        if lost:
            self.dropped["collector_down"] += lost
        self.pending.clear()
        self.pending_bytes = self.pending_offset = 0
        self.retry_at = now + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def _send_udp(self, packets: list, now: float) -> int:
        sock = self.sock
        send = sock.send
        largest = UDP_MAX.get(sock.family, 65507)
        sent = 0
        for i, p in enumerate(packets):
            if len(p) > largest:  # a peer's huge message must not look like a dead collector
                self.dropped["too_large"] += 1
                continue
            try:
                send(p)
                sent += 1
            except BlockingIOError:
                self.dropped["send_error"] += len(packets) - i  # socket buffer full
                break
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:  # this packet alone (a smaller path MTU)
                    self.dropped["too_large"] += 1
                    continue
                # ECONNREFUSED: the collector's port is closed
                self.dropped["send_error"] += 1
                rest = len(packets) - i - 1
                self.dropped["collector_down"] += rest
                self._failed(exc, now)
                break
        if sent:
            self._succeeded(sent, now)
        return sent

    def _send_tcp(self, packets: list, now: float) -> int:
        pending = self.pending
        for p in packets:
            if self.pending_bytes + len(p) > TCP_BUFFER_MAX:
                self.dropped["send_error"] += 1  # the collector reads slower than we send
                continue
            pending.append(p)
            self.pending_bytes += len(p)
        s = self.sock
        if not self.connected:
            try:
                poller = select.poll()  # (select.select refuses descriptors past 1023)
                poller.register(s, select.POLLOUT)
                if not poller.poll(0):
                    return 0  # still connecting
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, errno.errorcode.get(err, str(err)))
                self.connected = True
            except (OSError, ValueError) as exc:
                self._failed(exc, now)
                return 0
        done = 0
        while pending:
            first = pending[0]
            chunk = b"".join(islice(pending, 256)) if self.pending_offset == 0 and len(pending) > 1 \
                else first[self.pending_offset:]
            try:
                n = s.send(chunk)
            except BlockingIOError:
                break
            except OSError as exc:
                self._failed(exc, now)
                break
            # account n bytes against whole packets
            n += self.pending_offset
            self.pending_offset = 0
            while pending and n >= len(pending[0]):
                n -= len(pending[0])
                self.pending_bytes -= len(pending.popleft())
                done += 1
            if n:
                self.pending_offset = n
                break
        if done:
            self._succeeded(done, now)
        return done

    def close(self) -> None:
        """Stop sending; what is still queued or unwritten is counted as dropped."""
        self.dropped["collector_down"] += len(self.queue) + len(self.pending)
        self.queue.clear()
        self.pending.clear()
        self._close_socket()

    def _close_socket(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    # -- metrics ----------------------------------------------------------------------------
    def collect(self):
        # imported here: the command-line tools read this module's flags without any metrics
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield CounterMetricFamily("sipwatch_hep_sent", "HEP packets handed to the kernel for the "
                                  "collector (--hep-endpoint).", value=self.sent)
        f = CounterMetricFamily("sipwatch_hep_dropped", "Messages not sent as HEP: queue full, "
                                "socket buffer full or send refused, collector down (waiting out "
                                "the back-off), too large for one HEP packet.", labels=["reason"])
        for r in DROP_REASONS:
            f.add_metric([r], self.dropped[r])
        yield f
        yield CounterMetricFamily("sipwatch_hep_cpu_seconds", "CPU time the housekeeping tick spent "
                                  "encoding and sending HEP (the per-message queueing not included).",
                                  value=self.cpu_seconds)
        yield GaugeMetricFamily("sipwatch_hep_queued", "Messages waiting for the next HEP flush.",
                                value=len(self.queue) + len(self.pending))


def add_hep_arguments(ap) -> None:
    """The HEP output flags, shared by ``sipwatch proxy`` and ``sipwatch capture``."""
    ap.add_argument("--hep-endpoint", default=None, metavar="udp:IP:PORT|tcp:IP:PORT",
                    help="send every SIP message seen to this HEPv3 collector (Homer, SIP3, sngrep)")
    ap.add_argument("--hep-capture-id", default=None, help="HEP capture id (uint32, default 0)")
    ap.add_argument("--hep-auth-key", default=None, help="HEP auth key (password) sent with each packet")
    ap.add_argument("--hep-node-name", default=None, help="HEP node name sent with each packet")
    ap.add_argument("--hep-log", action="store_true", default=None,
                    help="also send each call summary as a HEP LOG record (type 100)")


def hep_options(get, flag) -> dict:
    """Checked HEP settings from ``get(name, default) -> (value, where)`` and ``flag(name)``;
    raises EndpointError naming the flag."""
    ep_s, w = get("hep-endpoint", None)
    endpoint = parse_endpoint(ep_s, w) if ep_s else None
    cid_s, w = get("hep-capture-id", "0")
    if not (str(cid_s).isascii() and str(cid_s).isdigit()) or int(cid_s) >= 1 << 32:
        raise EndpointError(f"{w}: {cid_s!r} is not a capture id 0-4294967295")
    key, _ = get("hep-auth-key", "")
    node, _ = get("hep-node-name", "")
    for value, name in ((key, "--hep-auth-key"), (node, "--hep-node-name")):
        if len(str(value).encode()) > 1024:
            raise EndpointError(f"{name}: longer than 1024 bytes")
    return {"hep_endpoint": endpoint, "hep_capture_id": int(cid_s),
            "hep_auth_key": str(key).encode(), "hep_node_name": str(node).encode(),
            "hep_log": bool(flag("hep-log"))}


def local_address(listen: Addr, advertise: Addr | None) -> Addr:
    """This process's address in HEP records: the listen address, or, listening on a wildcard,
    the advertised one. HEP carries IP addresses: an advertised host name (common in Via and
    Record-Route) is replaced by the address a route lookup gives, as for a wildcard listen
    without ``--advertise``; no name is resolved."""
    if listen[0] not in ("0.0.0.0", "::", ""):
        return listen
    if advertise is not None:
        try:
            ip_bytes(advertise[0])
            return advertise[0], listen[1]
        except HepError:
            pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, only a route lookup
            return s.getsockname()[0], listen[1]
    except OSError:
        return "0.0.0.0", listen[1]


__all__ = ["HepSender", "parse_endpoint", "call_id_of", "add_hep_arguments", "hep_options",
           "EndpointError", "local_address", "DROP_REASONS"]


def sender_for_proxy(settings) -> HepSender | None:
    """The proxy's HEP sender from its settings, or None without ``--hep-endpoint``."""
    endpoint = getattr(settings, "hep_endpoint", None)
    if endpoint is None:
        return None
    return HepSender(endpoint, settings.hep_capture_id, settings.hep_auth_key,
                     settings.hep_node_name, local_address(settings.listen, settings.advertise))


def summary_record(call, mask_mode: str = "partial", call_id_mask=None) -> bytes:
    """A finished call's summary as the JSON of its ``call_summary`` log line (the HEP LOG)."""
    from .logs import call_summary_fields, dumps, json_line_safe
    fields = call_summary_fields(call, mask_mode, None, call_id_mask)
    fields["event"] = "call_summary"
    return json_line_safe(dumps(fields)[0])  # Homer shows it as the log line is shown
