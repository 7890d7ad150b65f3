"""``sipwatch capture --hep-listen udp:IP:PORT`` (or ``tcp:``): HEP from Kamailio ``siptrace``,
OpenSIPS ``proto_hep``, Asterisk ``res_hep``, FreeSWITCH or a capture agent, fed into the same
observer as a mirror port, so metrics, call summaries, RTTs and spans come out the same.

Why: behind a SIP server that already traces (and for SIP over TLS, which no mirror port can
read) HEP is how the messages leave the box. Each SIP packet (payload type 1) goes to
``Observer.feed`` with the addresses, ports, transport and timestamp its sender recorded.

Every packet is hostile: :func:`sipwatch.hep.parse_hep` checks every length and never raises;
what it refuses is counted in ``sipwatch_hep_rejected_total{reason}``, as are packets whose auth
key does not match ``--hep-auth-key`` (compared in constant time) and payload types other than
SIP and RTCP JSON (``unsupported_type``; logs, type 100, are counted there). RTCP JSON reports
(type 5) go to ``on_rtcp(correlation id, payload)``, which ties them to their call
(:mod:`capture.hep_rtcp`).
Over TCP, packets are framed by the HEPv3 length field; a stream that is not HEPv3, or whose
packet would exceed 65535 bytes, is closed and counted. Connections are accepted at most as fast
as the metrics endpoints accept theirs (:class:`sipwatch.metrics.Listener`: 500 a second past a
burst, the rest wait in the kernel's queue), so that a client connecting in a loop cannot take
the loop from the packets. At most :data:`MAX_TCP_CONNECTIONS` connections are served at once, each with a read buffer of one packet, and a connection that
sends nothing for :data:`TCP_IDLE` seconds is closed. When the table is full a new connection
takes the place of the oldest one that has not delivered a packet yet (past ``--hep-auth-key``,
when one is set), else of the one quiet longest: connections opened and left silent cannot lock
a HEP sender out, and one that delivers keeps its place (closed to make room: counted as
``tcp_connections``).
"""
from __future__ import annotations

import asyncio
import socket
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sipwatch.hep import (MAX_HEP, REASONS, TYPE_RTCP_JSON, TYPE_SIP, HepPacket, hep3_frame_length,
                          parse_hep)
from sipwatch.metrics import ACCEPT_BURST, ACCEPT_PER_SECOND, Listener, TokenBucket, listening_socket

MAX_TCP_CONNECTIONS = 256
# A HEP packet's time is its sender's word, and the observer's timers run on it: one packet
# stamped in 2106 timed out every call in progress. Outside this window around this host's
# clock (a sender's skew, a captagent's batching) the packet's time is clamped into it. The
# window is narrow because the housekeeping tick expires transactions on this host's clock: a
# packet L seconds behind loses L of its Timer B (at 60 s, answered calls 33 s behind were
# counted as timeouts), and one packet L ahead moves every timer L forward.
MAX_AHEAD = 0.5
MAX_BEHIND = 2.0
TCP_IDLE = 300.0  # seconds; senders keep a HEP connection open and idle between calls
REJECT_REASONS = REASONS + ("unsupported_type", "tcp_framing", "tcp_connections")


