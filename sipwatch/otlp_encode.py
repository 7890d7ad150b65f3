"""OTLP spans encoded straight from the finished records, protobuf and OTLP/JSON in one pass.

Our spans have a fixed shape (see :mod:`sipwatch.tracing`): one ``SIP call`` SERVER span per
call, one CLIENT span per transaction, a known set of attribute keys, ``sip.response`` events,
an UNSET or ERROR status. So instead of building SDK ``ReadableSpan`` objects and running the
SDK's generic encoder (~76 µs per span), :class:`SpanEncoder` writes each span's bytes directly:

* protobuf (``opentelemetry.proto.trace.v1.Span`` as a field of ``ScopeSpans``): ids as bytes,
  times as fixed64, fields in field-number order, exactly as the SDK's encoder lays them out;
* the OTLP/JSON object (hex ids, int64 as strings, enums as integers), strings escaped by orjson.

Each attribute is encoded once into its protobuf ``KeyValue`` field and its JSON object; string
and integer attributes that repeat (method, direction, host, port, CSeq, status code, a call's
Call-ID) are kept in a small bounded cache, so a typical transaction span costs a few tuple
look-ups and two joins. Resource and scope are encoded once. :func:`request` and :func:`json_line`
wrap a batch of spans into one ``ExportTraceServiceRequest`` (protobuf) / one JSON line.

The SDK-based :class:`sipwatch.tracing.SpanBuilder` stays the reference: the tests decode these
bytes with ``opentelemetry-proto`` and compare every field with what the SDK encodes for the
builder's spans.

The span worker's tuples (:meth:`SpanEncoder.encode`, ``tx_flat``, ``call_flat``) are assembled
in C by ``sipwatch/_otlpenc.c`` when it is built (not with ``SIPWATCH_NO_C=1``): over the same
caches, a call's parties built there too (the masking stays :mod:`sipwatch.masking`'s), every
other shape handed back to the Python methods here (``*_py``), which stay the reference the C
is tested against byte for byte. Callgrind, per span of answered calls: ~0.5k instructions once
a call's parts are cached (Python: ~45k); ~28k with each call's parties built, most of it their
masking in Python (Python: ~58k). Live, the span worker's CPU per SIP message fell by 40-50%.
The C part finds a call's party by its trace id (the three values it was built from compared),
and remembers the masked head of a From/To that comes back with only a new tag (mask_uri's own
output, used only where the tag provably takes no part in the masking; paused while heads do
not come back): ~12.7k instructions per span of SIPp-like calls, from ~15.9k.
"""
from __future__ import annotations

import struct
from binascii import hexlify

import orjson

from . import optional_c
from .masking import mask_uri
from .stats import DIRECTIONS, METHODS, OUTCOMES, REJ5, REJ6, TIMEOUT

# a transaction span is named by its method when it is one the metrics count by name, else OTHER
# (its sip.request.method says which): a trace store keeps an index of span names, and requests
# with invented methods would each have added one
_SPAN_NAMES: dict[bytes, str] = {m: m.decode("ascii") for m in METHODS}


def span_name(method: bytes) -> str:
    """The name of a transaction span for a request with this method."""
    return _SPAN_NAMES.get(method, "OTHER")

ERROR_OUTCOMES = frozenset((REJ5, REJ6, TIMEOUT))
SCOPE_NAME = "sipwatch"
CACHE_MAX = 8192  # cached (key, value) encodings; cleared when full (a cache, not a leak)
PARTY_MAX = 4096  # calls whose masked parties are remembered (a call's spans come together)
# Protobuf bytes of spans in one export request, at most (about: the span that crosses it still
# goes): an OTel Collector's (and Jaeger's) OTLP/gRPC receiver refuses messages over 4 MiB by
# default, and one refused request loses all its spans and sets off the back-off. A typical span
# is ~450 bytes, but a call's span carries its From and To, which a sender can make tens of KB
# long: a delivery of 2048 spans with a hundred such calls among them had gone past the limit.
DELIVER_BYTES = 3 << 20
KIND_INTERNAL, KIND_SERVER, KIND_CLIENT = 1, 2, 3  # OTLP Span.SpanKind
LEG_SETUP_SPAN = "B2BUA leg setup"  # the B2BUA's own latency: named leg's INVITE -> this leg's INVITE
STATUS_ERROR = 2
FLAG_HAS_IS_REMOTE, FLAG_IS_REMOTE = 0x100, 0x200  # SpanFlags
_U64 = (1 << 64) - 1

# varints of 0..16383 (lengths of spans, attributes, small integers) looked up, not computed
_V = [bytes((n,)) for n in range(128)] + [bytes(((n & 0x7F) | 0x80, n >> 7)) for n in range(128, 16384)]
_TIMES = struct.Struct("<BQBQ")  # tag 7 fixed64 start, tag 8 fixed64 end
_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
_FLAGS = {False: b"\x85\x01" + struct.pack("<I", FLAG_HAS_IS_REMOTE),  # tag 16, fixed32
          True: b"\x85\x01" + struct.pack("<I", FLAG_HAS_IS_REMOTE | FLAG_IS_REMOTE)}
