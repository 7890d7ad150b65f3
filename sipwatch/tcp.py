"""The TCP edge: SIP over TCP on the listen address, and connections toward whoever needs them.

Thin like the UDP edge: each connection's bytes go through a :class:`~sipwatch.framing.StreamFramer`
and every whole message to :meth:`ProxyCore.receive_stream`; the core says where each output goes
and whether over TCP (``core.out_tcp``). The edge maps a destination to a connection:

* a response goes back on the connection its request came on (RFC 3261 §18.2.2): the core's
  reply address for a TCP request is the connection's peer address, which indexes the table;
* a request toward an address the table knows reuses that connection: the peer address, or the
  Via sent-by a peer wrote on its own connection (RFC 5923-style alias; only for the IP the
  connection comes from, at most ``MAX_ALIASES`` per connection);
* otherwise a connection is opened. Toward the upstream it is bound, when the system allows, to
  the listen address, so sip-signaling sees the sidecar's own address and sends its requests on
  that connection too (servers reuse connections by address); it is opened again when lost.
  Messages wait (bounded) while a connection is being opened.

Hygiene, for peers that are hostile or merely broken: at most ``max_connections`` connections
(to make room, the oldest accepted connection none of whose messages was forwarded yet is
closed, else the one forwarded from least recently among those of the party that holds the
most, an IPv4 address or an IPv6 /64 (:func:`~sipwatch.core.party_of`), never the upstream's:
connections opened in bulk, or kept busy with messages that go nowhere, cannot push out the
ones carrying calls), a connection whose messages go nowhere (stray
responses, malformed or refused requests, keep-alives) more than ``JUNK_RATE`` a second beyond a burst of
``JUNK_BURST`` is closed, a burst of messages is handled ``TURN_MAX`` a turn of the loop (one
connection cannot hold the others up for long), a backlog standing above ``BACKLOG_MARK`` sheds
new dialogs with 503 (``TcpEdge._shed``), a connection idle for ``idle_timeout``
seconds is closed, a message must be complete within ``MESSAGE_TIMEOUT`` seconds of its first
byte (a byte-at-a-time sender holds one slot at most that long, and costs the others nothing:
the loop never waits on a connection), a peer that does not read what it is sent is cut off past
``MAX_WRITE_BUFFER`` bytes (and those holding the most once all hold ``MAX_WRITE_BUFFERS``, messages
waiting for connections being opened included), TCP keep-alive finds half-open peers, and framing errors close the
connection. Every closing is counted by reason (``sipwatch_tcp_connections_closed_total``), every
message not forwarded in ``sip_dropped_total``; nothing raises out of a protocol callback.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import socket
import struct
import termios
from collections import deque

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .core import ProxyCore, party_of
from .framing import StreamFramer
from .transport import claim_address, tap_copies

Addr = tuple[str, int]
MAX_CONNECTIONS = 4096
IDLE_TIMEOUT = 300.0  # seconds without a message (RFC 5626 keep-alives count)
MESSAGE_TIMEOUT = 10.0  # seconds from a message's first byte to its last
CONNECT_TIMEOUT = 5.0
MAX_WRITE_BUFFER = 4 << 20  # bytes waiting for a peer that does not read
# bytes waiting in all connections together: without it, MAX_CONNECTIONS peers that do not read
# could have the proxy hold 16 GB. Past it the connections holding the most are cut off until
# three quarters of it are left (as Kamailio bounds its write queues: 32 KB a connection and
# 10 MB in all, by default)
MAX_WRITE_BUFFERS = 32 << 20
MAX_PENDING = 4 << 20  # bytes waiting for a connection being opened
MAX_ALIASES = 4
MAX_SENT_BY = 16384  # connections' sent-by addresses remembered for §18.2.2 (see TcpEdge.sent_by)
LISTEN_BACKLOG = 1024  # connections the kernel holds for accept (a connection-per-call gateway's burst)
SWEEP_EVERY = 1.0
# descriptors kept for everything but SIP connections (sockets of UDP, the metrics endpoints and
# their connections, HEP, the span worker's pipes, stdout): the connection cap is lowered to fit
# the descriptor limit less this
FD_RESERVE = 256
RECONNECT_BACKOFF = 0.5  # seconds a destination whose connection failed is not tried again
# messages that go nowhere a connection may send (a ping counts as one): a second's worth on
# average, a burst on top. A gateway's keep-alives come every 30 s or so and stray responses
# seldom; one connection streaming stray responses or pings had kept the loop busy (140,000 a
# second: call setup 0.7 s at p50). sip-signaling (its address, the connection toward it) is not held to it.
JUNK_RATE = 50.0
JUNK_BURST = 500.0
# whole messages of one connection handled in one turn of the loop: the rest of a burst waits
# (its reading paused) for the next, after the other connections' and sockets' callbacks. One
# connection's 256-KB read is ~1,000 small messages, ~10 ms the loop gave no one else.
# sip-signaling's connection carries the other half of every dialog (the responses of every
# call): its turn is as long as all the other waiting bursts' turns together (_Conn._turn), so
# that gateways' connections kept busy with what is never shed (OPTIONS, in-dialog requests)
# cannot starve it of the loop (its backlog standing would shed everyone's new calls), up to
# UPSTREAM_TURN_MAX (~2.5 ms of the loop: with many busy connections its share shrinks again, but
# no read of its own holds the others up for 10 ms)
TURN_MAX = 32
UPSTREAM_TURN_MAX = 8 * TURN_MAX
# a connection is behind while the bytes the kernel holds for it unread stay above BACKLOG_MARK,
# as each read (what it brought) and the end of each burst's turns (what is left) see them: past
# ``overload_after`` seconds of that (the standing queue UDP's guard looks for) new dialogs get
# 503 + Retry-After until it drains (TcpEdge._shed says whose). TCP flow control otherwise leaves
# the backlog in the sender: at 8,000 calls/s offered over one connection (6,300 carried) call
# setup took 2 s at p50 and no call was told to go elsewhere. The mark is ~300 small messages:
# at 4,000 calls/s (70-80% of a CPU) the queue left after a burst was under 65 KB 99 times in 100.
# It needs a receive buffer that can hold it (Linux autotunes up to tcp_rmem's maximum, 6 MB or
# more by default): where it cannot, a backlog never stands and TCP is not shed
BACKLOG_MARK = 128 << 10
OVERLOAD_AFTER = 0.05
CLOSE_REASONS = ("peer_closed", "idle", "slow", "limit", "framing", "write_buffer", "error",
                 "connect_failed", "shutdown", "junk")
DIRECTIONS = ("inbound", "outbound")


class TcpStats:
    """Counters of the TCP edge (the per-message counters stay in :class:`~sipwatch.stats.Stats`)."""

    def __init__(self) -> None:
        self.open = [0, 0]  # [inbound, outbound] connections now
        self.opened = [0, 0]
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.messages_in = 0
        self.messages_out = 0
        self.send_dropped = 0  # messages with no connection to go on (gone, or could not be opened)
        self.overload_episodes = 0  # times a connection's backlog stood: its new dialogs shed

    def collect(self):
        g = GaugeMetricFamily("sipwatch_tcp_connections", "SIP over TCP connections open now.", labels=["direction"])
        o = CounterMetricFamily("sipwatch_tcp_connections_opened", "SIP over TCP connections accepted (inbound) or opened (outbound).", labels=["direction"])
        for i, d in enumerate(DIRECTIONS):
            g.add_metric([d], self.open[i])
            o.add_metric([d], self.opened[i])
        yield g
        yield o
        c = CounterMetricFamily("sipwatch_tcp_connections_closed", "SIP over TCP connections closed, by reason (a fixed set).", labels=["reason"])
        for r in CLOSE_REASONS:
            c.add_metric([r], self.closed[r])
        yield c
        yield CounterMetricFamily("sipwatch_tcp_messages_received", "Whole SIP messages framed off TCP connections.", value=self.messages_in)
        yield CounterMetricFamily("sipwatch_tcp_messages_sent", "SIP messages written to TCP connections.", value=self.messages_out)
        yield CounterMetricFamily("sipwatch_tcp_send_dropped", "SIP messages for a TCP destination with no usable connection (closed, or could not be opened).", value=self.send_dropped)
        yield CounterMetricFamily("sipwatch_tcp_overload_episodes", "Times a connection's unread backlog stood longer than --overload-after; new dialogs on it were then answered 503 until it drained.", value=self.overload_episodes)


class TcpEdge:
    def __init__(self, core: ProxyCore, clock, udp_send, max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT, message_timeout: float = MESSAGE_TIMEOUT,
                 overload_after: float = OVERLOAD_AFTER):
        self.core = core
        self.stats = core.stats
        self.tcp_stats = TcpStats()
        self.clock = clock
        self.udp_send = udp_send  # (payload, dest) -> None: outputs the core sends over UDP
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.message_timeout = message_timeout
        self.overload_after = overload_after
        self.overloaded = False  # sip-signaling's connection is behind: new dialogs shed everywhere
        self.shedding_all = 0  # connections (sip-signaling's) whose backlog has that effect
        self.bursts = 0  # connections with messages of a burst waiting for their next turn
        self.udp_overloaded = lambda: False  # the UDP guard's verdict (the owner wires it)
        self.upstream = core.upstream
        self.by_addr: dict[Addr, _Conn] = {}  # peer addresses and aliases -> connection
        self.conns: dict[_Conn, None] = {}  # every connection
        self.silent: dict[_Conn, None] = {}  # accepted, nothing forwarded yet: oldest first
        # every connection by its peer's party (party_of), each party's least recently forwarded from first
        self.by_party: dict[str, dict[_Conn, None]] = {}
        self._crowded: str | None = None  # the party that last gave up a connection to make room
        self.failed_until: dict[Addr, float] = {}
        # an accepted connection's peer -> the sent-by its requests named on its IP (their listening
        # port): where a response goes once that connection is gone (RFC 3261 §18.2.2), kept after
        # it; responses only (a request toward that address is another matter)
        self.sent_by: dict[Addr, Addr] = {}
        self.local: Addr | None = None  # the listen address (outbound connections bind to it)
        self.server: asyncio.AbstractServer | None = None
        self.wiretap = None  # as UdpEdge.wiretap
        self.last_error: str | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False
        self.now = clock()  # when the message being handled arrived (stamps writes as activity)
        # connections whose write buffer held bytes after their last write, with that size, and
        # the sum of those sizes (high until refreshed: a buffer drains without telling us)
        self.unsent: dict[_Conn, int] = {}
        self.unsent_bytes = 0
        self.max_unsent = MAX_WRITE_BUFFERS

    # -- setup ---------------------------------------------------------------------------
    async def open(self, listen: Addr) -> None:
        loop = asyncio.get_running_loop()
        host, port = listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):  # outbound connections may bind the same port
            claim_address(family, socket.SOCK_STREAM, (host, port))  # (but nobody else's)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self.local = sock.getsockname()[:2]
        limit = _raise_fd_limit(self.max_connections + FD_RESERVE)
        if limit is not None and self.max_connections > limit - FD_RESERVE:
            # descriptors would run out before the table is full, and a flood of idle connections
            # then locks every caller out: the eviction that makes room never runs
            self.max_connections = max(1, limit - FD_RESERVE)
        # (the backlog again: asyncio listens on the socket it is given, with 100 by default)
        self.server = await loop.create_server(lambda: _Conn(self, None), sock=sock, backlog=LISTEN_BACKLOG)
        self._sweeper = loop.call_later(SWEEP_EVERY, self._sweep)

    def close(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            conn.shut("shutdown")

    # -- messages in ---------------------------------------------------------------------
    def handle(self, conn: "_Conn", data: bytes) -> None:
        """One whole message off ``conn``. Never raises."""
        core = self.core
        try:
            now = self.now = self.clock()
            src = conn.peer
            self.tcp_stats.messages_in += 1
            since = conn.behind_since
            if since is not None and not conn.shedding and now - since >= self.overload_after:
                self._shed(conn, True)
            if conn.shedding and not core.overloaded:  # its own new dialogs only (see _shed)
                core.overloaded = True
                try:
                    out = core.receive_stream(data, src, now)
                finally:
                    core.overloaded = False
            else:
                out = core.receive_stream(data, src, now)
            useful = False
            for _, dest in out:
                if dest != src:  # forwarded (a local answer goes back to src)
                    useful = True
                    break
            if useful:
                if conn.silent:
                    conn.silent = False
                    self.silent.pop(conn, None)
                group = self.by_party.get(conn.party)
                if group is not None and group.pop(conn, 0) is None:
                    group[conn] = None  # most recently forwarded from last
            elif core.stream_junk:
                conn.junk(1, now)
            alias = core.tcp_alias
            if alias is not None and alias != src:
                self._alias(conn, alias)
            tcp = core.out_tcp
            core.out_tcp = False
            for payload, dest in out:
                if tcp:
                    self.send(payload, dest, conn if dest == src else None)
                else:
                    self.udp_send(payload, dest)
            if self.wiretap is not None:
                failed = tap_copies(self.wiretap, data, src, now, out, "tcp", "tcp" if tcp else "udp")
                if failed is not None:
                    self.last_error = self.stats.failed("hep", failed)  # (as UdpEdge.tap_failed)
        except Exception as exc:  # noqa: BLE001 - a bug costs one message, never the loop
            core.out_tcp = False
            self.last_error = self.stats.failed("datagram", exc)
        core.settle()  # what the core held back until the output had left (never raises)

    def _shed(self, conn: "_Conn", on: bool) -> None:
        """``conn``'s backlog stood past ``overload_after`` (``on``), or ran out. A gateway's
        connection sheds its own new dialogs (``handle``): its backlog is its own sending, and
        the turns keep the other connections' waits short. sip-signaling's connection carries
        the responses of every call: its backlog standing is the proxy's overload, whatever
        causes it (many connections of messages that are never shed, OPTIONS or in-dialog
        requests, can cause it, as they can fill the UDP queue), and new dialogs are shed on
        every connection and over UDP (``core.overloaded``)."""
        conn.shedding = on
        if on:
            self.tcp_stats.overload_episodes += 1
            if conn.is_upstream():
                conn.sheds_all = True
                self.shedding_all += 1
        elif conn.sheds_all:
            conn.sheds_all = False
            self.shedding_all -= 1
        over = self.shedding_all > 0
        if over != self.overloaded:
            self.overloaded = over
            self.core.overloaded = self.stats.overloaded = over or self.udp_overloaded()

    def _alias(self, conn: "_Conn", alias: Addr) -> None:
        """Requests toward ``alias`` (the sent-by a peer wrote, on its connection's IP) take
        ``conn``, the newest connection that claimed it; never the upstream's address, nor an
        address that is another connection's own peer."""
        if conn.inbound and conn.peer != self.upstream and alias != self.upstream \
                and self.sent_by.get(conn.peer) != alias:
            if len(self.sent_by) >= MAX_SENT_BY:
                self.sent_by.clear()  # (rebuilt by the next requests: a flood cannot grow it)
            self.sent_by[conn.peer] = alias
        old = self.by_addr.get(alias)
        if old is conn or alias == self.upstream or (old is not None and old.peer == alias):
            return
        if alias not in conn.aliases:
            if len(conn.aliases) >= MAX_ALIASES:
                return
            conn.aliases.append(alias)
        self.by_addr[alias] = conn

    # -- messages out --------------------------------------------------------------------
    def send(self, payload: bytes, dest: Addr, via: "_Conn | None" = None) -> None:
        """Write ``payload`` to the connection for ``dest`` (``via`` first: the connection the
        request came on), opening one when there is none. Never raises."""
        conn = via if via is not None and via.transport is not None else self.by_addr.get(dest)
        if conn is None and dest in self.sent_by and payload[:8] == b"SIP/2.0 ":
            # the connection a request came on is gone (closed by either side): its response
            # goes to the sent-by its Via named, on the same IP (§18.2.2), not to the port the
            # connection had, where nothing listens
            dest = self.sent_by[dest]
            conn = self.by_addr.get(dest)
        if conn is None:
            if self._closing:
                self.tcp_stats.send_dropped += 1
                return
            until = self.failed_until.get(dest)
            if until is not None and until > self.clock():
                self.tcp_stats.send_dropped += 1
                return
            conn = self._connect(dest)
        conn.write(payload)

    def _connect(self, dest: Addr) -> "_Conn":
        conn = _Conn(self, dest)
        self.by_addr[dest] = conn
        self._admit(conn)
        conn.task = asyncio.ensure_future(self._open_outbound(conn, dest))
        return conn

    async def _open_outbound(self, conn: "_Conn", dest: Addr) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = None
            if dest == self.upstream and self.local is not None:
                sock = await _connect_from(loop, self.local, dest)
            if sock is None:
                sock = await _connect_from(loop, None, dest)
            await loop.create_connection(lambda: conn, sock=sock)
        except (OSError, asyncio.TimeoutError) as exc:
            self.last_error = f"connect {dest[0]}:{dest[1]}: {exc}"[:300]
            self.failed_until[dest] = self.clock() + RECONNECT_BACKOFF
            if len(self.failed_until) > 4096:
                self.failed_until.clear()
            conn.shut("connect_failed")
        except Exception as exc:  # noqa: BLE001
            self.last_error = self.stats.failed("send", exc)
            conn.shut("error")

    # -- the table -----------------------------------------------------------------------
    def _admit(self, conn: "_Conn") -> None:
        """Count a new connection in. When full, close the oldest accepted one none of whose
        messages was forwarded, else the least recently forwarded from of the party that holds the
        most connections (never the upstream's)."""
        conns = self.conns
        silent = self.silent
        while len(conns) >= self.max_connections:
            victim = next(iter(silent)) if silent else self._crowded_out()
            if victim is None:
                break  # (only the upstream's is left: a table of one)
            victim.shut("limit")
            conns.pop(victim, None)  # (shut removed it; these guard a second call)
            silent.pop(victim, None)
        conns[conn] = None
        if conn.inbound:
            silent[conn] = None
        conn.party = party = party_of(conn.peer[0])
        group = self.by_party.get(party)
        if group is None:
            group = self.by_party[party] = {}
        group[conn] = None
        self.tcp_stats.open[0 if conn.inbound else 1] += 1

    def _crowded_out(self) -> "_Conn | None":
        """The connection to close to make room when every one has had a message forwarded: the
        least recently forwarded from of the party that holds the most (one with at least the
        mean does: the last such party is tried first, so the walk over the parties is rare).
        Among parties that hold as many, the one whose candidate was opened last: the first of
        them in the table was the one connected longest, so a flood spread over many addresses,
        a connection each, pushed out the gateway that had carried calls all along (recency of
        use is no better guide: each flood connection's one message is newer than an idle
        gateway's last). A party is an IPv6 /64, not an address: one host holds 2^64 of them,
        and a connection from each had made the gateway's IP the one holding the most."""
        by_party = self.by_party
        keep = self.by_addr.get(self.upstream)
        party = self._crowded
        group = by_party.get(party) if party is not None else None
        if group is None or len(group) * len(by_party) <= len(self.conns):  # (at the mean: a tie, walk)
            party, most, youngest = None, 0, 0.0
            for k, g in by_party.items():
                n = len(g)
                if n < most or n == 1 and keep in g:
                    continue
                at = next(iter(g)).opened_at
                if n > most or at > youngest:
                    party, most, youngest = k, n, at
            if party is None:
                return None
            group = by_party[party]
            self._crowded = party
        for c in group:
            if c is not keep:
                return c
        for c in self.conns:  # (that party had only the upstream's connection)
            if c is not keep:
                return c
        return None

    def _unsent(self, conn: "_Conn", size: int) -> None:
        """``conn``'s write buffer (or, while it connects, its pending messages) holds ``size``
        bytes now. Past ``max_unsent`` in all (as last read), the sum is read afresh from every
        connection that held bytes, and if more than three quarters of the bound are still there,
        the connections holding the most are cut off ("write_buffer") until three quarters are
        left: a quarter of the bound must be written before the next such look, so its cost is
        spread over that."""
        unsent = self.unsent
        self.unsent_bytes += size - unsent.get(conn, 0)
        if size:
            unsent[conn] = size
        else:
            unsent.pop(conn, None)
        if self.unsent_bytes <= self.max_unsent:
            return
        total = 0
        for c in list(unsent):
            t = c.transport
            now = 0 if c.closed else t.get_write_buffer_size() if t is not None else c.pending_bytes
            if now:
                unsent[c] = now
                total += now
            else:
                del unsent[c]
        self.unsent_bytes = total
        if total > self.max_unsent * 3 // 4:  # (so the next look is a quarter of the bound away)
            for c in sorted(unsent, key=unsent.__getitem__, reverse=True):
                if self.unsent_bytes <= self.max_unsent * 3 // 4:
                    break
                c.shut("write_buffer")  # (_forget takes it out of unsent and the sum)

    def _forget(self, conn: "_Conn") -> None:
        if conn.waiting is not None:  # (closed with a burst left: it goes with the connection)
            conn.waiting = None
            self.bursts -= 1
        if conn.behind_since is not None or conn.shedding:
            conn.caught_up()
        self.unsent_bytes -= self.unsent.pop(conn, 0)
        self.silent.pop(conn, None)
        if self.conns.pop(conn, 0) is None:
            self.tcp_stats.open[0 if conn.inbound else 1] -= 1
            group = self.by_party.get(conn.party)
            if group is not None:
                group.pop(conn, None)
                if not group:
                    del self.by_party[conn.party]
        for a in (conn.peer, *conn.aliases):
            if self.by_addr.get(a) is conn:
                del self.by_addr[a]

    def _sweep(self) -> None:
        """Close idle connections and senders of unfinished messages (every SWEEP_EVERY s)."""
        try:
            now = self.clock()
            idle_before = now - self.idle_timeout
            slow_before = now - self.message_timeout
            for conn in list(self.conns):
                if conn.transport is None:
                    continue  # still connecting (CONNECT_TIMEOUT bounds it)
                if conn.partial_since is not None and conn.partial_since < slow_before:
                    conn.shut("slow")
                elif conn.last_active < idle_before:
                    if conn.is_upstream():
                        # kept, as the README promises: closed, sip-signaling's next request came
                        # on a connection of its own; a CRLFCRLF ping (RFC 5626) keeps it open at
                        # the far end and through NAT too
                        conn.write_ping(now)
                    else:
                        conn.shut("idle")
        except Exception as exc:  # noqa: BLE001
            self.last_error = self.stats.failed("tick", exc)
        if not self._closing:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_EVERY, self._sweep)


