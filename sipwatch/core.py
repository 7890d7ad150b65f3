"""Sans-IO stateless SIP proxy (RFC 3261 §16.11) with trace stamping and RTT accounting.

``ProxyCore.receive_datagram(data, addr, now)`` takes one UDP payload, where it came from and
the current time, and returns the datagrams to send as ``[(bytes, (host, port))]``. It never
reads a clock, never touches a socket and never raises: a message it cannot handle is counted
by reason and dropped (or answered, for 400/403/416/482/483/503/513). The asyncio transport and
pcap replay both drive it. A TCP edge frames each connection's bytes into whole messages
(:mod:`sipwatch.framing`) and hands each to :meth:`ProxyCore.receive_stream`; after either call
``out_tcp`` says whether the output must leave over TCP (see :meth:`ProxyCore.receive_stream`).

Direction: a datagram whose source is the configured upstream (sip-signaling) is "from
signaling"; anything else is "from gateway". Requests from the gateway side always go to the
upstream; requests from the signaling side follow Route, then the Request-URI, but only to a
next hop the policy allows (see :meth:`ProxyCore._allowed`).

Nothing a peer writes decides where the proxy sends, beyond what RFC 3261 lets it:
* ``received``/``rport`` in the sender's Via are always rewritten from the real source
  (§18.2.1, RFC 3581), so a response can only go back to the address the request came from;
* our branch carries a keyed MAC over the reply address and the next hop, so a response is
  relayed only if this proxy (or one with the same ``secret``, before a restart) forwarded the
  request it answers, and only from the address the request went to;
* our Record-Route carries a keyed MAC of the gateway-side party of the dialog, so in-dialog
  requests from signaling reach it after a restart, and a forged Route cannot open a new path;
* names are never resolved: next hops are IP literals or nothing.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import random
from binascii import hexlify
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any, Callable, Final

from . import sipmsg
from .sipmsg import (
    KEEPALIVE_MAX, MAX_CONTENT_LENGTH_DIGITS, MAX_HEADER_LINES, MAX_MESSAGE, SipMessage, SipParseError, Via,
    _sipscan, first_of, header_tag, is_sip_keepalive, parse, parse_via, split_values, uri_hostport,
)
from .correlation import DEFAULT as DEFAULT_CORRELATION, HEADER_NAMES as CORRELATION_HEADERS, parse_kinds
from .state import Call, Tracker, Transaction
from .stats import (
    ACK, CANCEL, DROP_BAD_CONTENT_LENGTH, DROP_BAD_VIA, DROP_INTERNAL_ERROR, DROP_MISSING_HEADER,
    DROP_NEXT_HOP_DENIED, DROP_OUT_OF_RANGE, DROP_STRAY_RESPONSE, DROP_TOO_LARGE,
    DROP_TOO_MANY_HEADERS, DROP_UNROUTABLE, FROM_GATEWAY, FROM_SIGNALING, INVITE, METHOD_INDEX, METHODS,
    OPTIONS, OTHER, Stats,
)
from .tracecontext import TRACE_ID_HEADER, parse_trace_id, parse_traceparent, sampled_by_ratio

Addr = tuple[str, int]
# (Final: compiled, module constants are C statics, not a dict lookup at each use)
BRANCH_PREFIX: Final = b"z9hG4bKsw"
# requests that can create a dialog, so they get our Record-Route (RFC 3261 §16.6 step 4)
DIALOG_CREATING: Final = frozenset((b"INVITE", b"SUBSCRIBE", b"REFER", b"NOTIFY"))
MAX_VIAS: Final = 70  # more Vias than a default Max-Forwards allows hops: not a real path
MAX_ROUTES: Final = 70
MAX_UDP_PAYLOAD: Final = 65507  # IPv4: 65535 - 20 (IP) - 8 (UDP)
# RFC 3261 §18.1.1: a request larger than this (path MTU unknown) goes over TCP when it can
UDP_MTU_LIMIT: Final = 1300
UPSTREAM_UDP, UPSTREAM_TCP, UPSTREAM_UDP_OR_TCP = "udp", "tcp", "udp+tcp"
RETRY_AFTER: Final = 5  # seconds, in 503s sent while draining
GATEWAY_SEEN_MAX: Final = 4096  # gateway-side source addresses remembered for the next-hop policy
GATEWAY_SEEN_TTL: Final = 3600.0
# proven gateway-side addresses kept of one IPv6 /64 (party_of): one host holds the whole prefix, and a
# TCP handshake from each of 4096 of its addresses pushed every real gateway out of the table
GATEWAY_PARTY_MAX: Final = 64
# the counters' method indexes and directions (sipwatch.stats), as C statics too
_METHOD_INDEX: Final[dict[bytes, int]] = METHOD_INDEX
_METHODS: Final[tuple[bytes, ...]] = METHODS
_OTHER: Final[int] = OTHER
_INVITE: Final[int] = INVITE
_ACK: Final[int] = ACK
_CANCEL: Final[int] = CANCEL
_OPTIONS: Final[int] = OPTIONS
_NOTIFY: Final[int] = METHOD_INDEX[b"NOTIFY"]
_FROM_GATEWAY: Final[int] = FROM_GATEWAY
_FROM_SIGNALING: Final[int] = FROM_SIGNALING
# what a malformed request is answered with, when it can be answered at all (RFC 3261 §16.3,
# §18.3: a request whose body is shorter than its Content-Length SHOULD get 400)
_ANSWER_400 = frozenset((DROP_BAD_CONTENT_LENGTH, DROP_OUT_OF_RANGE, DROP_TOO_MANY_HEADERS))
# bytes formatting costs about as much as a hash per call: the texts the request path writes
# for every message are looked up instead (Max-Forwards 0-254, small CSeq numbers), and address
# texts (IPs, ports: few distinct ones per node) are remembered in bounded memos
_MAX_FORWARDS_LINES: Final = tuple(b"Max-Forwards: %d" % i for i in range(255))
_SMALL_DECIMALS: Final = tuple(b"%d" % i for i in range(4096))
_TEXT_MEMO_MAX: Final = 4096
# INVITEs answered 503 (overload, drain), remembered by Call-ID (its hash) and CSeq so that a retransmission
# of one gets the same 503 once the shedding has stopped: forwarded, it would make the callee ring
# for a call its caller was told failed (a caller that got the 503 then meets a 180/200 for it).
# Two generations, the newer replaced when full or older than the span (Timer B, 64*T1: a caller
# stops retransmitting by then); at most 2x the entries, whatever a flood of INVITEs holds.
_REFUSED_MAX: Final = 32768
_REFUSED_SPAN: Final = 32.0
# A transaction keeps the Via value below ours up to this size, so that what it holds does not
# follow the datagram's (a Via of 60 KB kept by each of 200,000 transactions: 12 GB)
_VIA_BELOW_MAX: Final = 1024
# The MACs in one C call each (sipwatch/_sipscan.c: BLAKE2b from a prepared state, the parts
# joined by "|", hex out), the same digests as hashlib's; hashlib when the extension was not built
_c_mac_hex: Final[Callable[[bytes, bytes, tuple[bytes, ...]], bytes | None] | None] = \
    _sipscan.mac_hex if _sipscan else None
_c_request_fields: Final[Callable[[list[bytes], list[bytes]], tuple[
    int, bytes, int, bytes, int, bytes, bytes, bytes, bytes | None, bytes | None, int, int, int] | None] | None] = \
    _sipscan.request_fields if _sipscan else None
_c_set_rport: Final[Callable[[bytes, int], bytes] | None] = _sipscan.set_rport if _sipscan else None
_c_hex_join: Final[Callable[[bytes, int, int, bytes], bytes | None] | None] = \
    _sipscan.hex_join if _sipscan else None
# the response fast path (see ProxyCore._fast_response)
_ResponseParts = tuple[int, bytes, bytes, bytes, int, bytes, bytes | None, bytes, bool]
# a relayed response's bookkeeping held back until ProxyCore.settle: (tx, status, to_tag,
# direction, src, now)
_Deferred = tuple[Transaction | None, int, bytes | None, int, Addr, float]
_c_response: Final[Callable[[bytes, dict[bytes, bytes], bytes, int, int, int, int, int],
                            _ResponseParts | None] | None] = _sipscan.response if _sipscan else None
# the refusal fast path (see ProxyCore._fast_refusal)
_RefusalParts = tuple[bool, bytes, bytes, int, bytes | None, bytes | None]
_c_refusal: Final[Callable[[bytes, dict[bytes, bytes], int, int, int, bytes, bytes, bytes],
                           _RefusalParts | None] | None] = _sipscan.refusal if _sipscan else None
_REFUSAL_STATUS: Final = b"SIP/2.0 503 Service Unavailable"
# how long after a refusal its ACK is looked for on the fast path: 64*T1 (RFC 3261 Timer H, the
# 503's retransmissions), and some; an ACK outside it takes the full path, which absorbs it too
_REFUSAL_ACK_WINDOW: Final = 40.0
_RETRY_AFTER_LINE: Final = b"Retry-After: %d" % RETRY_AFTER


@dataclass(frozen=True)
class CoreConfig:
    """What the pure core needs to know; the CLI builds it from flags and environment."""

    advertise: Addr  # our address as written into Via and Record-Route
    upstream: Addr  # sip-signaling (resolved IP, port)
    record_route: bool = True
    # header(s) the trace context is stamped into, comma-separated; X-Trace-ID gets the bare trace id
    trace_header: str = "traceparent"
    # B2BUA leg correlation (sipwatch.correlation): X-CID, Session-ID, P-Charging-Vector
    correlation_headers: str = DEFAULT_CORRELATION
    sample_ratio: float = 1.0
    # a caller's sampled flag decides (OTEL parentbased_*); False: the ratio decides for joined
    # traces too (plain traceidratio), and the flag written into SIP says that decision
    parent_based: bool = True
    timer_b: float = 32.0
    timer_c: float = 180.0  # INVITE after a provisional (RFC 3261 16.6 step 11), reset by each 1xx
    # key for the MACs in our Via branch and Record-Route (stateless checks that survive a
    # restart when the key is kept); empty: a random key per process
    secret: bytes = b""
    # requests from signaling may go only to gateway-side sources seen, to these networks
    # (ipaddress.ip_network objects), or along a Record-Route this proxy signed
    allow_next_hop: tuple = ()
    max_transactions: int = 200_000
    max_calls: int = 100_000
    max_call_duration: float = 4 * 3600.0
    # how sip-signaling is reached: "udp", "tcp", or "udp+tcp" (UDP, but requests over
    # UDP_MTU_LIMIT bytes go over TCP, RFC 3261 §18.1.1)
    upstream_transport: str = UPSTREAM_UDP


class Dropped(Exception):
    """Raised inside the core to drop a message with a reason (and maybe a local response)."""

    def __init__(self, reason: int, reply: tuple[bytes, Addr] | None = None):
        self.reason = reason
        self.reply = reply


# host bytes -> its canonical IP text, or "" for a host that is not an IP literal
_LITERALS: Final[dict[bytes, str]] = {}
_LITERALS_MAX: Final = 4096


def ip_literal(host: bytes) -> str | None:
    """The canonical text of an IPv4/IPv6 literal (brackets removed), or None for anything
    else: names are never resolved. Memoised (a node talks to few hosts; ``ipaddress`` costs
    about 3 µs a call), in a table that is cleared when full so no input can grow it."""
    known = _LITERALS.get(host)
    if known is not None:
        return known or None
    h = host.strip(b"[]")
    ip = None
    if h and len(h) <= 45 and h.isascii():
        try:
            ip = str(ipaddress.ip_address(h.decode("ascii")))
        except ValueError:
            pass
    if len(_LITERALS) >= _LITERALS_MAX:
        _LITERALS.clear()
    _LITERALS[host] = ip or ""
    return ip


def _trace_line(name: bytes, trace_id: int, span_id: int, sampled: bool, id_only: bool) -> bytes:
    """A trace header line beyond the first stamped one (which keeps its hex per call): the
    traceparent layout, version 00, or the bare trace id (X-Trace-ID)."""
    if id_only:
        return b"%s: %032x" % (name, trace_id)
    return b"%s: 00-%032x-%016x-%s" % (name, trace_id, span_id, b"01" if sampled else b"00")


class ProxyCore:
    def __init__(self, config: CoreConfig, stats: Stats | None = None,
                 randbits=random.getrandbits):
        self.config = config
        self.stats = stats or Stats()
        self.tracker = Tracker(self.stats, config.timer_b, config.max_transactions,
                               config.max_calls, config.max_call_duration,
                               timer_c=config.timer_c)
        self.tracker.release = True  # no reference cycles: see sipwatch.gcpolicy
        self._randbits = randbits
        up_ip = ip_literal(config.upstream[0].encode())
        # compared with socket addresses, which are canonical text
        self.upstream = (up_ip or config.upstream[0], config.upstream[1])
        self.key = blake2b(config.secret or os.urandom(32), digest_size=32).digest()
        self._party_macs: dict[str, bytes] = {}  # Record-Route MAC per gateway-side party
        # the MACs' keyed states (hashlib's, the C MAC's) and the key they were made from, made
        # by _rekey: whoever sets ``key`` (a restarted proxy given the old one) gets MACs under
        # that key from then on
        self._mac_base: Any = None
        self._mac_state = b""
        self._trace_base: Any = None
        self._trace_state = b""
        self._mac_state_key = b""
        self._rekey()
        self.draining = False  # set on SIGTERM: new dialogs get 503 + Retry-After
        # set by the edges while the proxy is behind (UDP receive queues, sip-signaling's TCP
        # backlog); the TCP edge also sets it around one connection's messages while that
        # connection's own backlog stands (sipwatch/tcp.py)
        self.overloaded = False
        self.last_internal_error: str | None = None
        # gateway-side sources requests from signaling may go to (next-hop policy), source IP ->
        # last seen, least recently seen first: those seen (any request: a forged source too) and
        # those proven (they answered a request sent to them, or sent the ACK of a 2xx relayed
        # to them: what a forged source never sees). A flood of new sources pushes out only the
        # first kind.
        self.gateway_seen: dict[str, float] = {}
        self.gateway_proven: dict[str, float] = {}
        self.proven_parties: dict[str, dict[str, None]] = {}  # IPv6 only: a /64's proven addresses
        # proven by a TCP handshake alone, oldest first: the first to go when the table is full
        self.handshake_only: dict[str, None] = {}
        self._text_memo: dict[str | int, bytes] = {}
        self._addr_memo: dict[Addr, Addr] = {}
        self._allowed_cache: dict[str, bool] = {}
        host, port = config.advertise
        h = host.encode()
        if b":" in h:  # IPv6 literal in URIs and Via
            h = b"[" + h + b"]"
        self.adv_host = h
        self.adv_port = port
        self.adv_hostport = b"%s:%d" % (h, port)
        self.via_prefix = b"Via: SIP/2.0/UDP " + self.adv_hostport + b";branch="
        self.record_route_head = b"Record-Route: <sip:" + self.adv_hostport + b";lr;sw="
        self.route_head = self.record_route_head[len(b"Record-Route: "):]
        self.route_plain = b"<sip:" + self.adv_hostport + b";lr>"
        # our Via value up to the branch's fixed prefix, for _own_branch; only when the general
        # parser would read our sent-by back as us
        self.own_via_head: bytes | None = b"SIP/2.0/UDP " + self.adv_hostport + b";branch=" + BRANCH_PREFIX
        try:
            own = parse_via(self.own_via_head + b"0;rport")
            if not self._is_me(own.host, own.port) or b";" in self.adv_hostport:
                self.own_via_head = None
        except SipParseError:
            self.own_via_head = None
        # responses to what this proxy forwarded take _fast_response (tests switch it off to compare)
        self.fast_responses = _c_response is not None and self.own_via_head is not None
        # new INVITEs refused while overloaded or draining, and the ACKs of those refusals, take
        # _fast_refusal (tests switch it off to compare)
        self.fast_refusals = _c_refusal is not None
        self._refusal_acks_until = 0.0  # ACKs are looked for on the fast path until then
        # hash(Call-ID) -> CSeq of INVITEs answered 503 (_refused): the hash, not the Call-ID, so
        # that an entry's size does not follow the datagram's (Call-IDs of 60 KB would hold GBs)
        self._refused_invites: dict[int, int] = {}
        self._refused_before: dict[int, int] = {}  # the generation before
        self._refused_since = 0.0  # when _refused_invites began
        self._refused_last = 0.0  # the last INVITE refused
        # an edge that calls settle() after its sends sets this: see settle()
        self.defer_bookkeeping = False
        self._deferred: _Deferred | None = None
        stamped = [n.strip().encode() for n in config.trace_header.split(",") if n.strip()] or [b"traceparent"]
        self.trace_name = stamped[0]
        lname = self.trace_name.lower()
        # the trace header line: name, then format_traceparent's layout (version 00); X-Trace-ID
        # (jambonz) carries the trace id alone
        self.trace_id_only = lname == TRACE_ID_HEADER
        self.trace_line_fmt = self.trace_name.replace(b"%", b"%%") + (
            b": %032x" if self.trace_id_only else b": 00-%032x-%016x-%s")
        self.trace_line_head = self.trace_name + b": 00-"
        # further headers stamped with the same context: (lowercase name, name, trace id only)
        self.more_trace_headers: list[tuple[bytes, bytes, bool]] = [
            (n.lower(), n, n.lower() == TRACE_ID_HEADER) for n in dict.fromkeys(stamped[1:])
            if n.lower() != lname]
        self.trace_lookup: tuple[bytes, ...] = tuple(dict.fromkeys(
            [n.lower() for n in stamped if n.lower() != TRACE_ID_HEADER] + [b"traceparent", b"x-traceparent"]))
        self.trace_lname = lname
        # the trace headers read but not stamped: one that came in leaves once, with this hop's
        # context (a caller's second copy or another trace there would be read downstream)
        # (lowercase name -> trace id only)
        stamped_l = {n.lower() for n in stamped}
        self.trace_read_only: dict[bytes, bool] = {
            n: n == TRACE_ID_HEADER for n in [*self.trace_lookup, TRACE_ID_HEADER] if n not in stamped_l}
        # every trace header, and tracestate: when none came in, the request needs no clean-up
        self.trace_any: tuple[bytes, ...] = tuple(dict.fromkeys(
            [*self.trace_lookup, TRACE_ID_HEADER, *stamped_l, b"tracestate"]))
        self.trace_owned = frozenset(stamped_l | self.trace_read_only.keys())
        # -- TCP (sipwatch.framing feeds receive_stream; the edge reads out_tcp) ------------
        self.in_tcp = False  # the message being handled arrived over TCP
        self.out_tcp = False  # the output just returned leaves over TCP; the edge resets it
        # the sender's Via sent-by on the connection a TCP request came on (RFC 5923 alias)
        self.tcp_alias: Addr | None = None
        # the stream message just received went nowhere: dropped (counted in stats.dropped) or a
        # keep-alive; the TCP edge holds each connection to a budget of those
        self.stream_junk = False
        self.upstream_tcp = config.upstream_transport == UPSTREAM_TCP
        self.upstream_tcp_large = config.upstream_transport == UPSTREAM_UDP_OR_TCP
        self.via_prefix_tcp = b"Via: SIP/2.0/TCP " + self.adv_hostport + b";branch="
        # Record-Route values: UDP (as before) and TCP (RFC 3261 §18.1.2: transport=tcp makes
        # the peer reach us over TCP; RFC 5658: both, when the two sides differ)
        self.rr_value_tcp = b"<sip:" + self.adv_hostport + b";transport=tcp;lr;sw="
        self.corr_kinds: tuple[int, ...] = parse_kinds(config.correlation_headers)
        # what a new dialog may carry beyond traceparent: one set test rules all of it out
        self.new_dialog_names = frozenset([CORRELATION_HEADERS[k] for k in self.corr_kinds] + [TRACE_ID_HEADER])
        self.new_dialog_list: tuple[bytes, ...] = tuple(sorted(self.new_dialog_names))

    # -- entry points ------------------------------------------------------------------
    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> list[tuple[bytes, Addr]]:
        stats = self.stats
        if self._deferred is not None:
            self.settle()
        try:
            if self.fast_responses and len(data) > 12 and data[0] == 83:  # "S": maybe a status line
                fast = self._fast_response(data, addr, now)
                if fast is not None:
                    return fast
            elif self.fast_refusals and len(data) > 12 and (
                    (data[0] == 73 and (self.overloaded or self.draining)) or  # "I": INVITE
                    (data[0] == 65 and now < self._refusal_acks_until and  # "A": ACK, maybe of a refusal
                     data.find(b";tag=sw") > 0)):
                fast = self._fast_refusal(data, addr, now)
                if fast is not None:
                    return fast
            msg = parse(data)
            if msg.truncated:
                stats.body_truncated += 1
            if msg.method is not None:
                return self._request(msg, data, addr, now)
            return self._response(msg, addr, now)
        except Dropped as d:
            stats.dropped[d.reason] += 1
            self.stream_junk = True
            return [] if d.reply is None else [d.reply]
        except SipParseError as bad:  # (not `exc`: mypyc gives a name one type per function)
            self.stream_junk = True
            if len(data) <= KEEPALIVE_MAX and is_sip_keepalive(data):
                stats.keepalives += 1  # RFC 5626 CRLF/STUN keep-alives, phones' "hello", "jaK"
                return []
            stats.parse_errors += 1
            stats.dropped[bad.reason] += 1
            if bad.reason in _ANSWER_400:
                return self._bad_request(data, addr)
            return []
        except Exception as exc:  # a bug must cost one datagram, never the process
            stats.dropped[DROP_INTERNAL_ERROR] += 1
            self._bug(exc)
            return []

    def receive_stream(self, data: bytes, addr: Addr, now: float) -> list[tuple[bytes, Addr]]:
        """One whole message framed off a TCP connection from ``addr`` (the connection's peer).

        As :meth:`receive_datagram`, plus what a stream changes: responses and local answers go
        back to ``addr`` (the connection, RFC 3261 §18.2.2; the sender's Via gets ``rport`` so a
        restarted proxy finds it too), and ``tcp_alias`` names the sender's Via sent-by when it
        is on the connection's IP, so later requests toward it can reuse the connection."""
        self.in_tcp = True
        self.tcp_alias = None
        self.stream_junk = False
        ip = addr[0]
        try:
            if ip not in self.gateway_proven and ip != self.upstream[0]:
                # a connection's peer completed a handshake: no forged source (once: its requests
                # and relayed responses keep the entry fresh, as over UDP)
                self._prove_gateway(ip, now, True)
            return self.receive_datagram(data, addr, now)
        except Exception as exc:  # a bug must cost one message, never the process
            self._bug(exc)
            return []
        finally:
            self.in_tcp = False

    def settle(self) -> None:
        """The bookkeeping of the last message that ``defer_bookkeeping`` held back, done now.

        With ``defer_bookkeeping`` set, a relayed response's accounting (its transaction's
        answer, the RTT sample, the call's progress and finished records: about half of that
        response's work) is left for this call, which the UDP and TCP edges make right after
        sending the output: the response leaves first. Whatever reads the state calls it first
        too (the next message, the timers, the records' drain), so nothing ever sees the state
        without it. Never raises: a failure counts as the message's, as in receive_datagram."""
        d = self._deferred
        if d is None:
            return
        self._deferred = None
        try:
            self._account(d[0], d[1], d[2], d[3], d[4], d[5])
        except Exception as exc:  # a bug must cost one record, never the process
            self._bug(exc)

    def _bug(self, exc: Exception) -> None:
        """Count an exception the core caught around a message's work, and keep its text."""
        self.last_internal_error = self.stats.failed("datagram", exc)

    def handle_timers(self, now: float) -> None:
        self.settle()
        self.tracker.expire(now)
        if self.gateway_seen or self.gateway_proven:
            self._forget_gateways(now)

    def drain_finished(self, limit: int = 10_000) -> list:
        """Finished ("call", Call) / ("tx", Transaction) records for logs and spans."""
        self.settle()
        q = self.tracker.finished
        out: list = []
        while q and len(out) < limit:
            out.append(q.popleft())
        return out

    # -- MACs --------------------------------------------------------------------------
    def _mac(self, *parts: bytes) -> bytes:
        return self._mac_of(parts)

    def _mac_of(self, parts: tuple[bytes, ...]) -> bytes:
        if self.key is not self._mac_state_key:
            self._rekey()
        if _c_mac_hex is not None:
            mac = _c_mac_hex(self._mac_state, b"|", parts)
            if mac is not None:
                return mac
        h = self._mac_base.copy()  # a copy of the keyed state: cheaper than keying anew each time
        h.update(b"|".join(parts))
        return hexlify(h.digest())

    def _rekey(self) -> None:
        """Both MAC paths' keyed states from ``key``: at start, and whenever ``key`` was set
        since (a restarted proxy given the old one); the Record-Route MACs made before go."""
        self._mac_base = blake2b(digest_size=6, key=self.key)
        self._mac_state = _sipscan.blake2b_state(self.key, 6) if _sipscan else b""
        self._trace_base = blake2b(digest_size=16, key=self.key)  # (dialogs' trace ids)
        self._trace_state = _sipscan.blake2b_state(self.key, 16) if _sipscan else b""
        self._mac_state_key = self.key
        self._party_macs.clear()

    def _party_mac(self, ip: str) -> bytes:
        """The ``sw=`` MAC of our Record-Route for a gateway-side party: one per address,
        remembered (bounded: cleared when full)."""
        if self.key is not self._mac_state_key:
            self._rekey()
        memo = self._party_macs
        mac = memo.get(ip)
        if mac is None:
            if len(memo) >= _TEXT_MEMO_MAX:
                memo.clear()
            mac = memo[ip] = self._mac_of((b"r", ip.encode()))
        return mac

    def _branch_mac(self, via: Via, call_id: bytes, cseq_s: bytes, from_tag: bytes,
                    reply: Addr, hop_ip: str) -> bytes:
        """Binds our branch to the transaction (the sender's branch, or its sent-by for
        pre-RFC 3261 senders), the address responses go back to, and the next hop."""
        b: bytes | None = via.params.get(b"branch")
        if b is not None and b.startswith(b"z9hG4bK"):
            uniq = b
        else:
            uniq = b"%s:%d" % (via.host, via.port or 5060)
        return self._mac_of((b"b", uniq, call_id, cseq_s, from_tag, self._text(reply[0]),
                             self._text(reply[1]), self._text(hop_ip)))

    def _text(self, value: str | int) -> bytes:
        """An address's IP (``str``) or port (``int``) as bytes, remembered (bounded: cleared
        when full; the two kinds of key cannot collide)."""
        memo = self._text_memo
        b = memo.get(value)
        if b is None:
            if len(memo) >= _TEXT_MEMO_MAX:
                memo.clear()
            b = memo[value] = value.encode() if isinstance(value, str) else b"%d" % value
        return b

    def _shared(self, addr: Addr) -> Addr:
        """One tuple for each address seen (bounded like ``_text``): a held transaction keeps
        where its responses go and where it went, and every call from the same gateway would
        otherwise keep copies of the same two (~170 B a call lingering at the state caps)."""
        memo = self._addr_memo
        a = memo.get(addr)
        if a is None:
            if len(memo) >= _TEXT_MEMO_MAX:
                memo.clear()
            a = memo[addr] = addr
        return a

    def _signaling_connection(self, msg: SipMessage) -> bool:
        """A request over a TCP connection from the upstream's IP but another port: whether it is
        sip-signaling's own (a connection it opened, e.g. after the one toward it closed), by its
        top Via's sent-by, which names where responses go should the connection fail (RFC 3261
        §18.2.2): the upstream's address. Taken for a gateway's, its requests went back to
        sip-signaling and never reached the gateway. (A TCP peer's IP cannot be forged; a party
        on sip-signaling's own IP is trusted as it is.)"""
        try:
            i = msg.index(b"via")
            if i < 0:
                return False
            top = parse_via(_via_values(msg.value_at(i), 1)[0])
        except SipParseError:
            return False  # (the request's own checks refuse it below)
        up_ip, up_port = self.upstream
        return (top.port or 5060) == up_port and ip_literal(top.host) == up_ip

    def _invite_over_tcp(self, branch: bytes) -> bool:
        """Whether the INVITE this proxy forwarded with ``branch`` (a CANCEL's and a non-2xx ACK's
        own, §9.1, §17.1.1.3) went over TCP for its size (``upstream_tcp_large``)."""
        tx = self.tracker.transactions.get((branch, b"INVITE"))
        return tx is not None and len(tx.peer) > 2 and tx.peer[2] == "tcp"

    def _dialog_trace_id(self, call_id: bytes) -> int:
        """The trace id of a dialog not joined to an incoming trace: a keyed hash of its Call-ID
        (RFC 3261 §8.1.1.4: unique to the call), so that a sidecar restarted with the same
        ``--secret`` puts the later requests of calls set up before it (a BYE) in the same trace
        (a random id split every such call into two traces). Without the key nobody can tell
        the Call-ID from it; it is as evenly spread as a random id, so sampling by ratio holds."""
        if self.key is not self._mac_state_key:
            self._rekey()
        if _c_mac_hex is not None:  # (a keyed state made once: ~1.5k instructions, hashlib's ~7k)
            got = _c_mac_hex(self._trace_state, b"|", (b"trace", call_id))
            if got is not None:
                return int(got, 16) or 1
        h = self._trace_base.copy()
        h.update(b"trace|" + call_id)
        return int.from_bytes(h.digest(), "big") or 1

    def _local_tag(self, call_id: bytes, from_tag: bytes) -> bytes:
        """The To-tag of a response this proxy makes itself: a MAC, so the ACK that answers
        it is recognised (and absorbed) without keeping state."""
        return b"sw" + self._mac(b"t", call_id, from_tag)

    # -- requests ----------------------------------------------------------------------
    def _request(self, msg: SipMessage, data: bytes, src: Addr, now: float):
        stats = self.stats
        method = msg.method or b""  # (a request: never empty)
        uri = msg.uri or b""
        from_sig = src == self.upstream or (self.in_tcp and src[0] == self.upstream[0]
                                            and self._signaling_connection(msg))
        direction = _FROM_SIGNALING if from_sig else _FROM_GATEWAY
        midx = _METHOD_INDEX.get(method, _OTHER)
        if midx != _OTHER:
            method = _METHODS[midx]  # (the constant, not the datagram's copy: held per transaction)
        stats.requests[midx * 2 + direction] += 1
        tcp_in = self.in_tcp
        if tcp_in:
            stats.requests_tcp[midx * 2 + direction] += 1
        lines, names = msg.lines, msg.names
        is_ack = midx == _ACK

        # every header the proxy reads, in one C call when they are all there and readable;
        # else one by one below, which raises what is missing as it always did
        fields = _c_request_fields(lines, names) if _c_request_fields is not None else None
        if fields is not None:
            via_i, via_value, next_via_i, call_id, cseq_n, cseq_m, from_val, to_val, from_tag_or_none, \
                to_tag, mf_i, hops, route_i = fields
            more_vias = next_via_i >= 0
        else:
            # (msg.index: one C call per header name asked for, present or not)
            via_i = msg.index(b"via")
            if via_i < 0:
                raise Dropped(DROP_MISSING_HEADER)
            via_value = msg.value_at(via_i)
            more_vias = msg.index(b"via", via_i + 1) >= 0
        # (see _count_vias: commas are what is counted; a shorter value cannot hold that many)
        if len(via_value) >= MAX_VIAS and via_value.count(b",") >= MAX_VIAS:
            raise Dropped(DROP_TOO_MANY_HEADERS)
        via_vals = _via_values(via_value, MAX_VIAS)
        if more_vias:
            self._count_vias(msg, via_i)
        top = parse_via(via_vals[0])
        if top.transport != b"UDP" and not tcp_in:
            # over UDP a Via naming TCP (or TLS...) is a lie: its response would go over TCP
            # (§18.2.2) to the source's IP at a port of the sender's choosing, which a forged
            # source turns into connections to anyone, pushing live ones out of the table
            raise Dropped(DROP_BAD_VIA)
        if tcp_in and top.transport != b"TCP":
            # the Via must name the transport the request came on (§18.1.1): one naming UDP had
            # its response sent as a datagram to the TCP connection's port, never on the connection
            raise Dropped(DROP_BAD_VIA)
        if fields is None:
            call_id = msg.call_id()
            cseq_n, cseq_m = msg.cseq()
            if cseq_m != method.upper():
                raise Dropped(DROP_MISSING_HEADER)
            from_val_or_none = msg.get(b"from")
            to_val_or_none = msg.get(b"to")
            if from_val_or_none is None or to_val_or_none is None:
                raise Dropped(DROP_MISSING_HEADER)
            from_val, to_val = from_val_or_none, to_val_or_none
            from_tag_or_none = header_tag(from_val)
            to_tag = header_tag(to_val)
            mf_i = msg.index(b"max-forwards")
            hops = -1
            route_i = msg.index(b"route")
        elif cseq_m != method and cseq_m != method.upper():  # (cseq_m is upper case already)
            raise Dropped(DROP_MISSING_HEADER)
        src_ip, src_port = src
        if tcp_in:
            self._via_over_tcp(top, src_ip)
        # where responses to this request go: the real source (RFC 3261 §18.2.2, RFC 3581)
        reply = _reply_to(top, src)
        from_tag = from_tag_or_none or b""
        has_to_tag = to_tag is not None
        refuse_new = False  # a new non-INVITE dialog while shedding: refused unless already forwarded
        if to_tag is not None:
            if is_ack and to_tag.startswith(b"sw") and \
                    hmac.compare_digest(to_tag, self._local_tag(call_id, from_tag)):
                return []  # the ACK of a non-2xx this proxy answered itself ends here (§17.2.1)
        elif (self.draining or (self.overloaded and midx != _OPTIONS)) and midx != _ACK and midx != _CANCEL \
                and not from_sig:
            # shed new dialogs early, before any costly work: 503 makes the gateway retry
            # elsewhere (RFC 3261 §21.5.4) instead of retransmitting into a full queue. Those of
            # the gateway side only: sip-signaling's own (a B2BUA's second leg of a call admitted
            # before, its outbound calls) carry calls it has taken on; refused, they failed. A
            # retransmitted INVITE of a call admitted before is not new: it goes on (a 503 to it
            # would fail a call the callee may already be answering). Another request with the
            # Call-ID of a request forwarded before may be its retransmission, known only by its
            # branch once its next hop is known: see below (others are refused here, at once)
            if midx != _INVITE and call_id in self.tracker.calls:
                refuse_new = True
            elif midx != _INVITE:
                return self._refuse(msg, top, reply, data, now)
            elif self.tracker.lookup_call(call_id, True, cseq_n) is None:
                return self._refuse(msg, top, reply, data, now, call_id, cseq_n)
        elif midx == _INVITE and (self._refused_invites or self._refused_before) and \
                self._was_refused(call_id, cseq_n, now):
            return self._refuse(msg, top, reply, data, now, call_id, cseq_n)  # (its retransmission)

        if mf_i >= 0:
            if hops < 0:  # (not read yet)
                mf = msg.value_at(mf_i)
                digits = mf.lstrip(b"0") or mf[-1:]  # ("0070" is 70: 1*DIGIT, RFC 3261 §25.1)
                hops = int(digits) if digits.isdigit() and len(digits) <= 3 else 256
            if hops > 255:
                raise Dropped(DROP_OUT_OF_RANGE, self._reply(msg, top, reply, data, 400, b"Bad Max-Forwards"))
            if hops <= 0:
                stats.too_many_hops += 1
                return [] if is_ack else self._local(msg, top, reply, data, 483, b"Too Many Hops")
            lines[mf_i] = _MAX_FORWARDS_LINES[hops - 1]

        cseq_s = _SMALL_DECIMALS[cseq_n] if cseq_n < 4096 else b"%d" % cseq_n
        loop_branch = self._hex(BRANCH_PREFIX, _loop_hash(uri, from_tag, call_id, cseq_s), 12, b".")
        # (how our branch for this request starts: the prefix, the loop tag, a dot)
        # (a single Via value that is not ours cannot be a loop; else two C-level finds rule out
        # almost every request; with one Via line, only its value can hold our Via)
        if (more_vias or len(via_vals) > 1 or self._is_me(top.host, top.port)) and \
                (data if more_vias else via_value).find(loop_branch) >= 0 and \
                data.find(self.adv_hostport) >= 0 and self._looped(msg, loop_branch):
            stats.loops += 1
            return [] if is_ack else self._local(msg, top, reply, data, 482, b"Loop Detected")

        # Route: drop our own entries (we were record-routed), then pick the next hop
        own_sig = None
        next_route = None
        route_tcp = False  # the last of our Route entries removed said transport=tcp
        tcp_sig = None  # ... and carried this signature itself
        if route_i >= 0:
            next_route, own_sig, route_tcp, tcp_sig = self._pop_own_routes(msg, route_i)
            if route_i < via_i:  # Route lines above the Via line went: it moved up
                via_i = msg.index(b"via")
        if from_sig:
            target = next_route if next_route is not None else uri
            try:
                host, port, params = uri_hostport(target)
            except SipParseError:
                stats.unroutable += 1
                if is_ack:
                    raise Dropped(DROP_UNROUTABLE) from None
                raise Dropped(DROP_UNROUTABLE, self._reply(msg, top, reply, data, 416,
                                                           b"Unsupported URI Scheme")) from None
            maddr = params.get(b"maddr")
            ip = ip_literal(maddr or host)
            if ip is not None and (ip, port or 5060) == self.config.advertise:
                stats.loops += 1
                return [] if is_ack else self._local(msg, top, reply, data, 482, b"Loop Detected")
            if ip is None or not self._allowed(ip, own_sig, now):
                if is_ack:
                    raise Dropped(DROP_NEXT_HOP_DENIED)
                raise Dropped(DROP_NEXT_HOP_DENIED, self._reply(msg, top, reply, data, 403,
                                                                b"Next Hop Not Allowed"))
            dest: Addr = (ip, port or 5060)
            party = ip
            # toward the gateway side: what the target URI says, else what our Record-Route
            # facing that side said (RFC 5658)
            uri_transport = params.get(b"transport")
            out_tcp = route_tcp if not uri_transport else uri_transport.lower() == b"tcp"
            if out_tcp and not self._allowed(ip, tcp_sig, now, False):  # (TCP: see _allowed)
                if is_ack:
                    raise Dropped(DROP_NEXT_HOP_DENIED)
                raise Dropped(DROP_NEXT_HOP_DENIED, self._reply(msg, top, reply, data, 403,
                                                                b"Next Hop Not Allowed"))
        else:
            dest = self.upstream
            party = src_ip
            self._saw_gateway(src_ip, now)
            out_tcp = self.upstream_tcp

        tracker = self.tracker
        branch = loop_branch + self._branch_mac(top, call_id, cseq_s, from_tag, reply, dest[0])
        tx_method = cseq_m if midx == _OTHER else method  # (equal: checked above)
        if refuse_new and tracker.transactions.get((branch, tx_method)) is None:
            # (a retransmission of a request forwarded before the shedding began is answered by
            # the next hop: a 503 too would give its transaction two final answers)
            return self._refuse(msg, top, reply, data, now)

        # trace context: one trace per Call-ID, joined from an incoming traceparent
        initial_invite = midx == _INVITE and not has_to_tag
        call = tracker.lookup_call(call_id, initial_invite, cseq_n)
        incoming = None
        trace_in = first_of(names, self.trace_any) >= 0  # (one C call rules them all out)
        if trace_in:
            for name in self.trace_lookup:
                trace_i = msg.index(name)
                if trace_i >= 0:
                    # (two of them: invalid, as W3C Trace Context's own test data reads it)
                    if msg.index(name, trace_i + 1) < 0:
                        incoming = parse_traceparent(msg.value_at(trace_i))
                    if incoming is None:
                        stats.traceparent_invalid += 1
                    break
        if call is None:
            call = self._new_call(msg, call_id, incoming, now, initial_invite, from_val, to_val, src,
                                  initial_invite or has_to_tag)

        if is_ack:
            if not from_sig and to_tag is not None and src_ip not in self.gateway_proven:
                self._proved_gateway(call, to_tag, src_ip, now)
            tx = tracker.ack(midx, method, cseq_n, call, now, self._randbits(64) or 1, direction,
                             self._shared(dest))
        else:
            key = (branch, tx_method)
            held = tracker.transactions.get(key)
            if held is not None:
                tx = held
                tracker.retransmission(tx)
            else:
                parent = call.span_id if call.is_call else call.parent_span_id
                tx = tracker.request(key, midx, method, cseq_n, call, now,
                                     self._randbits(64) or 1, parent, direction, self._shared(dest),
                                     initial_invite)

        # edits: the sender's Via gets the real source, then our Via, Record-Route, trace
        # header, Max-Forwards
        via_vals[0] = _stamp_source(via_vals[0], top, src_ip, src_port)
        lines[via_i] = b"Via: " + b", ".join(via_vals)
        if not is_ack:  # where its responses go, and the Via they must carry back (an ACK has none)
            tx.reply = self._shared(reply)
            if len(via_vals[0]) <= _VIA_BELOW_MAX:  # (else its responses take the MAC check)
                tx.via_below = via_vals[0]
        if self.trace_id_only:
            trace_line = self.trace_line_fmt % tx.trace_id
        else:
            # the trace id's 32 hex digits are written once per call, not once per request
            trace_id = tx.trace_id
            memo = call.trace_hex
            if memo is None or memo[0] != trace_id:
                memo = call.trace_hex = (trace_id, self._hex(self.trace_line_head, trace_id, 32, b"-"))
            trace_line = self._hex(memo[1], tx.span_id, 16, b"-01" if tx.sampled else b"-00")
        trace_i = msg.index(self.trace_lname)
        if trace_i >= 0:
            lines[trace_i] = trace_line
        else:
            lines.append(trace_line)
            names.append(self.trace_lname)
        if self.more_trace_headers:
            self._stamp_more(lines, names, tx.trace_id, tx.span_id, tx.sampled)
        if trace_in:
            via_i = self._trace_once(lines, names, tx.trace_id, tx.span_id, tx.sampled,
                                     incoming is not None and incoming[0] == tx.trace_id, via_i)
        # new lines above the top Via, top to bottom: our Via, Max-Forwards if missing,
        # Record-Route if there is none yet (else it goes above the first Record-Route)
        via_line = (self.via_prefix_tcp if out_tcp else self.via_prefix) + branch + b";rport"
        above_via = [via_line]
        if mf_i < 0:
            above_via.append(b"Max-Forwards: 70")
        rr_i = -1
        rr_line = b""
        rr_mac = b""
        # (a NOTIFY in any case: the one that comes before the SUBSCRIBE's 2xx creates the
        # subscriber's dialog, and its route set, with a To tag already; RFC 6665 §4.3)
        if self.config.record_route and (method in DIALOG_CREATING and not has_to_tag or midx == _NOTIFY):
            rr_mac = self._party_mac(party)
            if out_tcp or tcp_in:
                rr_line = self._record_route(rr_mac, out_tcp, tcp_in)
            else:
                rr_line = self.record_route_head + rr_mac + b">"
            rr_i = msg.index(b"record-route")
            if rr_i < 0:
                above_via.append(rr_line)
        if rr_i > via_i:
            lines.insert(rr_i, rr_line)
        if len(above_via) == 1:
            lines.insert(via_i, via_line)
        else:
            lines[via_i:via_i] = above_via
        if 0 <= rr_i < via_i:
            lines.insert(rr_i, rr_line)
        out = msg.to_bytes()
        if not out_tcp and self.upstream_tcp_large and not from_sig and (
                len(out) > UDP_MTU_LIMIT or (midx == _CANCEL or is_ack) and self._invite_over_tcp(branch)):
            # RFC 3261 §18.1.1: too large for UDP without fragments; the upstream takes TCP too.
            # A CANCEL, and the ACK of a non-2xx, go as their INVITE went (§9.1, §17.1.1.3: the
            # same branch, transport and destination; over UDP Kamailio's tm matched no
            # transaction and answered 481, and the callee rang on)
            out_tcp = True
            lines[lines.index(via_line)] = self.via_prefix_tcp + branch + b";rport"
            if rr_line:
                lines[lines.index(rr_line)] = self._record_route(rr_mac, True, tcp_in)
            out = msg.to_bytes()
        if out_tcp:
            self.out_tcp = True
            tx.peer = (dest[0], dest[1], "tcp")  # network.transport of its span
        elif len(out) > MAX_UDP_PAYLOAD:
            if is_ack:
                raise Dropped(DROP_TOO_LARGE)
            raise Dropped(DROP_TOO_LARGE, self._reply(msg, top, reply, data, 513, b"Message Too Large"))
        return [(out, dest)]

    def _count_vias(self, msg: SipMessage, via_i: int) -> None:
        """Raise if the Via values, across every Via line, are more than MAX_VIAS.

        Values are counted by their commas, as a next hop that splits Via values counts them: a
        quoted string (which a Via value has no place for outside a rare parameter) cannot hide
        values from the limit."""
        n = 0
        for i, name in enumerate(msg.names):
            if name == b"via":
                n += msg.value_at(i).count(b",") + 1
                if n > MAX_VIAS:
                    raise Dropped(DROP_TOO_MANY_HEADERS)

    @staticmethod
    def _hex(head: bytes, value: int, digits: int, tail: bytes) -> bytes:
        """``head + b"%0{digits}x" % value + tail`` (one C call when the extension is built)."""
        if _c_hex_join is not None:
            out = _c_hex_join(head, value, digits, tail)
            if out is not None:
                return out
        return head + b"%0*x" % (digits, value) + tail

    def _record_route(self, mac: bytes, out_tcp: bool, in_tcp: bool) -> bytes:
        """Our Record-Route line when TCP is on either side: one value for the transport of
        both sides, or two when they differ (RFC 5658), the one facing the next hop on top."""
        udp = self.route_head + mac + b">"
        tcp = self.rr_value_tcp + mac + b">"
        if out_tcp == in_tcp:
            return b"Record-Route: " + (tcp if out_tcp else udp)
        if out_tcp:
            return b"Record-Route: " + tcp + b", " + udp
        return b"Record-Route: " + udp + b", " + tcp

    def _stamp_more(self, lines: list[bytes], names: list[bytes], trace_id: int, span_id: int,
                    sampled: bool) -> None:
        """The trace context in the further ``--trace-header`` names (e.g. X-Traceparent too)."""
        for lname, name, id_only in self.more_trace_headers:
            line = _trace_line(name, trace_id, span_id, sampled, id_only)
            if lname in names:
                lines[names.index(lname)] = line
            else:
                lines.append(line)
                names.append(lname)

    def _trace_once(self, lines: list[bytes], names: list[bytes], trace_id: int, span_id: int,
                    sampled: bool, keep_state: bool, via_i: int) -> int:
        """Each trace header leaves once, with this hop's context: further copies of the stamped
        ones go, and one read but not stamped (X-Traceparent, X-Trace-ID) is rewritten, so no
        other trace rides along to be read downstream. ``tracestate`` goes with the trace it
        belongs to (``keep_state``: this request continues the trace of the traceparent that
        came in), else it is dropped (W3C Trace Context: not without a valid traceparent). Lines
        are deleted from ``lines`` and ``names`` alike, in one pass (a deletion each was
        quadratic in a datagram of thousands of copies); the top Via's index after it is
        returned."""
        owned = self.trace_owned
        read_only = self.trace_read_only
        seen: set[bytes] = set()
        drop: list[int] = []
        for j in range(len(names)):
            n = names[j]
            if n in owned:
                if n not in seen:
                    seen.add(n)
                    id_only = read_only.get(n)
                    if id_only is not None:  # (the name as it came, this hop's context)
                        line = lines[j]
                        lines[j] = _trace_line(line[:line.index(b":")], trace_id, span_id, sampled, id_only)
                    continue
            elif n != b"tracestate" or keep_state:
                continue
            drop.append(j)
        if drop:
            gone = set(drop)
            lines[:] = [x for j, x in enumerate(lines) if j not in gone]
            names[:] = [x for j, x in enumerate(names) if j not in gone]
            via_i -= sum(1 for j in drop if j < via_i)
        return via_i

    def _new_call(self, msg, call_id, incoming, now, is_call, from_val, to_val,
                  src: tuple[str, int] = ("", 0), dialog: bool = False) -> Call:
        """A new call entry and its trace: joined from an incoming trace header, else from the call
        a correlation header names (a B2BUA's further leg: same trace, its call span a child of the
        named leg's), else a new trace: for a dialog (an initial INVITE, or an in-dialog request
        of a dialog this process does not hold) the one its Call-ID gives under the key
        (:meth:`_dialog_trace_id`), else a random one."""
        names: list[bytes] = msg.names
        named: Call | None = None
        by = ""
        keys: list[bytes] | None = None
        if first_of(names, self.new_dialog_list) >= 0:
            if is_call and self.corr_kinds:
                keys = []
                named, by = self.tracker.correlate(self.corr_kinds, msg, names, call_id, src, keys)
            if incoming is None and TRACE_ID_HEADER in names:  # jambonz: a trace id, no parent span
                tid = parse_trace_id(msg.value_at(names.index(TRACE_ID_HEADER)))
                if tid is None:
                    self.stats.traceparent_invalid += 1
                else:
                    incoming = (tid, 0, -1)
        ratio = self.config.sample_ratio
        if incoming is not None:
            trace_id, parent, flags = incoming
            sampled = bool(flags & 1) if flags >= 0 and self.config.parent_based \
                else ratio >= 1.0 or sampled_by_ratio(trace_id, ratio)
            if not parent:
                parent = None
            self.stats.traceparent_joined += 1
        elif named is not None:
            trace_id, parent, sampled = named.trace_id, named.span_id, named.sampled
        else:
            trace_id = self._dialog_trace_id(call_id) if dialog else self._randbits(128) or 1
            parent = None
            sampled = ratio >= 1.0 or sampled_by_ratio(trace_id, ratio)  # (the ratio test inlined)
        tracker = self.tracker
        call = tracker.new_call(call_id, trace_id, self._span_id(), parent, sampled, now,
                                is_call, from_val, to_val, msg.uri)
        if named is not None:
            # the B2BUA's own latency gets a span only inside the named leg's trace
            tracker.join_leg(call, named, by, self._span_id() if trace_id == named.trace_id else 0)
        if keys:
            for k in keys:
                tracker.index_call(call, k)
        return call

    def _span_id(self) -> int:
        return self._randbits(64) or 1

    def _looped(self, msg: SipMessage, want: bytes) -> bool:
        """RFC 3261 §16.3 step 4: one of our Vias whose branch starts as ``want`` (the prefix and
        this request's loop tag) ⇒ loop (else a spiral)."""
        mine = self.adv_hostport
        lines, names = msg.lines, msg.names
        for i, name in enumerate(names):
            if name != b"via" or lines[i].find(mine) < 0 or lines[i].find(want) < 0:
                continue
            for v in split_values(msg.value_at(i), MAX_VIAS):
                if v.find(mine) >= 0:
                    via = parse_via(v)
                    if self._is_me(via.host, via.port) and (via.branch or b"").startswith(want):
                        return True
        return False

    def _is_me(self, host: bytes, port: int | None) -> bool:
        return host == self.adv_host and (port or 5060) == self.adv_port

    def _pop_own_routes(self, msg: SipMessage, i: int) -> tuple[bytes | None, bytes | None, bool, bytes | None]:
        """Remove Route values naming us from the top (the first Route line is line ``i``);
        return the next Route value, if any, the ``sw`` signature of the last of ours removed,
        whether that one said ``transport=tcp``, and its own signature if it said so (a value
        without one, added below ours by a peer, does not borrow ours for that). Linear: every
        Route line is split once and rewritten at most once."""
        names, lines = msg.names, msg.lines
        sig = None
        tcp = False
        tcp_sig = None
        seen = 0
        # the usual case: the first Route line is exactly one of our Record-Route values
        # (``<sip:ADV;lr;sw=MAC>``), as the UA copied it: removed without parsing it
        v = msg.value_at(i)
        head = self.route_head
        if v.startswith(head) and len(v) == len(head) + 13 and v.endswith(b">") and \
                v[len(head):-1].isalnum():
            sig = v[len(head):-1]
            lines.pop(i)
            names.pop(i)
            seen = 1
        elif v == self.route_plain:  # ``<sip:ADV;lr>``: ours, written by hand or by a peer
            lines.pop(i)
            names.pop(i)
            seen = 1
        while True:
            i = msg.index(b"route", i)  # the next Route line
            if i < 0:
                break
            values = split_values(msg.value_at(i), MAX_ROUTES)
            seen += len(values)
            if seen > MAX_ROUTES:
                raise Dropped(DROP_TOO_MANY_HEADERS)
            k = 0
            for v in values:
                try:
                    host, port, params = uri_hostport(v)
                except SipParseError:
                    break
                if not self._is_me(host, port):
                    break
                own = params.get(b"sw")
                sig = own or sig
                transport = params.get(b"transport")
                tcp = transport is not None and transport.lower() == b"tcp"
                tcp_sig = own if tcp else None
                k += 1
            if k == len(values):  # the whole line was ours
                lines.pop(i)
                names.pop(i)
                continue
            if k:
                lines[i] = b"Route: " + b", ".join(values[k:])
            return values[k], sig, tcp, tcp_sig
        return None, sig, tcp, tcp_sig

    # -- next-hop policy ---------------------------------------------------------------
    def _saw_gateway(self, ip: str, now: float) -> None:
        seen = self.gateway_proven
        if ip not in seen:
            seen = self.gateway_seen
            if ip not in seen and len(seen) >= GATEWAY_SEEN_MAX:
                del seen[next(iter(seen))]
        seen.pop(ip, None)  # (re-inserted: each dict stays ordered by last activity)
        seen[ip] = now

    def _proved_gateway(self, call: Call, to_tag: bytes, ip: str, now: float) -> None:
        """An ACK from the gateway side, from ``ip``: if it acknowledges a 2xx this proxy relayed
        to ``ip`` (its To tag; the INVITE's reply address), ``ip`` received what was sent to it,
        so it is no forged source."""
        tag = hash(to_tag)
        txs = call.transactions
        for k in range(len(txs) - 1, max(len(txs) - 5, 0) - 1, -1):  # (its INVITE is recent)
            tx = txs[k]
            tags = tx.tags
            reply = tx.reply
            if tx.midx == _INVITE and tags is not None and tag in tags and reply is not None and reply[0] == ip:
                self._prove_gateway(ip, now)
                return

    def _prove_gateway(self, ip: str, now: float, handshake: bool = False) -> None:
        """``ip`` answered what this proxy sent it (a response relayed from it passed the branch
        check; an ACK of a 2xx relayed to it), or (``handshake``) completed a TCP handshake: a
        proven gateway-side source. A full table lets go of an address proven by a handshake
        alone first: an attacker can open connections from thousands of addresses (a /64 holds
        2^64), but cannot make each answer what the proxy sent it without carrying calls."""
        proven = self.gateway_proven
        if ip in proven:
            del proven[ip]  # (re-inserted: ordered by last activity)
            if self.handshake_only:
                self.handshake_only.pop(ip, None)
        else:
            self.gateway_seen.pop(ip, None)
            if len(proven) >= GATEWAY_SEEN_MAX:
                weak = self.handshake_only
                self._unprove(next(iter(weak)) if weak else next(iter(proven)))
            if ":" in ip:
                self._prove_in_party(ip)
            if handshake:
                self.handshake_only[ip] = None
        proven[ip] = now

    def _prove_in_party(self, ip: str) -> None:
        """A new proven IPv6 address joins its /64: past GATEWAY_PARTY_MAX of them, the one of
        that prefix active least recently goes (not the table's oldest: any other party's)."""
        party = party_of(ip)
        members = self.proven_parties.get(party)
        if members is None:
            members = self.proven_parties[party] = {}
        elif len(members) >= GATEWAY_PARTY_MAX:  # (the dict stays: one of 64 goes)
            proven = self.gateway_proven
            self._unprove(min(members, key=lambda m: proven.get(m, 0.0)))
        members[ip] = None

    def _unprove(self, ip: str) -> None:
        self.gateway_proven.pop(ip, None)
        self.handshake_only.pop(ip, None)
        if ":" in ip:
            party = party_of(ip)
            members = self.proven_parties.get(party)
            if members is not None:
                members.pop(ip, None)
                if not members:
                    del self.proven_parties[party]

    def _forget_gateways(self, now: float) -> None:
        limit = now - GATEWAY_SEEN_TTL
        for seen in (self.gateway_seen, self.gateway_proven):
            old: list[str] = []
            for ip, t in seen.items():  # (one walk: each first key after a deletion is a walk)
                if t > limit:
                    break
                old.append(ip)
            proven = seen is self.gateway_proven  # (its entries leave their /64's count too)
            for ip in old:
                if proven:
                    self._unprove(ip)
                else:
                    del seen[ip]

    def _allowed(self, ip: str, route_sig: bytes | None, now: float, seen_too: bool = True) -> bool:
        """A request from signaling may go to a gateway-side source seen lately, to a network
        the operator allowed, or to the party our signed Record-Route names.

        Over TCP (``seen_too`` False, ``route_sig`` only from an entry of ours that says TCP) the
        edge opens a connection to the port the message names when it has none, so only a source
        proven to receive what is sent to it counts (it answered, ACKed a 2xx relayed to it, or
        sent over a TCP connection: a handshake), and a signed entry only when it says TCP (the
        dialog came over a connection from that party; also after a restart). A source only
        seen, or the party of an entry that says UDP, is what a forged datagram makes: a forged
        INVITE's Contact had the proxy connect to any IP and port and write the BYE there."""
        t = self.gateway_proven.get(ip)
        if t is None and seen_too:
            t = self.gateway_seen.get(ip)
        if t is not None and t > now - GATEWAY_SEEN_TTL:
            return True
        if route_sig is not None and hmac.compare_digest(route_sig, self._party_mac(ip)):
            return True
        return self._in_allowed_nets(ip)

    def _in_allowed_nets(self, ip: str) -> bool:
        nets = self.config.allow_next_hop
        if not nets:
            return False
        cache = self._allowed_cache
        ok = cache.get(ip)
        if ok is None:
            addr = ipaddress.ip_address(ip)
            ok = any(addr in net for net in nets)
            if len(cache) >= 10_000:
                cache.clear()
            cache[ip] = ok
        return ok

    # -- local responses ---------------------------------------------------------------
    def _local(self, msg: SipMessage, top: Via, reply: Addr, data: bytes, status: int,
               reason: bytes, extra: bytes | None = None) -> list[tuple[bytes, Addr]]:
        r = self._reply(msg, top, reply, data, status, reason, extra)
        return [] if r is None else [r]

    def _reply(self, msg: SipMessage, top: Via, reply: Addr, data: bytes, status: int,
               reason: bytes, extra: bytes | None = None) -> tuple[bytes, Addr] | None:
        """A response generated here, sent to the request's real source. Over UDP never larger
        than the request: a spoofed source gains nothing by asking for one (no amplification).
        Over TCP, where the handshake proved the source, a larger one is sent: dropped, it left
        a terse request's sender waiting 32 s for its timer (nothing retransmits over TCP)
        instead of its 483 or 503."""
        if msg.method == b"ACK":
            return None
        out = [b"SIP/2.0 %d %s" % (status, reason)]
        first_via = True
        tag: bytes | None = None  # (computed once: a request may repeat To up to the line cap)
        for i, n in enumerate(msg.names):
            if n == b"via":
                if first_via:
                    vals = split_values(msg.value_at(i))
                    vals[0] = _stamp_source(vals[0], top, reply[0], reply[1])
                    out.append(b"Via: " + b", ".join(vals))
                    first_via = False
                else:
                    out.append(msg.lines[i])
            elif n in (b"from", b"call-id", b"cseq"):
                out.append(msg.lines[i])
            elif n == b"to":
                line = msg.lines[i]
                if header_tag(msg.value_at(i)) is None:
                    if tag is None:
                        tag = b";tag=" + self._local_tag(msg.get(b"call-id") or b"",
                                                         header_tag(msg.get(b"from")) or b"")
                    line += tag
                out.append(line)
        if extra:
            out.append(extra)
        out.append(b"Content-Length: 0")
        resp = b"\r\n".join(out) + b"\r\n\r\n"
        if len(resp) > len(data) and not self.in_tcp:
            return None
        if self.in_tcp:
            self.out_tcp = True  # back over the connection the request came on
        return resp, reply

    def _bad_request(self, data: bytes, src: Addr) -> list[tuple[bytes, Addr]]:
        """400 for a request that parses loosely but failed a strict check (RFC 3261 §18.3:
        body shorter than Content-Length; numbers out of range), when it can be answered."""
        try:
            msg = parse(data, check_length=False)
            if msg.method is None or msg.method == b"ACK" or b"via" not in msg.names:
                return []
            if any(msg.get(h) is None for h in (b"from", b"to", b"call-id", b"cseq")):
                return []
            vals = split_values(msg.value_at(msg.index(b"via")))
            top = parse_via(vals[0])
            reply = (src[0], src[1]) if b"rport" in top.params or self.in_tcp else (src[0], top.port or 5060)
            return self._local(msg, top, reply, data, 400, b"Bad Request")
        except (SipParseError, ValueError, IndexError):
            return []

    # -- responses ---------------------------------------------------------------------
    def _response(self, msg: SipMessage, src: Addr, now: float):
        stats = self.stats
        status = msg.status
        if status > 699:
            raise Dropped(DROP_OUT_OF_RANGE)
        direction = _FROM_SIGNALING if src == self.upstream else _FROM_GATEWAY
        stats.responses[(min(status // 100, 6) - 1) * 2 + direction] += 1
        names = msg.names
        via_i = msg.index(b"via")
        if via_i < 0:
            raise Dropped(DROP_MISSING_HEADER)
        vals = _via_values(msg.value_at(via_i), MAX_VIAS)
        branch = self._own_branch(vals[0])
        if branch is None:
            top = parse_via(vals[0])
            branch = top.branch
            if not (branch and branch.startswith(BRANCH_PREFIX) and self._is_me(top.host, top.port)):
                stats.stray_responses += 1  # RFC 3261 §16.7 step 3: not ours, drop
                raise Dropped(DROP_STRAY_RESPONSE)
        if len(vals) > 1:
            next_raw = vals[1]
            rest = vals[1:]
        else:
            i = msg.index(b"via", via_i + 1)
            if i < 0:
                stats.stray_responses += 1
                raise Dropped(DROP_STRAY_RESPONSE)
            next_raw = _via_values(msg.value_at(i), 0)[0]
            rest = None
        call_id = msg.call_id()
        cseq_n, cseq_m = msg.cseq()
        tx = self._held(branch, cseq_m, cseq_n, call_id, next_raw, src)
        if tx is not None:
            reply = tx.reply
        else:  # stateless check (after a restart, or anything unusual)
            next_via = parse_via(next_raw)
            reply = _reply_address(next_via)
            from_tag = header_tag(msg.get(b"from")) or b""
            dot = branch.rfind(b".")
            mac = self._branch_mac(next_via, call_id, b"%d" % cseq_n, from_tag, reply or ("", 0), src[0])
            if reply is None or dot < 0 or not hmac.compare_digest(branch[dot + 1:], mac):
                stats.stray_responses += 1  # not a request we forwarded, or not from where it went
                raise Dropped(DROP_STRAY_RESPONSE)
            # ours, proven: when the table still holds its request, the response is accounted
            # to it (the next hop may write the sender's Via anew, parameters reordered or
            # spaced, equal by §20.42 but not byte for byte: every such response went
            # unaccounted, its RTT never taken, its transaction timed out)
            tx = self._answered(branch, cseq_m, cseq_n, call_id, src)
        if tx is not None and tx.direction == direction:
            # the side its request went to answers it (see _fast_response): counted on that side
            klass = (min(status // 100, 6) - 1) * 2
            stats.responses[klass + direction] -= 1
            direction = _FROM_GATEWAY if direction == _FROM_SIGNALING else _FROM_SIGNALING
            stats.responses[klass + direction] += 1
        to_tag = header_tag(msg.get(b"to"))
        if rest is not None:
            msg.lines[via_i] = b"Via: " + b", ".join(rest)
        else:
            msg.lines.pop(via_i)
            names.pop(via_i)
        self._relayed(tx, status, to_tag, next_raw, direction, src, now)
        return [(msg.to_bytes(), reply)]

    def _held(self, branch: bytes, cseq_m: bytes, cseq_n: int, call_id: bytes, next_raw: bytes,
              src: Addr) -> Transaction | None:
        """The transaction a response answers when this proxy still holds it, the response came
        from where the request went and carries the sender's Via exactly as written (what the
        branch MAC proves, already known), else None: the caller then checks statelessly."""
        tx = self._answered(branch, cseq_m, cseq_n, call_id, src)
        return tx if tx is not None and tx.via_below == next_raw else None

    def _answered(self, branch: bytes, cseq_m: bytes, cseq_n: int, call_id: bytes,
                  src: Addr) -> Transaction | None:
        """The held transaction of this branch and CSeq when the response came from where its
        request went and names its Call-ID and CSeq number, else None."""
        tx = self.tracker.transactions.get((branch, cseq_m))
        if tx is not None and tx.peer[0] == src[0] and tx.cseq == cseq_n and tx.call.call_id == call_id:
            return tx
        return None

    def _relayed(self, tx: Transaction | None, status: int, to_tag: bytes | None, next_raw: bytes,
                 direction: int, src: Addr, now: float) -> None:
        """What relaying a response does besides the send, on both response paths: the
        accounting (:meth:`_account`), now or, with ``defer_bookkeeping``, at :meth:`settle`
        after the send; TCP for a request that came over TCP."""
        if self.defer_bookkeeping:
            self._deferred = (tx, status, to_tag, direction, src, now)
        else:
            self._account(tx, status, to_tag, direction, src, now)
        if not next_raw.startswith(b"SIP/2.0/UDP") and (
                next_raw.startswith(b"SIP/2.0/TCP") or parse_via(next_raw).transport == b"TCP"):
            self.out_tcp = True  # the request came over TCP: so goes its response (§18.2.2)

    def _account(self, tx: Transaction | None, status: int, to_tag: bytes | None, direction: int,
                 src: Addr, now: float) -> None:
        """A relayed response's bookkeeping: the gateway's last-seen time and the held
        transaction's answer (RTT, call progress, finished records)."""
        if direction == _FROM_GATEWAY:  # (relayed: it answers a request sent to that address)
            self._prove_gateway(src[0], now)
        if tx is not None:  # (the table is as it was when tx was looked up)
            self.tracker.response_to(tx, status, now, to_tag)

    def _fast_response(self, data: bytes, src: Addr, now: float) -> list[tuple[bytes, Addr]] | None:
        """:meth:`_response` of the common response, read and edited in one C call on the datagram
        (``_sipscan.response``: no line lists, no re-join), when it answers a request this proxy
        still holds, exactly as that request left. None, having changed nothing, for anything
        else: the caller then parses the datagram and takes the full path, which gives every
        other outcome (stateless check, strays, drops). What is done here is what the full path
        does for such a response, in the same order."""
        head = self.own_via_head
        if head is None or _c_response is None:
            return None
        got = _c_response(data, sipmsg._NAME_CACHE, head, len(BRANCH_PREFIX), MAX_HEADER_LINES,
                          MAX_CONTENT_LENGTH_DIGITS, MAX_VIAS, MAX_MESSAGE)
        if got is None:
            return None
        status, branch, next_raw, call_id, cseq_n, cseq_m, to_tag, out, truncated = got
        tx = self._held(branch, cseq_m, cseq_n, call_id, next_raw, src)
        if tx is None:
            return None
        stats = self.stats
        if truncated:
            stats.body_truncated += 1
        # the side the request went to answers it: over TCP sip-signaling may answer on a
        # connection of its own (its IP, another port) when ours is gone (§18.2.2)
        direction = _FROM_SIGNALING if tx.direction == _FROM_GATEWAY else _FROM_GATEWAY
        stats.responses[(min(status // 100, 6) - 1) * 2 + direction] += 1
        self._relayed(tx, status, to_tag, next_raw, direction, src, now)
        return [(out, tx.reply)]

    def _via_over_tcp(self, top: Via, src_ip: str) -> None:
        """A request's top Via over TCP: responses take the connection, so its address is the
        reply address (``rport`` asked for, the Via then gets the connection's port), and the
        sender's sent-by on the connection's IP is learnt as an alias (``tcp_alias``)."""
        if b"rport" not in top.params:
            top.params[b"rport"] = None
        if top.port and ip_literal(top.host) == src_ip:
            self.tcp_alias = (src_ip, top.port)

    def _fast_refusal(self, data: bytes, src: Addr, now: float) -> list[tuple[bytes, Addr]] | None:
        """:meth:`_request` of a new INVITE turned away (503 + Retry-After) while overloaded or
        draining, and of the ACK that answers such a refusal, read in one C call on the datagram
        (``_sipscan.refusal``): past capacity every refused call costs these two messages, and
        the full path parses each into line lists first. None, having changed nothing, for
        anything else (another shape, an ACK whose To tag is not our MAC): the caller then takes
        the full path. The caller looks for ACKs here only for a while after a refusal (scanning
        every ACK for an "sw" tag cost ~0.7 us in process). What is done here is what the full
        path does for such a request, in the same order, so the counters and the bytes sent are
        the same."""
        refusal = _c_refusal
        if refusal is None:
            return None
        if self.key is not self._mac_state_key:
            self._rekey()
        got = refusal(data, sipmsg._NAME_CACHE, MAX_HEADER_LINES, MAX_CONTENT_LENGTH_DIGITS, MAX_MESSAGE,
                      self._mac_state, _REFUSAL_STATUS, _RETRY_AFTER_LINE)
        if got is None:
            return None
        is_ack, via_value, call_id, cseq_n, head, tail = got
        tcp_in = self.in_tcp
        if tcp_in:
            if via_value[:12].upper() != b"SIP/2.0/TCP " or src[0] == self.upstream[0] and src != self.upstream:
                return None  # (the full path reads those: another transport is refused; the Via
                # of a connection from sip-signaling's IP says whose it is)
        elif via_value[:12] != b"SIP/2.0/UDP ":
            return None  # (the full path reads that Via: over UDP only UDP is accepted)
        stats = self.stats
        direction = _FROM_SIGNALING if src == self.upstream else _FROM_GATEWAY
        if is_ack:  # (its To tag is the MAC _local_tag gives: checked in C)
            stats.requests[_ACK * 2 + direction] += 1
            if tcp_in:
                stats.requests_tcp[_ACK * 2 + direction] += 1
            top = parse_via(via_value)  # (a bad Via raises here as on the full path)
            if tcp_in:
                self._via_over_tcp(top, src[0])
            return []  # the ACK of a non-2xx this proxy answered itself ends here (§17.2.1)
        if head is None or tail is None or not (self.draining or self.overloaded) or src == self.upstream or \
                self.tracker.lookup_call(call_id, True, cseq_n) is not None:
            return None  # (a retransmission of an admitted call's INVITE, or sip-signaling's own
            # INVITE: the full path forwards it)
        stats.requests[_INVITE * 2 + direction] += 1
        if tcp_in:
            stats.requests_tcp[_INVITE * 2 + direction] += 1
        top = parse_via(via_value)
        if tcp_in:
            self._via_over_tcp(top, src[0])
        reply = _reply_to(top, src)
        self._refused(now, call_id, cseq_n)
        resp = head + _stamp_source(via_value, top, reply[0], reply[1]) + tail
        if len(resp) > len(data) and not tcp_in:  # (over UDP never larger than the request: see _reply)
            return []
        if tcp_in:
            self.out_tcp = True  # back over the connection the request came on
        return [(resp, reply)]

    def refusal_params(self) -> tuple | None:
        """What the UDP pump needs to refuse the plainest new INVITEs and absorb their ACKs on its
        own buffer, as :meth:`_fast_refusal` does (see ``sipwatch/_udppump.c``): the scan's
        limits, the 503's lines, where the request counters are. None without the C scan. The
        pump reads the state (overloaded, draining, key, counters) from this core at each
        datagram, so switching ``fast_refusals`` off switches it off too, and calls
        :meth:`_refused` for each INVITE it refuses."""
        if _c_refusal is None:
            return None
        return (sipmsg._NAME_CACHE, MAX_HEADER_LINES, MAX_CONTENT_LENGTH_DIGITS, MAX_MESSAGE, _REFUSAL_STATUS,
                _RETRY_AFTER_LINE, _INVITE * 2, _ACK * 2, _FROM_SIGNALING, _FROM_GATEWAY)

    def _refuse(self, msg: SipMessage, top: Via, reply: Addr, data: bytes, now: float,
                call_id: bytes | None = None, cseq_n: int = 0) -> list[tuple[bytes, Addr]]:
        """A new dialog turned away while draining or overloaded: 503 + Retry-After, counted
        (an INVITE, given its Call-ID and CSeq, remembered)."""
        self._refused(now, call_id, cseq_n)
        return self._local(msg, top, reply, data, 503, b"Service Unavailable", _RETRY_AFTER_LINE)

    def _refused(self, now: float, call_id: bytes | None, cseq_n: int) -> None:
        """Count a new dialog turned away with 503 (draining or overloaded, on either path: the
        UDP pump calls this too), look for the ACKs of refusals on the fast path for a while, and
        remember a refused INVITE (``call_id``; None for other methods) for :meth:`_was_refused`."""
        if self.draining:
            self.stats.drain_rejected += 1
        else:
            self.stats.overload_rejected += 1
        self._refusal_acks_until = now + _REFUSAL_ACK_WINDOW
        # (over TCP nothing is retransmitted, RFC 3261 §17.1.1.2: nothing to remember. A
        # connection's own backlog sheds it alone, and a Call-ID remembered from it would have
        # refused that Call-ID from anyone else)
        if call_id is not None and not self.in_tcp:
            if len(self._refused_invites) >= _REFUSED_MAX or now - self._refused_since >= _REFUSED_SPAN:
                self._refused_before = self._refused_invites
                self._refused_invites = {}
                self._refused_since = now
            self._refused_invites[hash(call_id)] = cseq_n
            self._refused_last = now

    def _was_refused(self, call_id: bytes, cseq_n: int, now: float) -> bool:
        """Whether this INVITE (Call-ID and CSeq) was answered 503 in the last _REFUSED_SPAN or
        so: then it is a retransmission of a transaction that has its final answer (RFC 3261
        §17.2.1), and gets the same 503 again, shedding or not. A retry of the call (a new
        CSeq) is new."""
        if now - self._refused_last > 2 * _REFUSED_SPAN:
            self._refused_invites = {}
            self._refused_before = {}
            return False
        key = hash(call_id)
        return self._refused_invites.get(key, -1) == cseq_n or self._refused_before.get(key, -1) == cseq_n

    def _own_branch(self, via_value: bytes) -> bytes | None:
        """The branch of a Via value exactly as this proxy wrote it (``our sent-by;branch=…;rport``),
        else None. Saves a full :func:`parse_via` of our own Via on every response; anything
        else (added parameters, other spelling) takes the general path. The branch must be
        letters, digits and dots, so no parameter, space or separator can hide in it."""
        head = self.own_via_head
        if head is not None and via_value.endswith(b";rport") and (
                via_value.startswith(head) or  # (ours over TCP: the same length, TCP for UDP)
                via_value.startswith(b"SIP/2.0/TCP") and via_value.startswith(head[11:], 11)):
            branch = via_value[len(head) - len(BRANCH_PREFIX):-6]
            if branch[len(BRANCH_PREFIX):].replace(b".", b"").isalnum():
                return branch
        return None


def _via_values(value: bytes, limit: int) -> list[bytes]:
    """A Via header's values (at most ``limit``, 0: all); a value of separators only (``Via: ,``)
    is a bad Via, never an empty list to index."""
    vals = split_values(value, limit)
    if not vals:
        raise SipParseError("empty Via value", DROP_BAD_VIA)
    return vals


def party_of(ip: str) -> str:
    """Who holds ``ip``, where the proxy shares something out among senders (the TCP table's
    room, the proven gateway-side addresses): an IPv4 address, or an IPv6 address's /64 (the
    prefix a subscriber or a site is given, RFC 6177: one host may use every address in it). An
    IPv4 address mapped into IPv6 (a dual-stack listener) is that IPv4 address."""
    if ":" not in ip:
        return ip
    try:
        addr = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    mapped = addr.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


def _loop_hash(uri: bytes, from_tag: bytes, call_id: bytes, cseq_s: bytes) -> int:
    """The loop tag of our branch (RFC 3261 §16.6 step 8), 48 bits: a hash of what identifies
    the request, so the same request coming back is recognised (§16.3 step 4).

    Python's own hash of the bytes (SipHash, seeded per process): only this process compares
    the tags it wrote, and nothing is protected by them (responses are checked by the branch's
    MAC; a request can carry any Via it likes). It costs ~1k instructions a request where the
    BLAKE2b digest it replaced cost ~3.8k (callgrind, in process), on each of a call's INVITE,
    ACK and BYE. A collision can only make a spiral of the same Call-ID and CSeq through this
    proxy look like a loop: one request in 2**48."""
    return hash(b"|".join((uri, from_tag, call_id, cseq_s))) & 0xFFFFFFFFFFFF


def _reply_address(via: Via) -> Addr | None:
    """Where a response to this Via goes (RFC 3261 §18.2.2, RFC 3581): ``received`` (which we
    wrote from the real source) and ``rport``; None unless that is an IP literal and a port."""
    p = via.params
    host = p.get(b"received") or via.host
    ip = ip_literal(host)
    if ip is None:
        return None
    rport = p.get(b"rport")
    if rport:
        if not rport.isdigit() or len(rport) > 5 or not 0 < int(rport) < 65536:
            return None
        return ip, int(rport)
    return ip, via.port or 5060


def _reply_to(top: Via, src: Addr) -> Addr:
    """Where responses to a request over UDP go: its real source, at the port its Via names
    unless it asked for rport (RFC 3261 §18.2.2, RFC 3581)."""
    return (src[0], src[1]) if b"rport" in top.params else (src[0], top.port or 5060)


def _stamp_source(via_value: bytes, via: Via, src_ip: str, src_port: int) -> bytes:
    """The sender's Via with ``received``/``rport`` taken from the real source, whatever it
    wrote (RFC 3261 §18.2.1, RFC 3581 §4): a forged value cannot redirect responses."""
    params = via.params
    forged = b"received" in params or params.get(b"rport", None) is not None
    host_ip = ip_literal(via.host)
    need_received = host_ip != src_ip
    if not forged:
        if b"rport" in params:
            via_value = _set_rport(via_value, src_port)
        if need_received:
            via_value += b";received=" + src_ip.encode()
        return via_value
    # rebuild the parameters without the sender's received/rport
    semi = via_value.find(b";")
    kept = [p for p in via_value[semi + 1:].split(b";")
            if p.partition(b"=")[0].strip().lower() not in (b"received", b"rport")]
    out = b";".join([via_value[:semi]] + kept)
    if b"rport" in params:
        out += b";rport=%d" % src_port
    if need_received:
        out += b";received=" + src_ip.encode()
    return out


def _set_rport(via_value: bytes, port: int) -> bytes:
    """Fill the first empty ``;rport`` parameter (any case) with the source port (RFC 3581 §4);
    add one when there is none."""
    if _c_set_rport is not None:
        return _c_set_rport(via_value, port)
    return _set_rport_py(via_value, port)


def _set_rport_py(via_value: bytes, port: int) -> bytes:
    """:func:`_set_rport` without the C extension (and the reference its tests hold it to)."""
    low = via_value.lower()
    i = 0
    while True:
        i = low.find(b";rport", i)
        if i < 0:
            return via_value + b";rport=%d" % port
        j = i + 6
        if j == len(low) or low[j] in b"; \t,":
            return via_value[:j] + b"=%d" % port + via_value[j:]
        i = j


__all__ = ["CoreConfig", "ProxyCore", "BRANCH_PREFIX", "ip_literal"]