_KIND = {KIND_INTERNAL: b"\x30\x01", KIND_SERVER: b"\x30\x02", KIND_CLIENT: b"\x30\x03"}  # tag 6, varint
_FLAG_VALUES = {False: FLAG_HAS_IS_REMOTE, True: FLAG_HAS_IS_REMOTE | FLAG_IS_REMOTE}
_FLAGS_JSON = {k: b"%d" % v for k, v in _FLAG_VALUES.items()}
_STATUS_UNSET = (b"\x7a\x00", b"{}")  # the SDK always writes a Status, empty when UNSET


# The C assembly of the common spans (sipwatch/_otlpenc.c), or None (then every span takes the
# Python methods below, the reference).
_otlpenc = optional_c("_otlpenc")


def varint(n: int) -> bytes:
    """Unsigned protobuf varint (callers pass n >= 0)."""
    if n < 16384:
        return _V[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: tag, varint length, body."""
    return tag + varint(len(body)) + body


def any_value_pb(v) -> bytes:
    """An ``AnyValue`` message body, with the SDK's type order (bool before int)."""
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, str):
        return field(b"\x0a", v.encode("utf-8"))
    if isinstance(v, int):
        if not -(1 << 63) <= v < (1 << 63):
            raise ValueError(f"integer attribute out of int64 range: {v}")
        return b"\x18" + varint(v & _U64)
    if isinstance(v, float):
        return b"\x21" + _DOUBLE.pack(v)
    if isinstance(v, (list, tuple)):
        return field(b"\x2a", b"".join(field(b"\x0a", any_value_pb(x)) for x in v))
    raise TypeError(f"attribute value of type {type(v).__name__} cannot be encoded")


def any_value_json(v) -> bytes:
    """The JSON ``AnyValue`` object's members (as the OTLP/JSON file has always written them)."""
    if isinstance(v, bool):
        return b'"boolValue":true' if v else b'"boolValue":false'
    if isinstance(v, int):
        return b'"intValue":"%d"' % v
    if isinstance(v, float):
        return b'"doubleValue":' + orjson.dumps(v)
    return b'"stringValue":' + orjson.dumps(str(v))


def key_values_pb(tag: bytes, attrs) -> bytes:
    """Repeated ``KeyValue`` fields (generic: resource attributes, tests)."""
    return b"".join(field(tag, field(b"\x0a", k.encode("utf-8")) + field(b"\x12", any_value_pb(v)))
                    for k, v in attrs.items())


def key_values_json(attrs) -> bytes:
    return b"[" + b",".join(b'{"key":%b,"value":{%b}}' % (orjson.dumps(k), any_value_json(v))
                            for k, v in attrs.items()) + b"]"