class _Conn(asyncio.Protocol):
    """One TCP connection, accepted (``peer`` None until connected) or opened toward ``peer``."""

    def __init__(self, edge: TcpEdge, peer: Addr | None):
        self.edge = edge
        self.inbound = peer is None
        self.peer: Addr = peer or ("", 0)
        self.transport: asyncio.Transport | None = None
        self.framer = StreamFramer()
        self.aliases: list[Addr] = []
        self.last_active = edge.clock()
        self.silent = self.inbound  # accepted, nothing forwarded yet (first to make room)
        self.opened_at = self.last_active  # when it was accepted or opened
        self.junk_left = JUNK_BURST  # messages that go nowhere it may still send (JUNK_RATE refills)
        self.junk_at = self.last_active
        self.partial_since: float | None = None
        self.pending: list[bytes] = []  # written before the connection was up
        self.pending_bytes = 0
        self.closed = False
        self.task: asyncio.Future | None = None
        self.waiting: deque[bytes] | None = None  # messages of a burst left for later turns
        self.behind_since: float | None = None  # since when its backlog has not run out (OVERLOAD_AFTER)
        self.shedding = False  # its new dialogs are being refused (counted once an episode)
        self.sheds_all = False  # ... and everyone's (it is sip-signaling's: TcpEdge._shed)
        self.fd = -1  # the socket's descriptor (for the bytes queued unread)
        self.party = ""  # party_of(its peer's IP), set when it is counted in (TcpEdge._admit)

    # -- asyncio callbacks (none raises) --------------------------------------------------
    def connection_made(self, transport) -> None:
        try:
            self.transport = transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                _keepalive(sock)
                self.fd = sock.fileno()
            edge = self.edge
            if self.inbound:
                if edge._closing:
                    self.closed = True
                    transport.abort()
                    return
                name = transport.get_extra_info("peername")
                if not name:  # reset before it was taken: a closed connection, not an error
                    self.closed = True
                    transport.abort()
                    return
                self.peer = (name[0], name[1])
                edge._admit(self)
                old = edge.by_addr.get(self.peer)
                if old is None or old.closed or old.transport is None:
                    edge.by_addr[self.peer] = self
            edge.tcp_stats.opened[0 if self.inbound else 1] += 1
            if self.closed:  # shut while connecting
                transport.abort()
                return
            if self.pending:
                transport.write(b"".join(self.pending))
                edge.tcp_stats.messages_out += len(self.pending)
                self.pending, self.pending_bytes = [], 0
                edge._unsent(self, transport.get_write_buffer_size())
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def data_received(self, data: bytes) -> None:
        try:
            edge = self.edge
            now = edge.clock()
            self.last_active = now
            framer = self.framer
            if len(data) >= BACKLOG_MARK:  # the kernel held at least that much
                if self.behind_since is None:
                    self.behind_since = now
            elif self.behind_since is not None:
                self.caught_up()
            messages = framer.feed(data)
            if framer.idle_bytes:  # line ends between messages: pings, pongs, stray CR or LF
                if framer.pings:  # RFC 5626 §3.5.1: CRLFCRLF ping, CRLF pong
                    edge.stats.keepalives += framer.pings
                    t = self.transport
                    # not while earlier bytes wait unread: a peer that sends pings and never reads
                    # held the proxy's memory without bound (pongs are not messages to cut it off for)
                    if t is not None and not t.get_write_buffer_size():
                        t.write(b"\r\n" * framer.pings)
                    framer.pings = 0
                # every four bytes count as a ping against the junk budget: a stream of bare LF
                # (no ping in it) kept the loop busy and the connection open for good
                charge, framer.idle_bytes = (framer.idle_bytes + 3) // 4, 0
                self.junk(charge, now)
                if self.closed:
                    return
            if self.waiting is not None:  # (reading is paused meanwhile: in case, keep the order)
                self.waiting.extend(messages)
                messages = []
            elif len(messages) > TURN_MAX and len(messages) > (turn := self._turn()):
                # (a read ending in a framing fault too: its messages first, the close after)
                self.waiting = deque(messages[turn:])
                edge.bursts += 1
                messages = messages[:turn]
                t = self.transport
                if t is not None:
                    t.pause_reading()
                asyncio.get_running_loop().call_soon(self._next_turn)
            for m in messages:
                edge.handle(self, m)
                if self.closed:
                    return
            if framer.error is not None:  # the rest of the stream cannot be framed
                if self.waiting is None:  # (else once the burst's last turn is done)
                    self._framing_failed()
                return
            if framer.partial:
                if self.partial_since is None or messages:
                    self.partial_since = now
            else:
                self.partial_since = None
            if self.behind_since is not None and self.waiting is None:
                # a large read of few large messages, handled whole: no burst's end will look
                # (an old mark would otherwise start shedding at the next large read)
                self._look_at_queue(now)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def _next_turn(self) -> None:
        """The next TURN_MAX messages a burst left waiting; reading resumes once none is left."""
        try:
            waiting = self.waiting
            if self.closed or waiting is None:
                return
            edge = self.edge
            turn = self._turn()
            for _ in range(turn if len(waiting) > turn else len(waiting)):
                edge.handle(self, waiting.popleft())
                if self.closed:
                    return
            if waiting:
                asyncio.get_running_loop().call_soon(self._next_turn)
                return
            self.waiting = None
            edge.bursts -= 1
            if self.framer.error is not None:
                self._framing_failed()
                return
            self._look_at_queue(edge.clock())
            t = self.transport
            if t is not None and not t.is_closing():
                t.resume_reading()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def _framing_failed(self) -> None:
        """The stream cannot be framed any further: counted, and the connection closed."""
        stats = self.edge.stats
        stats.parse_errors += 1
        stats.dropped[self.framer.error.reason] += 1
        self.shut("framing")

    def _turn(self) -> int:
        """How many of its messages it handles this turn: TURN_MAX, or, for sip-signaling's
        connection, as many as every other connection with a burst waiting may together (at most
        UPSTREAM_TURN_MAX)."""
        edge = self.edge
        others = edge.bursts - (self.waiting is not None)
        if others > 1 and self.is_upstream():
            return min(TURN_MAX * others, UPSTREAM_TURN_MAX)
        return TURN_MAX

    def is_upstream(self) -> bool:
        """sip-signaling's connection: from its address, or the one the table holds toward it."""
        edge = self.edge
        return self.peer == edge.upstream or self is edge.by_addr.get(edge.upstream)

    def _look_at_queue(self, now: float) -> None:
        """What the kernel holds unread, once what was read is handled: behind from ``now``
        above BACKLOG_MARK, caught up below it."""
        if _unread(self.fd) < BACKLOG_MARK:
            if self.behind_since is not None:
                self.caught_up()
        elif self.behind_since is None:
            self.behind_since = now

    def caught_up(self) -> None:
        """Its backlog ran out (or it closed): no longer behind, no longer shedding."""
        self.behind_since = None
        if self.shedding:
            self.edge._shed(self, False)

    def junk(self, n: int, now: float) -> None:
        """``n`` messages (or pings) that went nowhere: past the budget, the connection is closed
        ("junk"), unless it is the upstream's (its address, or the connection toward it)."""
        left = self.junk_left + (now - self.junk_at) * JUNK_RATE
        self.junk_at = now
        left = (JUNK_BURST if left > JUNK_BURST else left) - n
        self.junk_left = left
        if left < 0:
            if not self.is_upstream():
                self.shut("junk")

    def eof_received(self) -> bool:
        # Closed, or half-closed, by the peer: close our side too (as Kamailio does). Responses
        # on their way then go to the sent-by its requests named (TcpEdge.sent_by, §18.2.2): a
        # peer that closed at once (most do; few half-close) is reached where it listens.
        return False

    def connection_lost(self, exc) -> None:
        try:
            if not self.closed:
                self.closed = True
                self.edge.tcp_stats.closed["peer_closed" if exc is None else "error"] += 1
            self.transport = None
            self.edge._forget(self)
        except Exception as exc2:  # noqa: BLE001
            self._failed(exc2)

    # -- writing and closing ---------------------------------------------------------------
    def write_ping(self, now: float) -> None:
        """A keep-alive ping on an idle connection we keep (not counted as a message)."""
        t = self.transport
        if t is not None and not t.is_closing() and not t.get_write_buffer_size():
            t.write(b"\r\n\r\n")
        self.last_active = now

    def write(self, payload: bytes) -> None:
        edge = self.edge
        t = self.transport
        if self.closed or t is not None and t.is_closing():
            edge.tcp_stats.send_dropped += 1
            return
        if t is None:  # still connecting
            if self.pending_bytes + len(payload) > MAX_PENDING:
                edge.tcp_stats.send_dropped += 1
                return
            self.pending.append(payload)
            self.pending_bytes += len(payload)
            edge._unsent(self, self.pending_bytes)  # (in the sum bounded by MAX_WRITE_BUFFERS)
            return
        try:
            t.write(payload)
            edge.tcp_stats.messages_out += 1
            self.last_active = edge.now
            size = t.get_write_buffer_size()
            if size > MAX_WRITE_BUFFER:
                self.shut("write_buffer")
            elif size or self in edge.unsent:
                edge._unsent(self, size)
        except Exception as exc:  # noqa: BLE001
            edge.tcp_stats.send_dropped += 1
            self._failed(exc)

    def shut(self, reason: str) -> None:
        """Close now (what is unsent is dropped) and count why. Idempotent."""
        if self.closed:
            return
        self.closed = True
        edge = self.edge
        edge.tcp_stats.closed[reason] += 1
        if self.pending:
            edge.tcp_stats.send_dropped += len(self.pending)
            self.pending, self.pending_bytes = [], 0
        edge._forget(self)
        if self.transport is not None:
            self.transport.abort()
        elif self.task is not None and not self.task.done() and reason != "connect_failed":
            self.task.cancel()

    def _failed(self, exc: Exception) -> None:
        try:
            self.edge.last_error = self.edge.stats.failed("datagram", exc)
            self.shut("error")
        except Exception:  # noqa: BLE001
            pass


