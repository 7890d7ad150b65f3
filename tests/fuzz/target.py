"""One fuzz input → a short run of the sans-IO core, the observer and the parser, with the
properties of issue 8 checked on everything the core emits.

Input format: records separated by ``SEP``, or by ``SEP_TCP`` for a record whose message arrives
over TCP (``receive_stream``: from the same source, on its connection); the first byte of a record picks what happens and
how far the clock moves, the rest is the datagram (or, for the "answer" ops, the status line and
extra lines of a response built from the last forwarded request, so responses that match a real
transaction of the core are reachable without guessing its branch MAC).

    op & 7: 0-2  datagram from one of three gateway-side sources (IPv4, other IPv4, IPv6)
            3    datagram from the upstream (sip-signaling)
            4    the upstream answers the last request the core sent to it
            5    the gateway-side peer answers the last request the core sent to it
            6    datagram from a gateway source after a long pause (timers fire first)
            7    datagram from the upstream, then a housekeeping tick
    op & 8       the edge's overload flag flips first (while on, new INVITEs are refused 503)
    op >> 4 quarter seconds pass before the datagram

Properties (an AssertionError names the one that broke; anything else raised is a finding too):
- no datagram makes the core raise internally (what it catches as an internal error counts as a
  finding: a malformed input has a drop reason of its own);
- nothing raises out of ``receive_datagram``, ``handle_timers``, ``Observer.feed``/``finish``, the
  call-summary log record or the span export encoding of what the run finished;
- ``sipmsg.parse`` raises nothing but ``SipParseError``, and gives the same message (or the same
  error reason) with the C header scan (sipwatch/_sipscan.c) as without it, in both modes;
- every output datagram is at most 65507 bytes, re-parses with ``sipmsg.parse``, and passes the
  independent checks of :mod:`sipcheck` (CRLF only, token header names, no control bytes in the
  header section, Content-Length equal to its body);
- a forwarded message's body is byte-identical to the input's body as declared by
  Content-Length (RFC 3261 §18.3), and an input whose body is undecidable is not forwarded;
- every destination is an IP literal with a port 1-65535, on the IP of the upstream, of the
  datagram's source or of a source that sent a request earlier in the run (no reflection to third
  parties; the port may be the one the sender's Via names, RFC 3261 §18.2.2); every source in a
  run has its own IP, so no destination passes by sharing one;
- over TCP, the sender's Via sent-by is learnt as an alias (``tcp_alias``) only on the
  connection's own IP (a peer cannot have another's requests sent down its connection);
- a response the core makes itself goes back to the IP of the datagram's source and, over UDP,
  is not larger than the request (no amplification toward a spoofable source);
- a forwarded request carries at most ``core.MAX_VIAS`` + 1 Via values (more Vias than any
  real path has are dropped, issue 8 item 2; the one added is the core's own);
- a second core with the same key, its response fast path (``ProxyCore._fast_response``) off,
  fed the same inputs, gives the same outputs, counters and finished records;
- a finished call's Call-ID masks alike in C (``_sipscan.mask_call_id``, and the check
  ``_sipscan.plain_call_id`` that shows the usual one as it is) and in Python, in the ``digits``
  and ``hash`` modes;
- a finished call's summary line, as the span worker writes it from the summary tuple, is the
  same bytes from the C writer (``_otlpenc.summary_line``) and from the dict path.
"""
from __future__ import annotations

import os
import random
import re

import orjson

import io

from sipwatch import core as core_module, logs, sipmsg
from sipwatch.core import CoreConfig, ProxyCore
from sipwatch.logs import call_summary_fields
from sipwatch.masking import SHOWN_MAX, CallIdMasker
from sipwatch.observer import Observer
from sipwatch.sipmsg import SipParseError, parse
from sipwatch.summary import summary_tuple

try:  # the span encoding is checked when the tracing extras are importable
    from opentelemetry.sdk.resources import Resource
    from sipwatch.otlp_encode import SpanEncoder
    from sipwatch.tracing import SpanBuilder, otlp_json_line
    _RESOURCE = Resource.create({"service.name": "sipwatch-fuzz"})
except ImportError:  # pragma: no cover
    SpanBuilder = None

try:
    from . import sipcheck