class SpanEncoder:
    """Encodes finished ``Call``/``Transaction`` records: ``tx(t)``/``call(c)`` → ``(pb, json)``
    where ``pb`` is the span as a ``ScopeSpans.spans`` field and ``json`` its OTLP/JSON object."""

    def __init__(self, resource_attributes, scope_version: str, mask_mode: str = "partial",
                 call_id_mask=None, resource_schema_url: str = "", accelerate: bool = True):
        self.mask_mode = mask_mode
        self.call_id_mask = call_id_mask  # bytes Call-ID -> str (masking.CallIdMasker); None: as is
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._str: dict = {}
        self._int: dict = {}
        self._names: dict = {}
        self._status: dict = {}
        self._events: dict = {}
        self._parties: dict = {}
        self._hops: dict = {}
        self._finals: dict = {}
        self._doubles: dict = {}
        self._call_parts: dict = {}
        # the C encoder's masked heads of From/To values up to their last ";tag=" (bytes -> str):
        # a caller's From comes with a new tag every call (see _otlpenc.c, masked_uri)
        self._masked_heads: dict = {}
        # the C encoder's parties by trace id: trace_id -> (Call-ID, From, To, party)
        self._party_by_trace: dict = {}
        self._rtt = self._double("sip.rtt_ms")
        self._setup_ms = self._double("sip.call.setup_ms")
        self._answer_ms = self._double("sip.call.answer_ms")
        self._duration_s = self._double("sip.call.duration_s")
        self._invite = self.attr("sip.request.method", "INVITE")
        self._sip = self.attr("network.protocol.name", "sip")
        self._call_span_head = self._name_kind("SIP call", KIND_SERVER)
        # the request's fixed parts
        resource = field(b"\x0a", key_values_pb(b"\x0a", resource_attributes))
        scope = field(b"\x0a", field(b"\x0a", SCOPE_NAME.encode()) + field(b"\x12", scope_version.encode()))
        self._resource_field = resource  # ResourceSpans.resource
        self._scope_field = scope  # ScopeSpans.scope
        self._schema_field = field(b"\x1a", resource_schema_url.encode()) if resource_schema_url else b""
        self._json_head = (b'{"resourceSpans":[{"resource":{"attributes":%b},"scopeSpans":[{"scope":'
                           b'{"name":%b,"version":%b},"spans":[' % (
                               key_values_json(resource_attributes), orjson.dumps(SCOPE_NAME),
                               orjson.dumps(scope_version)))
        self._json_tail = b"]}]}]}\n"
        self._out_pb: list = []  # the outbox of add_py / take_py
        self._out_js: list = []
        self._out_bytes = 0  # protobuf bytes of the spans in _out_pb
        # tx_flat, call_flat and encode in C over these same caches when the module is built
        # (it takes the Python methods for any shape it does not handle itself)
        self._call_id_key, self._from_key = self._key("sip.call_id"), self._key("sip.from")
        self.accelerated = accelerate and _otlpenc is not None
        if self.accelerated:
            c = _otlpenc.Encoder(self)
            self.tx_flat, self.call_flat, self.encode = c.tx, c.call, c.frame
            self.add, self.take, self.held = c.add, c.take, c.held

    # -- batches ---------------------------------------------------------------------------
    def request(self, spans_pb) -> bytes:
        """One ``ExportTraceServiceRequest`` holding the encoded spans (one resource, one scope);
        one join, so a batch of a megabyte is copied once."""
        spans_pb = list(spans_pb)
        scope_spans_len = len(self._scope_field) + sum(map(len, spans_pb))
        scope_spans_head = b"\x12" + varint(scope_spans_len)
        rs_len = (len(self._resource_field) + len(scope_spans_head) + scope_spans_len
                  + len(self._schema_field))
        return b"".join([b"\x0a", varint(rs_len), self._resource_field, scope_spans_head, self._scope_field,
                         *spans_pb, self._schema_field])

    def json_line(self, spans_json) -> bytes:
        """The same batch as one OTLP/JSON line (one join: the head and tail go onto the first
        and last span, a copy of those only)."""
        parts = list(spans_json)
        if not parts:
            return self._json_head + self._json_tail
        parts[0] = self._json_head + parts[0]
        parts[-1] = parts[-1] + self._json_tail
        return b",".join(parts)

    # -- pieces ----------------------------------------------------------------------------
    def _key(self, key: str) -> tuple[bytes, bytes]:
        got = self._keys.get(key)
        if got is None:
            if len(self._keys) >= 1024:
                self._keys.clear()
            got = self._keys[key] = (field(b"\x0a", key.encode("utf-8")),
                                     b'{"key":%b,"value":{' % orjson.dumps(key))
        return got

    def _encode_attr(self, key: str, v) -> tuple[bytes, bytes]:
        kpb, kjs = self._key(key)
        if type(v) is float:  # the per-span figures (RTT, setup time): never cached
            kv = kpb + b"\x12\x09\x21" + _DOUBLE.pack(v)
            return b"\x4a" + _V[len(kv)] + kv, b'%b"doubleValue":%b}}' % (kjs, orjson.dumps(v))
        kv = kpb + field(b"\x12", any_value_pb(v))
        return b"\x4a" + varint(len(kv)) + kv, kjs + any_value_json(v) + b"}}"

    def attr(self, key: str, v) -> tuple[bytes, bytes]:
        """(Span.attributes field, JSON KeyValue) for one attribute; str/int values cached."""
        t = type(v)
        if t is str:
            cache = self._str
        elif t is int:
            cache = self._int
        else:
            return self._encode_attr(key, v)
        ck = (key, v)
        got = cache.get(ck)
        if got is None:
            got = self._encode_attr(key, v)
            if len(cache) >= CACHE_MAX:
                cache.clear()
            cache[ck] = got
        return got

    def _name(self, name: str) -> tuple[bytes, bytes]:
        got = self._names.get(name)
        if got is None:
            if len(self._names) >= 1024:
                self._names.clear()
            got = self._names[name] = (field(b"\x2a", name.encode("utf-8")), orjson.dumps(name))
        return got

    def _error(self, message: str) -> tuple[bytes, bytes]:
        got = self._status.get(message)
        if got is None:
            if len(self._status) >= 1024:
                self._status.clear()
            body = field(b"\x12", message.encode("utf-8")) + b"\x18" + _V[STATUS_ERROR]
            got = self._status[message] = (field(b"\x7a", body), b'{"code":%d,"message":%b}' % (
                STATUS_ERROR, orjson.dumps(message)))
        return got

    def _event_parts(self, status: int) -> tuple[bytes, bytes, bytes]:
        """A ``sip.response`` event for a provisional response, all but its time: the protobuf
        before and after the fixed64 time, the JSON after the time's digits."""
        got = self._events.get(status)
        if got is None:
            if len(self._events) >= 1024:
                self._events.clear()
            kv = field(b"\x0a", b"sip.response.status_code") + field(b"\x12", any_value_pb(status))
            tail = field(b"\x12", b"sip.response") + field(b"\x1a", kv)
            got = self._events[status] = (
                b"\x5a" + varint(9 + len(tail)) + b"\x09", tail,
                b'","name":"sip.response","attributes":[{"key":"sip.response.status_code",'
                b'"value":{%b}}]}' % any_value_json(status))
        return got

    def _double(self, key: str) -> tuple[bytes, bytes]:
        """A double attribute's encoding up to its value (protobuf: the 8 bytes follow; JSON: the
        number and ``}}`` follow)."""
        got = self._doubles.get(key)
        if got is None:
            kpb, kjs = self._key(key)
            if len(self._doubles) >= 1024:
                self._doubles.clear()
            got = self._doubles[key] = (b"\x4a" + varint(len(kpb) + 11) + kpb + b"\x12\x09\x21",
                                        kjs + b'"doubleValue":')
        return got

    def _masked(self, key: str, raw) -> tuple[bytes, bytes]:
        """A masked URI attribute; the same header value (a To, a Request-URI) masks the same."""
        ck = (key, raw)
        got = self._str.get(ck)
        if got is None:
            got = self._encode_attr(key, mask_uri(raw, self.mask_mode))
            if len(self._str) >= CACHE_MAX:
                self._str.clear()
            self._str[ck] = got
        return got

    def _party(self, trace_id: int, call_id: bytes, from_uri: bytes, to_uri: bytes):
        """A call's masked Call-ID, From and To attributes, encoded once per call (a pure function
        of the three header values), and its trace id as bytes and as hex (the key is all four)."""
        ck = (trace_id, call_id, from_uri, to_uri)
        got = self._parties.get(ck)
        if got is None:
            if len(self._parties) >= PARTY_MAX:
                self._parties.clear()
            cid = self.call_id_mask
            shown = cid(call_id) if cid is not None else call_id.decode("utf-8", "replace")
            tb = trace_id.to_bytes(16, "big")
            # a From carries its dialog's tag, new with every call: encoded, not cached
            got = self._parties[ck] = (self._encode_attr("sip.call_id", shown),
                                       self._encode_attr("sip.from", mask_uri(from_uri, self.mask_mode)),
                                       self._masked("sip.to", to_uri), tb, hexlify(tb))
        return got

    def _hop(self, method: bytes, cseq, direction, peer):
        """The transaction attributes a hop shares with many others, pre-joined: method (before
        the Call-ID), then CSeq, direction, transport, server address and port, peer address and
        (observed hops) the client's address and port; and the span's name."""
        ck = (method, cseq, direction, peer)
        got = self._hops.get(ck)
        if got is None:
            a = self.attr
            client, (host, port), transport = peer_ends(peer)
            name = method.decode("ascii", "replace")
            m = a("sip.request.method", name)
            rest = [a("sip.cseq", cseq), a("sip.direction", DIRECTIONS[direction]),
                    a("network.transport", transport), a("server.address", host), a("server.port", port),
                    a("network.peer.address", host)]
            if client is not None:
                rest += (a("client.address", client[0]), a("client.port", client[1]))
            nk = self._name_kind(span_name(method), KIND_CLIENT)
            got = (m[0], m[1], b"".join([x[0] for x in rest]), b",".join([x[1] for x in rest]), nk[0], nk[1])
            if len(self._hops) >= CACHE_MAX:
                self._hops.clear()
            self._hops[ck] = got
        return got

    def _final(self, status: int, timed_out: bool):
        """What a transaction's final outcome adds: the status code attribute, the error.type
        attribute and the span status (pb, json pairs; b"" when absent)."""
        ck = (status, timed_out)
        got = self._finals.get(ck)
        if got is None:
            a = self.attr
            code = a("sip.response.status_code", status) if status else (b"", b"")
            err, st = (b"", b""), _STATUS_UNSET
            if timed_out:
                err, st = a("error.type", "timeout"), self._error("no final response (timeout)")
            elif status >= 500:
                err, st = a("error.type", str(status)), self._error(f"SIP {status}")
            if len(self._finals) >= 1024:
                self._finals.clear()
            got = self._finals[ck] = (code, err, st)
        return got

    # -- spans -----------------------------------------------------------------------------
    def tx(self, tx) -> tuple[bytes, bytes]:
        """A transaction's CLIENT span (attributes in :meth:`SpanBuilder.tx_span`'s order)."""
        return self.tx_flat(tx_tuple(tx))

    def call(self, call) -> tuple[bytes, bytes]:
        """A call's SERVER span (attributes in :meth:`SpanBuilder.call_span`'s order)."""
        return self.call_flat(call_tuple(call))

    def leg_setup(self, call) -> tuple[bytes, bytes] | None:
        """The B2BUA's own latency as an INTERNAL span beside the joined leg's call span (same
        parent: the named leg's call span): the named leg's INVITE until this leg's INVITE."""
        if not getattr(call, "gap_span_id", 0):
            return None
        return self.leg_setup_flat(call_tuple(call))

    _party_max = PARTY_MAX
    _mask_uri = staticmethod(mask_uri)

    def encode_py(self, tuples, pbs: list, lines: list) -> int:
        """A frame's record tuples encoded onto ``pbs``/``lines`` (a joined B2BUA leg's call
        span is followed by its leg-setup span); returns how many could not be encoded (each a
        malformed tuple: skipped, not fatal). :meth:`encode` is this, in C when built."""
        failed = 0
        tx, call, leg_setup = self.tx_flat_py, self.call_flat_py, self.leg_setup_flat
        for t in tuples:
            try:
                if t[0] == 0:
                    pb, js = tx(t)
                else:
                    pb, js = call(t)
                    legs = t[18]
                    if legs is not None and legs[3]:
                        pbs.append(pb)
                        lines.append(js)
                        pb, js = leg_setup(t)
            except Exception:  # noqa: BLE001 - a malformed tuple: counted, not fatal
                failed += 1
                continue
            pbs.append(pb)
            lines.append(js)
        return failed

    encode = encode_py

    # -- the outbox: the spans of the next delivery ------------------------------------------
    # The span worker encodes each frame into it and takes a delivery's request and line out at
    # once. In C the spans go straight into two buffers, one copy each at the take, instead of
    # two bytes objects a span joined into a list (~1.5 µs a call less, in process).
    def add_py(self, tuples, start: int, limit: int, max_bytes: int | None = None) -> tuple[int, int]:
        """``tuples[start:]`` encoded into the outbox, one at a time, until it holds ``limit``
        spans or ``max_bytes`` of protobuf spans (a backend refuses requests past its size: an
        OTel Collector's gRPC receiver 4 MiB by default): (index of the first tuple not taken,
        how many could not be encoded). :meth:`add` is this, in C when built."""
        pbs, lines = self._out_pb, self._out_js
        failed = 0
        i = max(0, start)
        cap = max_bytes if max_bytes is not None else float("inf")
        while i < len(tuples) and len(pbs) < limit and self._out_bytes < cap:
            had = len(pbs)
            failed += self.encode_py(tuples[i:i + 1], pbs, lines)
            self._out_bytes += sum(len(pb) for pb in pbs[had:])
            i += 1
        return i, failed

    def held_py(self) -> int:
        """Spans in the outbox."""
        return len(self._out_pb)

    def take_py(self, want_request: bool, want_line: bool) -> tuple[int, bytes | None, bytes | None]:
        """(spans, :meth:`request` of them or None, :meth:`json_line` of them or None), the outbox
        emptied; both None when it held none."""
        pbs, lines = self._out_pb, self._out_js
        self._out_pb, self._out_js = [], []
        self._out_bytes = 0
        if not pbs:
            return 0, None, None
        return len(pbs), self.request(pbs) if want_request else None, self.json_line(lines) if want_line else None

    add, held, take = add_py, held_py, take_py

    @staticmethod
    def round_json(x: float, ndigits: int) -> tuple[float, bytes]:
        """``round(x, ndigits)`` and its JSON (the C assembly's way for figures it leaves to Python)."""
        v = round(x, ndigits)
        return v, orjson.dumps(v)

    def tx_flat_py(self, t) -> tuple[bytes, bytes]:
        """:meth:`tx` from the record's :func:`tx_tuple` (what the span worker receives). The
        transaction span is the common one: assembled here in one list per encoding."""
        (_, trace_id, span_id, parent, method, cseq, direction, peer, status, t_sent, t_first, t_final,
         retrans, timed_out, events, call_span, is_call, call_id, from_uri, to_uri) = t
        party = (self._parties.get((trace_id, call_id, from_uri, to_uri))
                 or self._party(trace_id, call_id, from_uri, to_uri))
        hop = self._hops.get((method, cseq, direction, peer)) or self._hop(method, cseq, direction, peer)
        code, err, st = self._finals.get((status, timed_out)) or self._final(status, timed_out)
        start = int(t_sent * 1e9)
        end = int(t_final * 1e9)
        cid = party[0]
        tb = party[3]
        sb = span_id.to_bytes(8, "big")
        pab = parent.to_bytes(8, "big") if parent else None
        pb = [b"\x0a\x10", tb, b"\x12\x08", sb, b"\x22\x08" + pab if pab else b"", hop[4],
              _TIMES.pack(0x39, start, 0x41, end), hop[0], cid[0], hop[2]]
        js = [hop[1], cid[1], hop[3]]
        if not is_call:  # no call span above to carry the parties
            pb += (party[1][0], party[2][0])
            js += (party[1][1], party[2][1])
        if status:
            _add(pb, js, code)
        if t_first is not None:
            v = round((t_first - t_sent) * 1000.0, 3)
            rtt = self._rtt
            pb += (rtt[0], _DOUBLE.pack(v))
            js.append(b"%b%b}}" % (rtt[1], orjson.dumps(v)))
        if retrans:
            _add(pb, js, self.attr("sip.retransmissions", retrans))
        if err[0]:
            _add(pb, js, err)
        ev_js = b""
        if events:
            parts = self._events
            ev = []
            for s, et in events:
                if s < 200:
                    e = parts.get(s) or self._event_parts(s)
                    ns = int(et * 1e9)
                    pb += (e[0], _FIXED64.pack(ns), e[1])
                    ev.append(b'{"timeUnixNano":"%d%b' % (ns, e[2]))
            if ev:
                ev_js = b',"events":[' + b",".join(ev) + b"]"
        remote = bool(parent) and (parent != call_span or not is_call)
        pb += (st[0], _FLAGS[remote])
        body = b"".join(pb)
        return b"\x12" + varint(len(body)) + body, (
            b'{"traceId":"%b","spanId":"%b","flags":%b%b%d","endTimeUnixNano":"%d","attributes":[%b],'
            b'"status":%b%b%b}' % (party[4], hexlify(sb), _FLAGS_JSON[remote], hop[5], start, end,
                                   b",".join(js), st[1], b',"parentSpanId":"%b"' % hexlify(pab) if pab else b"",
                                   ev_js))

    tx_flat = tx_flat_py

    def call_flat_py(self, t) -> tuple[bytes, bytes]:
        """:meth:`call` from the record's :func:`call_tuple`. A call with neither RTP figures nor
        B2BUA legs (the proxy's common one) is assembled from pre-joined parts; the others go
        through :meth:`_call_attributes` (RTP keys may replace fixed ones in place)."""
        (_, trace_id, span_id, parent, call_id, from_uri, to_uri, ruri, outcome_i, status, t_start, t_setup,
         t_answer, t_end, retrans, rtp, first_peer, is_call, legs) = t
        party = (self._parties.get((trace_id, call_id, from_uri, to_uri))
                 or self._party(trace_id, call_id, from_uri, to_uri))
        transport = first_peer[2] if first_peer and len(first_peer) > 2 else "udp"
        gap_parent = 0
        if rtp or legs is not None:
            attrs_pb, attrs_js, st = self._call_attributes(t, party, transport)
            if legs is not None:
                gap_parent = legs[5]
        else:
            ck = (outcome_i, status, transport)
            head = self._call_parts.get(ck) or self._call_part(outcome_i, status, transport)
            ru = self._masked("sip.request.uri", ruri)
            cid, frm, to = party[0], party[1], party[2]
            pb = [self._invite[0], cid[0], frm[0], to[0], ru[0], head[0]]
            js = [self._invite[1], cid[1], frm[1], to[1], ru[1], head[1]]
            if t_setup is not None:
                _add(pb, js, _double_attr(self._setup_ms, round((t_setup - t_start) * 1000.0, 3)))
            if t_answer is not None:
                x = _double_attr(self._answer_ms, round((t_answer - t_start) * 1000.0, 3))
                y = _double_attr(self._duration_s, round(t_end - t_answer, 6))
                pb += (x[0], y[0])
                js += (x[1], y[1])
            if retrans:
                _add(pb, js, self.attr("sip.retransmissions", retrans))
            if head[2]:
                pb.append(head[2])
                js.append(head[3])
            attrs_pb, attrs_js, st = b"".join(pb), b",".join(js), head[4]
        # a joined leg's parent is the named leg's call span, in this process: not remote
        remote = bool(parent) and parent != gap_parent
        return self._span(trace_id, span_id, parent, remote, self._call_span_head, int(t_start * 1e9),
                          int(t_end * 1e9), attrs_pb, attrs_js, st)

    call_flat = call_flat_py

    def _call_part(self, outcome_i: int, status: int, transport: str):
        """The call attributes one outcome, final status and transport fix, pre-joined: outcome,
        transport, protocol name and status code (in their place), error.type (last), and the
        span status."""
        a = self.attr
        outcome = OUTCOMES[outcome_i] if outcome_i >= 0 else "unknown"
        parts = [a("sip.call.outcome", outcome), a("network.transport", transport), self._sip]
        if status:
            parts.append(a("sip.response.status_code", status))
        err, st = (b"", b""), _STATUS_UNSET
        if outcome_i in ERROR_OUTCOMES:
            err = a("error.type", "timeout" if outcome_i == TIMEOUT else str(status))
            st = self._error(outcome)
        if len(self._call_parts) >= 1024:
            self._call_parts.clear()
        got = self._call_parts[(outcome_i, status, transport)] = (
            b"".join([x[0] for x in parts]), b",".join([x[1] for x in parts]), err[0], err[1], st)
        return got

    def _call_attributes(self, t, party, transport: str):
        """A call span's attributes (pb, json) and status, RTP figures and leg attributes included."""
        (_, trace_id, span_id, parent, call_id, from_uri, to_uri, ruri, outcome_i, status, t_start, t_setup,
         t_answer, t_end, retrans, rtp, first_peer, is_call, legs) = t
        a = self.attr
        outcome = OUTCOMES[outcome_i] if outcome_i >= 0 else "unknown"
        attrs = {"sip.request.method": self._invite, "sip.call_id": party[0], "sip.from": party[1],
                 "sip.to": party[2], "sip.request.uri": self._masked("sip.request.uri", ruri),
                 "sip.call.outcome": a("sip.call.outcome", outcome),
                 "network.transport": a("network.transport", transport), "network.protocol.name": self._sip}
        if status:
            attrs["sip.response.status_code"] = a("sip.response.status_code", status)
        if t_setup is not None:
            attrs["sip.call.setup_ms"] = _double_attr(self._setup_ms, round((t_setup - t_start) * 1000.0, 3))
        if t_answer is not None:
            attrs["sip.call.answer_ms"] = _double_attr(self._answer_ms, round((t_answer - t_start) * 1000.0, 3))
            attrs["sip.call.duration_s"] = _double_attr(self._duration_s, round(t_end - t_answer, 6))
        if retrans:
            attrs["sip.retransmissions"] = a("sip.retransmissions", retrans)
        if legs is not None:
            for k, v in legs_attributes(legs[0], legs[1], legs[2], self.call_id_mask).items():
                attrs[k] = a(k, v)
        if rtp:
            enc = self._encode_attr
            for k, v in rtp.items():
                attrs[k] = enc(k, v)
                if k == "sip.call.outcome":  # as dict.update would: the status message follows it
                    outcome = v
        st = _STATUS_UNSET
        if outcome_i in ERROR_OUTCOMES:
            st = self._error(outcome)
            attrs["error.type"] = a("error.type", "timeout" if outcome_i == TIMEOUT else str(status))
        vals = attrs.values()
        return b"".join([x[0] for x in vals]), b",".join([x[1] for x in vals]), st

    def leg_setup_flat(self, t) -> tuple[bytes, bytes] | None:
        """:meth:`leg_setup` from the record's :func:`call_tuple` (None: not a joined leg)."""
        legs = t[18]
        if legs is None or not legs[3]:
            return None
        call_ids, leg, joined_by, gap_span_id, gap_start, gap_parent = legs
        a = self.attr
        vals = [self._party(t[1], t[4], t[5], t[6])[0]] + [a(k, v) for k, v in
                                                     legs_attributes(call_ids, leg, joined_by,
                                                                     self.call_id_mask).items()]
        return self._span(t[1], gap_span_id, gap_parent, False, self._name_kind(LEG_SETUP_SPAN, KIND_INTERNAL),
                          int(gap_start * 1e9), int(t[10] * 1e9), b"".join([x[0] for x in vals]),
                          b",".join([x[1] for x in vals]), _STATUS_UNSET)

    def _name_kind(self, name: str, kind: int) -> tuple[bytes, bytes]:
        """A span's name and kind: the protobuf fields, and the JSON from the name up to the start
        time's digits."""
        nm = self._name(name)
        return nm[0] + _KIND[kind], b',"name":%b,"kind":%d,"startTimeUnixNano":"' % (nm[1], kind)

    @staticmethod
    def _span(trace_id, span_id, parent, remote, name_kind, start, end, attrs_pb, attrs_js, status):
        """A span without events (call and leg-setup spans) from its encoded parts."""
        body = b"".join((b"\x0a\x10", trace_id.to_bytes(16, "big"), b"\x12\x08", span_id.to_bytes(8, "big"),
                         b"\x22\x08" + parent.to_bytes(8, "big") if parent else b"", name_kind[0],
                         _TIMES.pack(0x39, start, 0x41, end), attrs_pb, status[0], _FLAGS[remote]))
        return b"\x12" + varint(len(body)) + body, (
            b'{"traceId":"%032x","spanId":"%016x","flags":%d%b%d","endTimeUnixNano":"%d","attributes":[%b],'
            b'"status":%b%b}' % (trace_id, span_id, _FLAG_VALUES[remote], name_kind[1], start, end, attrs_js,
                                 status[1], b',"parentSpanId":"%016x"' % parent if parent else b""))