def _unread(fd: int) -> int:
    """Bytes the kernel holds unread on socket ``fd`` (SIOCINQ); 0 when it cannot tell."""
    if fd < 0:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


async def _connect_from(loop, local: Addr | None, dest: Addr) -> socket.socket | None:
    """A connected non-blocking socket toward ``dest``; bound to ``local`` when given (None when
    that address cannot be used, e.g. the same connection's old one is still in TIME_WAIT)."""
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if local is not None:
            if (":" in local[0]) != (family == socket.AF_INET6):
                sock.close()
                return None
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(local)
        await asyncio.wait_for(loop.sock_connect(sock, dest), CONNECT_TIMEOUT)
        return sock
    except OSError as exc:
        sock.close()
        if local is not None and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EINVAL):
            return None
        raise
    except BaseException:
        sock.close()
        raise


def _keepalive(sock: socket.socket) -> None:
    """TCP keep-alive: a peer that vanished (half-open) is found within about two minutes."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
            opt = getattr(socket, name, None)
            if opt is not None:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _raise_fd_limit(want: int) -> int | None:
    """Room for ``want`` descriptors when the hard limit allows (one per connection); returns
    the descriptor limit now in force (None: unlimited or unknown)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return None if soft == resource.RLIM_INFINITY else soft
    except (ImportError, ValueError, OSError):
        return None


__all__ = ["TcpEdge", "TcpStats", "CLOSE_REASONS"]
