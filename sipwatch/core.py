"""Sans-IO stateless SIP proxy (RFC 3261 §16.11) with trace stamping and RTT accounting.

``ProxyCore.receive_datagram(data, addr, now)`` takes one UDP payload, where it came from and
the current time, and returns the datagrams to send as ``[(bytes, (host, port))]``. It never
reads a clock, never touches a socket and never raises: a message it cannot handle is counted
and dropped (or answered, for 482/483). The asyncio transport and pcap replay both drive it.

Direction: a datagram whose source is the configured upstream (sip-signaling) is "from
signaling"; anything else is "from gateway". Requests from the gateway side always go to the
upstream; requests from the signaling side follow Route, then the Request-URI.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from binascii import hexlify
from hashlib import blake2b

from .sipmsg import (
    SipMessage, SipParseError, Via, header_tag, parse, parse_via, split_values, uri_hostport,
)
from .state import Call, Tracker
from .stats import ACK, FROM_GATEWAY, FROM_SIGNALING, INVITE, Stats, method_index
from .tracecontext import parse_traceparent, sampled_by_ratio

Addr = tuple[str, int]
BRANCH_PREFIX = b"z9hG4bKsw"
# requests that can create a dialog, so they get our Record-Route (RFC 3261 §16.6 step 4)
DIALOG_CREATING = frozenset((b"INVITE", b"SUBSCRIBE", b"REFER", b"NOTIFY"))
_CRLF_ONLY = frozenset(b"\r\n \t")


@dataclass(frozen=True)
class CoreConfig:
    """What the pure core needs to know; the CLI builds it from flags and environment."""

    advertise: Addr  # our address as written into Via and Record-Route
    upstream: Addr  # sip-signaling (resolved IP, port)
    record_route: bool = True
    trace_header: str = "traceparent"
    sample_ratio: float = 1.0
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


class ProxyCore:
    def __init__(self, config: CoreConfig, stats: Stats | None = None,
                 randbits=random.getrandbits):
        self.config = config
        self.stats = stats or Stats()
        self.tracker = Tracker(self.stats, config.timer_b, config.max_transactions,
                               config.max_calls, config.max_call_duration)
        self._randbits = randbits
        self.upstream = config.upstream
        host, port = config.advertise
        h = host.encode()
        if b":" in h:  # IPv6 literal in URIs and Via
            h = b"[" + h + b"]"
        self.adv_host = h
        self.adv_port = port
        self.adv_hostport = b"%s:%d" % (h, port)
        self.via_prefix = b"Via: SIP/2.0/UDP " + self.adv_hostport + b";branch="
        self.record_route_line = b"Record-Route: <sip:" + self.adv_hostport + b";lr>"
        # our Via value up to the branch's fixed prefix, for _own_branch; only when the general
        # parser would read our sent-by back as us
        self.own_via_head = b"SIP/2.0/UDP " + self.adv_hostport + b";branch=" + BRANCH_PREFIX
        try:
            own = parse_via(self.own_via_head + b"0;rport")
            if not self._is_me(own.host, own.port) or b";" in self.adv_hostport:
                self.own_via_head = None
        except SipParseError:
            self.own_via_head = None
        self.trace_name = config.trace_header.encode()
        # the trace header line: name, then format_traceparent's layout (version 00)
        self.trace_line_fmt = self.trace_name.replace(b"%", b"%%") + b": 00-%032x-%016x-%s"
        lname = self.trace_name.lower()
        self.trace_lookup = tuple(dict.fromkeys((lname, b"traceparent", b"x-traceparent")))
        self.trace_lname = lname

    # -- entry points ------------------------------------------------------------------
    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> list[tuple[bytes, Addr]]:
        try:
            msg = parse(data)
            if msg.method is not None:
                return self._request(msg, data, addr, now)
            return self._response(msg, addr, now)
        except SipParseError:
            if _CRLF_ONLY.issuperset(data):
                self.stats.keepalives += 1  # RFC 5626 CRLF keep-alive
            else:
                self.stats.parse_errors += 1
            return []
        except (ValueError, IndexError, UnicodeError):
            self.stats.parse_errors += 1
            return []

    def handle_timers(self, now: float) -> None:
        self.tracker.expire(now)

    def drain_finished(self, limit: int = 10_000) -> list:
        """Finished ("call", Call) / ("tx", Transaction) records for logs and spans."""
        q = self.tracker.finished
        out = []
        while q and len(out) < limit:
            out.append(q.popleft())
        return out

    # -- requests ----------------------------------------------------------------------
    def _request(self, msg: SipMessage, data: bytes, src: Addr, now: float):
        stats = self.stats
        method = msg.method
        from_sig = src == self.upstream
        direction = FROM_SIGNALING if from_sig else FROM_GATEWAY
        midx = method_index(method)
        stats.requests[midx * 2 + direction] += 1
        lines, names = msg.lines, msg.names
        get = msg.get

        try:
            via_i = names.index(b"via")
        except ValueError:
            raise SipParseError("request without Via") from None
        via_vals = split_values(msg.value_at(via_i))
        top = parse_via(via_vals[0])
        top_params = top.params
        call_id = msg.call_id()
        cseq_n, cseq_m = msg.cseq()
        if cseq_m != method.upper():
            raise SipParseError("CSeq method differs from request method")
        from_val = get(b"from")
        to_val = get(b"to")
        if from_val is None or to_val is None:
            raise SipParseError("request without From/To")
        is_ack = midx == ACK

        mf_i = names.index(b"max-forwards") if b"max-forwards" in names else -1
        if mf_i >= 0:
            mf = msg.value_at(mf_i)
            if not mf.isdigit():
                raise SipParseError(f"bad Max-Forwards {mf[:10]!r}")
            hops = int(mf)
            if hops <= 0:
                stats.too_many_hops += 1
                return [] if is_ack else [self._local_response(msg, top, src, 483, b"Too Many Hops")]
            lines[mf_i] = b"Max-Forwards: %d" % (hops - 1)

        from_tag = header_tag(from_val) or b""
        cseq_s = b"%d" % cseq_n
        # hexlify(digest) is the same text as hexdigest().encode(), without the str round trip
        loop_part = hexlify(blake2b(b"|".join((msg.uri, from_tag, call_id, cseq_s)),
                                    digest_size=6).digest())
        if self.adv_hostport in data and self._looped(msg, loop_part):
            stats.loops += 1
            return [] if is_ack else [self._local_response(msg, top, src, 482, b"Loop Detected")]
        top_branch = top_params.get(b"branch")
        uniq = top_branch if top_branch and top_branch.startswith(b"z9hG4bK") else \
            b"|".join((top.raw, call_id, cseq_s, from_tag))
        branch = BRANCH_PREFIX + loop_part + b"." + \
            hexlify(blake2b(uniq + self.adv_hostport, digest_size=6).digest())

        # Route: drop our own entries (we were record-routed), then pick the next hop
        next_route = self._pop_own_routes(msg) if b"route" in names else None
        if from_sig:
            target = next_route if next_route is not None else msg.uri
            try:
                host, port, params = uri_hostport(target)
            except SipParseError:
                stats.unroutable += 1
                return [] if is_ack else [self._local_response(msg, top, src, 416, b"Unsupported URI Scheme")]
            maddr = params.get(b"maddr")
            dest = ((maddr or host).decode("ascii", "replace").strip("[]"), port or 5060)
            if dest == self.config.advertise:
                stats.loops += 1
                return [] if is_ack else [self._local_response(msg, top, src, 482, b"Loop Detected")]
        else:
            dest = self.upstream

        # trace context: one trace per Call-ID, joined from an incoming traceparent
        tracker = self.tracker
        call = tracker.calls.get(call_id)
        incoming = None
        for name in self.trace_lookup:
            if name in names:
                incoming = parse_traceparent(msg.value_at(names.index(name)))
                if incoming is None:
                    stats.traceparent_invalid += 1
                break
        has_to_tag = header_tag(to_val) is not None
        if call is None:
            call = self._new_call(msg, call_id, incoming, now, midx == INVITE and not has_to_tag,
                                  from_val, to_val)

        if is_ack:
            tx = tracker.ack(midx, method, cseq_n, call, now, self._randbits(64) or 1, direction,
                             dest)
        else:
            key = (branch, cseq_m)
            tx = tracker.transactions.get(key)
            if tx is not None:
                tracker.retransmission(tx)
            else:
                parent = call.span_id if call.is_call else call.parent_span_id
                tx = tracker.request(key, midx, method, cseq_n, call, now,
                                     self._randbits(64) or 1, parent, direction, dest,
                                     midx == INVITE and not has_to_tag)

        # edits: top Via received/rport, our Via, Record-Route, trace header, Max-Forwards
        src_ip, src_port = src
        rport = top_params.get(b"rport", 0)
        if rport is None or (b"received" not in top_params
                             and top.host.strip(b"[]").decode("ascii", "replace") != src_ip):
            v = via_vals[0]
            if rport is None:
                v = _set_rport(v, src_port)
            if b"received" not in top_params:
                v += b";received=" + src_ip.encode()
            via_vals[0] = v
            lines[via_i] = b"Via: " + b", ".join(via_vals)
        # the same bytes as trace_name + b": " + format_traceparent(...), in one formatting step
        trace_line = self.trace_line_fmt % (tx.trace_id, tx.span_id, b"01" if tx.sampled else b"00")
        if self.trace_lname in names:
            lines[names.index(self.trace_lname)] = trace_line
        else:
            lines.append(trace_line)
            names.append(self.trace_lname)
        # new lines above the top Via, top to bottom: our Via, Max-Forwards if missing,
        # Record-Route if there is none yet (else it goes above the first Record-Route)
        above_via = [self.via_prefix + branch + b";rport"]
        if mf_i < 0:
            above_via.append(b"Max-Forwards: 70")
        rr_i = -1
        if self.config.record_route and method in DIALOG_CREATING and not has_to_tag:
            if b"record-route" in names:
                rr_i = names.index(b"record-route")
            else:
                above_via.append(self.record_route_line)
        if rr_i > via_i:
            lines.insert(rr_i, self.record_route_line)
        lines[via_i:via_i] = above_via
        if 0 <= rr_i < via_i:
            lines.insert(rr_i, self.record_route_line)
        return [(msg.to_bytes(), dest)]

    def _new_call(self, msg, call_id, incoming, now, is_call, from_val, to_val) -> Call:
        if incoming is not None:
            trace_id, parent, flags = incoming
            sampled = bool(flags & 1)
            self.stats.traceparent_joined += 1
        else:
            trace_id = self._randbits(128) or 1
            parent = None
            ratio = self.config.sample_ratio
            sampled = ratio >= 1.0 or sampled_by_ratio(trace_id, ratio)  # (the ratio test inlined)
        return self.tracker.new_call(call_id, trace_id, self._span_id(), parent, sampled, now,
                                     is_call, from_val, to_val, msg.uri)

    def _span_id(self) -> int:
        return self._randbits(64) or 1

    def _looped(self, msg: SipMessage, loop_part: bytes) -> bool:
        """RFC 3261 §16.3 step 4: one of our Vias with the same loop hash ⇒ loop (else a spiral)."""
        mine = self.adv_hostport
        # cheap pre-check on the raw lines: a value (folded or not) can only contain our
        # host:port if its line does, since folding only adds spaces between parts
        lines, names = msg.lines, msg.names
        i = -1
        for _ in range(names.count(b"via")):
            i = names.index(b"via", i + 1)
            if mine in lines[i]:
                break
        else:
            return False
        want = BRANCH_PREFIX + loop_part + b"."
        for v in msg.get_all(b"via"):
            if mine in v:
                via = parse_via(v)
                if self._is_me(via.host, via.port) and (via.branch or b"").startswith(want):
                    return True
        return False

    def _is_me(self, host: bytes, port: int | None) -> bool:
        return host == self.adv_host and (port or 5060) == self.adv_port

    def _pop_own_routes(self, msg: SipMessage) -> bytes | None:
        """Remove Route values naming us from the top; return the next Route value, if any."""
        names, lines = msg.names, msg.lines
        while True:
            i = msg.index(b"route")
            if i < 0:
                return None
            values = split_values(msg.value_at(i))
            first = values[0]
            try:
                host, port, _ = uri_hostport(first)
            except SipParseError:
                return first
            if not self._is_me(host, port):
                return first
            if len(values) > 1:
                lines[i] = b"Route: " + b", ".join(values[1:])
            else:
                del lines[i]
                del names[i]

    def _local_response(self, msg: SipMessage, top: Via, src: Addr, status: int,
                        reason: bytes) -> tuple[bytes, Addr]:
        """A response generated here (482/483/416), sent back per the top Via."""
        out = [b"SIP/2.0 %d %s" % (status, reason)]
        first_via = True
        for i, n in enumerate(msg.names):
            if n == b"via":
                if first_via:
                    vals = split_values(msg.value_at(i))
                    vals[0] += b";received=" + src[0].encode()
                    if top.params.get(b"rport", 0) is None:
                        vals[0] = _set_rport(vals[0], src[1])
                    out.append(b"Via: " + b", ".join(vals))
                    first_via = False
                else:
                    out.append(msg.lines[i])
            elif n in (b"from", b"call-id", b"cseq"):
                out.append(msg.lines[i])
            elif n == b"to":
                line = msg.lines[i]
                if header_tag(msg.value_at(i)) is None:
                    line += b";tag=sw" + (b"%08x" % self._randbits(32))
                out.append(line)
        out.append(b"Content-Length: 0")
        dest = (src[0], src[1]) if top.params.get(b"rport", 0) is None else (src[0], top.port or 5060)
        return b"\r\n".join(out) + b"\r\n\r\n", dest

    # -- responses ---------------------------------------------------------------------
    def _response(self, msg: SipMessage, src: Addr, now: float):
        stats = self.stats
        status = msg.status
        direction = FROM_SIGNALING if src == self.upstream else FROM_GATEWAY
        stats.responses[(min(status // 100, 6) - 1) * 2 + direction] += 1
        names = msg.names
        try:
            via_i = names.index(b"via")
        except ValueError:
            raise SipParseError("response without Via") from None
        vals = split_values(msg.value_at(via_i))
        branch = self._own_branch(vals[0])
        if branch is None:
            top = parse_via(vals[0])
            branch = top.branch
            if not (branch and branch.startswith(BRANCH_PREFIX) and self._is_me(top.host, top.port)):
                stats.stray_responses += 1  # RFC 3261 §16.7 step 3: not ours, drop
                return []
        if len(vals) > 1:
            msg.lines[via_i] = b"Via: " + b", ".join(vals[1:])
            next_via = parse_via(vals[1])
        else:
            del msg.lines[via_i]
            del names[via_i]
            i = msg.index(b"via")
            if i < 0:
                stats.stray_responses += 1
                return []
            next_via = parse_via(split_values(msg.value_at(i))[0])
        _, cseq_m = msg.cseq()
        self.tracker.response((branch, cseq_m), status, now)
        return [(msg.to_bytes(), next_via.reply_address())]

    def _own_branch(self, via_value: bytes) -> bytes | None:
        """The branch of a Via value exactly as this proxy wrote it (``our sent-by;branch=…;rport``),
        else None. Saves a full :func:`parse_via` of our own Via on every response; anything
        else (added parameters, other spelling) takes the general path. The branch must be
        letters, digits and dots, so no parameter, space or separator can hide in it."""
        head = self.own_via_head
        if head is not None and via_value.startswith(head) and via_value.endswith(b";rport"):
            branch = via_value[len(head) - len(BRANCH_PREFIX):-6]
            if branch[len(BRANCH_PREFIX):].replace(b".", b"").isalnum():
                return branch
        return None


def _set_rport(via_value: bytes, port: int) -> bytes:
    """Fill an empty ``;rport`` parameter with the source port (RFC 3581 §4)."""
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