def _double_attr(prefix: tuple[bytes, bytes], v: float) -> tuple[bytes, bytes]:
    """A double attribute from its :meth:`SpanEncoder._double` prefix and its value."""
    return prefix[0] + _DOUBLE.pack(v), b"%b%b}}" % (prefix[1], orjson.dumps(v))


# -- records as plain tuples: what the proxy hands its span worker, and what the encoder reads ----
def tx_tuple(tx) -> tuple:
    """A finished ``Transaction`` with the fields of its call that its span shows."""
    call = tx.call
    return (0, tx.trace_id, tx.span_id, tx.parent_span_id, tx.method, tx.cseq, tx.direction, tx.peer,
            tx.status, tx.t_sent, tx.t_first, tx.t_final, tx.retrans, tx.timed_out, tx.events,
            call.span_id, call.is_call, call.call_id, call.from_uri, call.to_uri)


def call_tuple(call) -> tuple:
    """A finished ``Call``: its own fields, its first hop's peer (the transport) and its B2BUA leg
    group (Call-IDs, leg, joined by, leg-setup span id, start and parent) or None."""
    txs = call.transactions
    group = getattr(call, "group", None)
    legs = (list(group.call_ids), call.leg, call.joined_by, call.gap_span_id, call.gap_start, call.gap_parent) \
        if group is not None else None
    return (1, call.trace_id, call.span_id, call.parent_span_id, call.call_id, call.from_uri, call.to_uri,
            call.ruri, call.outcome, call.status, call.t_start, call.t_setup, call.t_answer, call.t_end,
            call.retrans, call.rtp, txs[0].peer if txs else None, call.is_call, legs)