except ImportError:  # run as a script: tests/fuzz is on sys.path
    import sipcheck

SEP = b"\x00\xfe\xfd\x00"
SEP_TCP = b"\x00\xfe\xfc\x00"
_SPLIT = re.compile(b"(\x00\xfe[\xfc\xfd]\x00)")
_CALL_ID_MASKERS = (CallIdMasker("digits", b"fuzz"), CallIdMasker("hash", b"fuzz"))
MAX_VIAS = getattr(core_module, "MAX_VIAS", 70)
MAX_RECORDS = 64
ADVERTISE = ("127.0.0.1", 5060)
UPSTREAM = ("127.0.0.2", 5090)
GATEWAYS = (("127.0.0.3", 5070), ("10.0.0.7", 5080), ("::1", 5072))
_ANSWER_HEADERS = frozenset((b"via", b"v", b"from", b"f", b"to", b"t", b"call-id", b"i", b"cseq",
                             b"record-route"))


def answer(request: bytes, spec: bytes) -> bytes:
    """A response to ``request`` as its next hop would write it: ``spec``'s first line as the
    status line (``SIP/2.0 200 OK`` if it is not one), the request's Via/From/To/Call-ID/CSeq/
    Record-Route lines, then the rest of ``spec`` (more headers, the empty line, a body)."""
    head, _ = sipcheck.split_message(request)
    keep = [ln for ln in head.split(b"\r\n")[1:]
            if ln.partition(b":")[0].strip().lower() in _ANSWER_HEADERS]
    status, nl, rest = spec.partition(b"\n")
    if not status.startswith(b"SIP/2.0"):
        status, rest = b"SIP/2.0 200 OK", spec
    return b"\r\n".join([status.rstrip(b"\r"), *keep]) + b"\r\n" + rest


# The C header scan is what the proxy runs: an install without it would fuzz the Python path only.
assert sipmsg._c_split is not None or os.environ.get("SIPWATCH_NO_C") == "1", \
    "sipwatch._sipscan is not built (pip install -e ., or python -m tests.compiled --sipscan)"


def parse_outcome(payload: bytes, check_length: bool) -> tuple:
    try:
        m = parse(payload, check_length)
    except SipParseError as e:
        return ("SipParseError", e.reason)
    return (m.start, m.method, m.uri, m.status, m.lines, m.names, m.body, m.truncated)