class HepReceiver:
    """Decodes HEP and hands SIP to ``feed(payload, src, dst, ts, transport)``. A collector too."""

    def __init__(self, feed, auth_key: bytes = b"", on_packet=None, on_rtcp=None, clock=time.time,
                 on_error=None):
        self.feed = feed
        self.on_rtcp = on_rtcp  # callable(correlation_id, json payload) -> taken, for HEP type 5
        # on_error(component, exc): a bug a packet reached (sipwatch_internal_errors_total), not
        # a packet's fault
        self.on_error = on_error
        self.auth_key = auth_key
        self.on_packet = on_packet  # optional callable(HepPacket) for every accepted packet
        self.clock = clock
        self.received = 0  # SIP packets accepted
        self.retimed = 0  # SIP packets stamped outside [now - MAX_BEHIND, now + MAX_AHEAD]
        self.rtcp_received = 0  # RTCP JSON packets accepted
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        self.by_type: dict[int, int] = {}
        # open TCP connections, least recently active first -> has delivered an accepted packet
        self.streams: dict[asyncio.StreamWriter, bool] = {}
        self.servers: list = []
        self.transports: list = []

    @property
    def connections(self) -> int:
        """HEP TCP connections open."""
        return len(self.streams)

    # -- one packet --------------------------------------------------------------------------
    def packet(self, data: bytes) -> bool:
        """One HEP packet from the network: True when it was taken (SIP or RTCP JSON, its auth
        key right). Never raises."""
        r = parse_hep(data, self.auth_key)  # (the key is checked before a payload is inflated)
        if type(r) is not HepPacket:
            self.rejected[r if r in self.rejected else "bad_chunk"] += 1
            return False
        if r.payload_type != TYPE_SIP:
            if r.payload_type == TYPE_RTCP_JSON and self.on_rtcp is not None:
                try:
                    taken = self.on_rtcp(r.correlation_id, r.payload)
                except Exception as exc:  # noqa: BLE001  (a bug guard: the store counts bad JSON itself)
                    self._bug(exc)
                    return False
                if not taken:  # no report block we can read
                    self.rejected["bad_payload"] += 1
                    return False
                self.rtcp_received += 1
                return True
            self.rejected["unsupported_type"] += 1
            return False
        self.received += 1
        try:
            ts = r.ts
            now = self.clock()
            if not now - MAX_BEHIND <= ts <= now + MAX_AHEAD:
                # clamped into the window, not set to now: a sender slightly ahead whose INVITE
                # was stamped inside it and its 200 outside had the answer before the call
                ts = now - MAX_BEHIND if ts < now - MAX_BEHIND else now + MAX_AHEAD
                self.retimed += 1
            if self.on_packet is not None:
                self.on_packet(r)
            self.feed(r.payload, r.src, r.dst, ts, r.transport)
        except Exception as exc:  # noqa: BLE001  (the observer counts what it cannot read; this is a bug guard)
            self._bug(exc)
            return False
        return True

    def _bug(self, exc: Exception) -> None:
        if self.on_error is not None:
            try:
                self.on_error("hep", exc)
            except Exception:  # noqa: BLE001
                pass

    # -- sockets -----------------------------------------------------------------------------
    async def listen(self, transport: str, addr: tuple[str, int], accepts: TokenBucket | None = None) -> None:
        """Receive HEP on ``addr`` over ``transport`` (``udp`` or ``tcp``; TCP connections
        accepted as ``accepts`` allows, ACCEPT_PER_SECOND past ACCEPT_BURST by default)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        if transport == "udp":
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            except OSError:
                pass
            sock.bind(addr)
            sock.setblocking(False)
            tx, _ = await loop.create_datagram_endpoint(lambda: _HepDatagrams(self), sock=sock)
            self.transports.append(tx)
        else:
            self.servers.append(Listener(listening_socket(addr[0], addr[1]), self._stream, self._admit,
                                         accepts or TokenBucket(ACCEPT_PER_SECOND, ACCEPT_BURST)))

    def _make_room(self) -> None:
        """Close the oldest connection that has delivered nothing, else the one quiet longest."""
        streams = self.streams
        victim = next((w for w, delivered in streams.items() if not delivered), None)
        if victim is None:
            victim = next(iter(streams))
        del streams[victim]
        self.rejected["tcp_connections"] += 1
        victim.transport.abort()

    def _admit(self, starting: int) -> bool:
        """Room for a connection just accepted (``starting``: those accepted and not yet in
        :attr:`streams`), made by closing one when full; False when none can be closed."""
        while len(self.streams) + starting >= MAX_TCP_CONNECTIONS:
            if not self.streams:
                self.rejected["tcp_connections"] += 1
                return False
            self._make_room()
        return True

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        streams = self.streams
        streams[writer] = False
        try:
            while True:
                # (a timeout scope, not wait_for: that made a task per read, ~35 µs a frame,
                # so a stream of 6-byte frames cost 40 times a real packet's CPU per byte)
                async with asyncio.timeout(TCP_IDLE):
                    head = await reader.readexactly(6)
                n = hep3_frame_length(head)
                if n is None or n > MAX_HEP:
                    self.rejected["tcp_framing"] += 1
                    return
                async with asyncio.timeout(TCP_IDLE):
                    rest = await reader.readexactly(n - 6)
                if self.packet(head + rest) and writer in streams:
                    del streams[writer]  # to the end: the most recently active
                    streams[writer] = True
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError) as exc:
            # its traceback holds wait_for's frame, which holds the read's task, which holds the
            # exception: a cycle keeping the reader and its buffer (64 KB, and the frame read so
            # far) until a full collection, rare in a large process
            exc.__traceback__ = None
            return
        finally:
            streams.pop(writer, None)
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        for t in self.transports:
            t.close()
        for s in self.servers:
            s.close()

    # -- metrics -----------------------------------------------------------------------------
    def collect(self):
        f = CounterMetricFamily("sipwatch_hep_received", "HEP packets accepted (--hep-listen): SIP "
                                "fed to the observer, RTCP JSON reports tied to their call.",
                                labels=["payload_type"])
        f.add_metric(["sip"], self.received)
        f.add_metric(["rtcp_json"], self.rtcp_received)
        yield f
        f = CounterMetricFamily("sipwatch_hep_rejected", "HEP packets (or TCP streams) refused, by "
                                "reason.", labels=["reason"])
        for r in REJECT_REASONS:
            f.add_metric([r], self.rejected[r])
        yield f
        yield CounterMetricFamily("sipwatch_hep_retimed", "HEP SIP packets stamped more than "
                                  f"{MAX_AHEAD:g} s ahead of this host's clock or {MAX_BEHIND:g} s "
                                  "behind it: clamped into that window.", value=self.retimed)
        yield GaugeMetricFamily("sipwatch_hep_connections", "HEP TCP connections open.",
                                value=self.connections)


class _HepDatagrams(asyncio.DatagramProtocol):
    def __init__(self, receiver: HepReceiver):
        self.receiver = receiver

    def datagram_received(self, data: bytes, addr) -> None:
        self.receiver.packet(data)

    def error_received(self, exc: Exception) -> None:
        pass


__all__ = ["HepReceiver", "REJECT_REASONS", "MAX_TCP_CONNECTIONS"]