def record_tuple(obj, is_call: bool) -> tuple:
    """A finished record's tuple: :func:`call_tuple` of a call (``is_call``), else :func:`tx_tuple`."""
    return call_tuple(obj) if is_call else tx_tuple(obj)


def _add(pb: list, js: list, part: tuple[bytes, bytes]) -> None:
    """One attribute's (protobuf field, JSON KeyValue) onto a span's two part lists."""
    pb.append(part[0])
    js.append(part[1])


def rtp_figures(streams) -> dict:
    """The ``rtp.*`` call-span attributes from ``(packets, lost, jitter_max_ms, mos)`` per stream
    (jitter or MOS None when unknown); set on ``Call.rtp`` before the call record is submitted."""
    streams = list(streams)
    out = {"rtp.streams": len(streams), "rtp.packets": sum(s[0] for s in streams),
           "rtp.lost": sum(max(s[1], 0) for s in streams)}
    jitter = [s[2] for s in streams if s[2] is not None]
    mos = [s[3] for s in streams if s[3] is not None]
    if jitter:
        out["rtp.jitter_max_ms"] = float(max(jitter))
    if mos:
        out["rtp.mos_min"] = float(min(mos))
    return out


def leg_attributes(call, group, call_id_mask=None) -> dict:
    """A B2BUA leg's span attributes: ``sip.correlation_id`` (the first leg's Call-ID, masked as
    ``sip.call_id`` is), ``sip.leg`` (1-based), ``sip.legs`` (legs known when the record was made)
    and, for a leg that joined, ``sip.correlated_by`` (x-cid, session-id, icid)."""
    return legs_attributes(group.call_ids, call.leg, call.joined_by, call_id_mask)