class Run:
    def __init__(self):
        config = CoreConfig(advertise=ADVERTISE, upstream=UPSTREAM, secret=b"fuzz" * 8)
        self.core = ProxyCore(config, randbits=random.Random(1).getrandbits)
        # as the UDP edge runs it: a response's accounting held back until settle() after the sends
        self.core.defer_bookkeeping = True
        # the reference: the same core without the response and refusal fast paths, accounting
        # at once
        self.full = ProxyCore(config, randbits=random.Random(1).getrandbits)
        self.full.fast_responses = False
        self.full.fast_refusals = False
        self.observer = Observer()
        self.now = 1000.0
        self.requesters = {UPSTREAM[0]}  # IPs that sent a request in this run
        self.last_to_upstream: bytes | None = None
        self.last_to_gateway: tuple[bytes, tuple] | None = None
        self.builder = SpanBuilder(_RESOURCE, "partial") if SpanBuilder is not None else None
        # the proxy's own encoder (span worker), on the same records
        self.encoder = SpanEncoder(dict(_RESOURCE.attributes), "0", "partial") \
            if SpanBuilder is not None else None

    def datagram(self, payload: bytes, src, tcp: bool = False) -> None:
        for check_length in (True, False):
            with_c = parse_outcome(payload, check_length)
            c_split, sipmsg._c_split = sipmsg._c_split, None
            try:
                without_c = parse_outcome(payload, check_length)
            finally:
                sipmsg._c_split = c_split
            assert with_c == without_c, f"C header scan changed parse (check_length={check_length}): " \
                                        f"{with_c!r:.300} != {without_c!r:.300}"
        if sipcheck.is_request(payload):
            self.requesters.add(src[0])
        receive, receive_full = (self.core.receive_stream, self.full.receive_stream) if tcp else \
            (self.core.receive_datagram, self.full.receive_datagram)
        outs = receive(payload, src, self.now)
        assert isinstance(outs, list), f"receive_datagram returned {type(outs)}"
        assert outs == receive_full(payload, src, self.now), "response or refusal fast path changed the output"
        self.core.settle()
        assert counters(self.core) == counters(self.full), \
            "response or refusal fast path, or held-back accounting, changed the counters"
        alias = self.core.tcp_alias
        assert alias == self.full.tcp_alias, "response or refusal fast path changed the alias learnt"
        if tcp:
            assert alias is None or alias[0] == src[0], f"alias {alias} learnt on a connection from {src}"
        # where the output leaves (a TCP request's 503 over UDP would reach no one) and whether the
        # message counts against the connection's junk budget: alike on both paths
        assert (self.core.out_tcp, self.core.stream_junk) == (self.full.out_tcp, self.full.stream_junk), \
            "response or refusal fast path changed out_tcp or stream_junk"
        self.core.out_tcp = self.full.out_tcp = False  # (as the edges do once they have read it)
        assert self.core.stats.internal_errors["datagram"] == 0, \
            f"the core raised and counted it: {self.core.last_internal_error}"
        self.observer.feed(payload, src, ADVERTISE, self.now)
        for item in outs:
            out, dest = item
            self.check(payload, src, out, dest, tcp)
            self.observer.feed(out, ADVERTISE, dest, self.now)
            if sipcheck.is_request(out):
                if dest == UPSTREAM:
                    self.last_to_upstream = out
                else:
                    self.last_to_gateway = (out, dest)

    def check(self, payload: bytes, src, out, dest, tcp: bool = False) -> None:
        assert isinstance(out, bytes), f"output is {type(out)}"
        problem = sipcheck.destination_problem(dest)
        assert problem is None, problem
        assert dest[0] in self.requesters or dest[0] == src[0], \
            f"sent to {dest}, an IP that sent no request (source {src}, upstream {UPSTREAM})"
        problems = sipcheck.output_problems(out)
        assert not problems, f"output to {dest}: {problems}"
        parse(out)  # must not raise
        _, out_body = sipcheck.split_message(out)
        if sipcheck.is_response(out) and not sipcheck.is_response(payload):
            # made here (400/403/482/483/416/503/513...): back to the sender, no amplification
            assert dest[0] == src[0], f"local response to {dest}, request came from {src}"
            if not tcp:  # (over TCP the handshake proved the source)
                assert len(out) <= len(payload), f"local response of {len(out)} bytes to a {len(payload)}-byte request"
            return
        assert sipcheck.is_response(out) == sipcheck.is_response(payload), "request/response kind changed"
        declared = sipcheck.declared_body(payload)
        assert declared.problem is None, f"forwarded although {declared.problem}"
        if sipcheck.is_request(out):
            vias = sipcheck.via_count(out)
            assert vias <= MAX_VIAS + 1, f"forwarded a request with {vias} Via values"
        assert out_body == declared.body, \
            f"body changed: {len(declared.body)} bytes declared, {len(out_body)} forwarded"

    def housekeeping(self, now: float) -> None:
        self.core.handle_timers(now)
        self.full.handle_timers(now)
        records = self.core.drain_finished()
        assert [record_summary(r) for r in records] == [record_summary(r) for r in self.full.drain_finished()], \
            "response fast path changed the finished records"
        self.records(records)

    def records(self, records) -> None:
        spans = []
        for kind, obj in records:
            if kind == "call" and getattr(obj, "is_call", False):
                orjson.dumps(call_summary_fields(obj, "partial"))
                if logs._c_summary_line is not None:
                    t = summary_tuple(obj)
                    assert summary_line(t, logs._c_summary_line) == summary_line(t, None), \
                        "summary line: the C writer and the dict path differ"
            if kind == "call" and type(obj.call_id) is bytes:
                for masker in _CALL_ID_MASKERS:
                    if masker.mode == "digits" and len(obj.call_id) > SHOWN_MAX:
                        # (no real Call-ID is that long: its keyed hash alone, by design, not C)
                        hashed = "h-" + masker.digest(obj.call_id, 16)
                        assert masker._mask(obj.call_id) == hashed and masker(obj.call_id) == hashed, \
                            "Call-ID masking: a Call-ID over SHOWN_MAX shows more than its keyed hash"
                        continue
                    assert masker._mask(obj.call_id) == masker._mask_py(obj.call_id), \
                        "Call-ID masking: the C pass and the Python path differ"
                    assert masker(obj.call_id) == masker._mask_py(obj.call_id), \
                        "Call-ID masking: the C plain check (_sipscan.plain_call_id) and the Python path differ"
            if self.builder is not None:
                spans.append(self.builder.build(kind, obj))
                if kind == "tx":
                    self.encoder.tx(obj)
                elif obj.is_call:
                    self.encoder.call(obj)
        if spans:
            otlp_json_line(spans, _RESOURCE)

    def finish(self) -> None:
        for tracker in (self.core.tracker, self.full.tracker):  # the tables' byte sums stay exact
            assert tracker.call_bytes == sum(c.nbytes for c in tracker.calls.values()), "call_bytes drifted"
            assert tracker.tx_bytes == sum(t.nbytes for t in tracker.transactions.values()), "tx_bytes drifted"
        for dt in (40.0, 400.0, 5 * 3600.0):
            self.housekeeping(self.now + dt)
        self.observer.finish()
        self.records(self.observer.drain_finished())