def legs_attributes(call_ids, leg: int, joined_by, call_id_mask=None) -> dict:
    """:func:`leg_attributes` from the group's Call-IDs, the leg's place and what joined it."""
    first = call_ids[0]
    out = {"sip.correlation_id": call_id_mask(first) if call_id_mask is not None
           else first.decode("utf-8", "replace"),
           "sip.leg": leg, "sip.legs": len(call_ids)}
    if joined_by:
        out["sip.correlated_by"] = joined_by
    return out


def hop_ends(tx) -> tuple:
    """``(client, (host, port), transport)`` of a transaction's hop: the proxy records the next
    hop only (client None; ``(ip, port)`` for UDP, ``(ip, port, "tcp")``); the observer records
    (sender, receiver[, transport])."""
    return peer_ends(tx.peer)


def peer_ends(peer) -> tuple:
    """:func:`hop_ends` of a transaction's recorded peer."""
    if isinstance(peer[0], tuple):
        return peer[0], peer[1], peer[2] if len(peer) > 2 else "udp"
    if len(peer) > 2:
        return None, (peer[0], peer[1]), peer[2]
    return None, peer, "udp"


def call_transport(call) -> str:
    """What the call's first hop was seen on (the proxy records "tcp" in the peer; UDP else)."""
    peer = call.transactions[0].peer if call.transactions else None
    return peer[2] if peer and len(peer) > 2 else "udp"