def summary_line(t: tuple, writer) -> bytes:
    """The summary line a JsonLog writes of tuple ``t``, with the C writer or the dict path."""
    out = io.BytesIO()
    saved, logs._c_summary_line = logs._c_summary_line, writer
    try:
        log = logs.JsonLog("fuzz", stream=out, clock=lambda: 1.7e9, call_id_mask=_CALL_ID_MASKERS[0])
        log.call_summary_of(t)
    finally:
        logs._c_summary_line = saved
    return out.getvalue()


def counters(core: ProxyCore) -> tuple:
    s = core.stats  # (compiled, a native class: its attributes are listed, it has no __dict__)
    names = getattr(type(s), "__mypyc_attrs__", None) or vars(s)
    stats = {k: getattr(s, k) for k in names if k not in ("ring", "__dict__")}
    return stats, core.out_tcp, len(core.tracker.transactions), sorted(core.gateway_seen.items()), sorted(core.gateway_proven.items()), \
        list(core.handshake_only), sorted((k, list(v)) for k, v in core.proven_parties.items())


def record_summary(record) -> tuple:
    kind, obj = record
    if kind == "tx":
        return kind, obj.key, obj.status, obj.t_first, obj.t_final, obj.retrans, list(obj.events), obj.tags
    return kind, obj.call_id, obj.status, obj.outcome, obj.t_setup, obj.t_answer, obj.t_end, obj.retrans


def records(data: bytes) -> list[tuple[bool, bytes]]:
    """(over TCP, record) of each non-empty record of ``data``, at most MAX_RECORDS."""
    parts = _SPLIT.split(data)
    out = [(False, parts[0])] + [(parts[i] == SEP_TCP, parts[i + 1]) for i in range(1, len(parts) - 1, 2)]
    return [(tcp, rec) for tcp, rec in out if rec][:MAX_RECORDS]


def run_one(data: bytes) -> None:
    run = Run()
    for tcp, rec in records(data):
        op, payload = rec[0], rec[1:]
        run.now += (op >> 4) * 0.25
        if op & 8:  # the edge's overload guard flips: new INVITEs refused (503) from here, or no more
            run.core.overloaded = run.full.overloaded = not run.core.overloaded
        kind = op & 7
        if kind <= 2:
            run.datagram(payload, GATEWAYS[kind], tcp)
        elif kind == 3:
            run.datagram(payload, UPSTREAM, tcp)
        elif kind == 4:
            if run.last_to_upstream is not None:
                run.datagram(answer(run.last_to_upstream, payload), UPSTREAM, tcp)
        elif kind == 5:
            if run.last_to_gateway is not None:
                req, peer = run.last_to_gateway
                run.datagram(answer(req, payload), peer, tcp)
        elif kind == 6:
            run.now += 40.0
            run.housekeeping(run.now)
            run.datagram(payload, GATEWAYS[0], tcp)
        else:
            run.datagram(payload, UPSTREAM, tcp)
            run.housekeeping(run.now)
    run.finish()
