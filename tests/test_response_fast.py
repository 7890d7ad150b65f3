"""The response fast path (``ProxyCore._fast_response``, the C ``_sipscan.response``) against the
full path it skips: for every input, the same datagrams out, the same drop reasons and counters,
the same transactions, calls and finished records, the same TCP routing.

Two cores with the same key and the same random bits get the same request, then the same
responses: the fast path on in one, off in the other. The responses are what the next hop would
send, then rewritten the ways peers and attackers write them (compact and odd-case names, Via
values merged into one header or split over several, folding, bare LF, odd whitespace, duplicate
and missing headers, Content-Length variants, huge headers, foreign branches, random bytes).
The fixed cases also check the output against the response as written, minus our Via.
"""
from __future__ import annotations

import array
import os
import random
import sys
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sipwatch import core as core_module, sipmsg
from sipwatch.core import CoreConfig, ProxyCore
from sipwatch.stats import FROM_SIGNALING, Stats

from leakcheck import kept_by

pytestmark = pytest.mark.skipif(core_module._c_response is None, reason="the C extension is not built (or SIPWATCH_NO_C=1)")

SIDECAR = ("127.0.0.1", 5070)
UPSTREAM = ("127.0.0.1", 5080)
GATEWAY = ("127.0.0.3", 5062)
SECRET = b"k" * 32
SDP = b"v=0\r\no=gw 1 1 IN IP4 127.0.0.3\r\ns=-\r\nc=IN IP4 127.0.0.3\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def _request(n: int, transport: bytes = b"UDP", method: bytes = b"INVITE") -> bytes:
    body = SDP if method == b"INVITE" else b""
    return (b"%s sip:+4930999888@127.0.0.1:5070 SIP/2.0\r\n"
            b"Via: SIP/2.0/%s 127.0.0.3:5062;branch=z9hG4bK-%d-1;rport\r\n"
            b"From: \"Caller\" <sip:alice@127.0.0.3:5062>;tag=%dA\r\n"
            b"To: <sip:+4930999888@127.0.0.1:5070>\r\n"
            b"Call-ID: %d-x@127.0.0.3\r\n"
            b"CSeq: 1 %s\r\n"
            b"Contact: <sip:gw@127.0.0.3:5062>\r\n"
            b"Max-Forwards: 70\r\n"
            b"Content-Type: application/sdp\r\n"
            b"Content-Length: %d\r\n\r\n" % (method, transport, n, n, n, method, len(body))) + body


def _answer_lines(forwarded: bytes, status: bytes, n: int) -> list[bytes]:
    """The header lines of the callee's answer: the forwarded request's Via/From/To/Call-ID/CSeq/
    Record-Route lines as it wrote them (a To tag added), then a Contact."""
    out = [b"SIP/2.0 " + status]
    for line in forwarded.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        low = line.lower()
        if low.startswith((b"via:", b"record-route:", b"from:", b"call-id:", b"cseq:")):
            out.append(line)
        elif low.startswith(b"to:"):
            out.append(line if status.startswith(b"100") else line + b";tag=uas%d" % n)
    out.append(b"Contact: <sip:uas@127.0.0.1:5080>")
    return out


def _pair() -> tuple[ProxyCore, ...]:
    """The fast path, the full path, and the fast path with its accounting held back until
    ``settle()`` (as the UDP and TCP edges run the core): :func:`feed` holds all three equal."""
    cores = []
    for fast, defer in ((True, False), (False, False), (True, True)):
        c = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=UPSTREAM, secret=SECRET), Stats(ring_size=1024),
                      randbits=random.Random(7).getrandbits)
        c.fast_responses = fast
        c.defer_bookkeeping = defer
        cores.append(c)
    assert cores[0].fast_responses and not cores[1].fast_responses
    return tuple(cores)


def snapshot(obj):
    """Everything reachable from ``obj`` as plain values: two equal snapshots mean equal state.

    Objects are read by their slots, __dict__ or, in the compiled build, mypyc's list of a native
    class's attributes. Every container and object is numbered on first sight and written once,
    into a table, as its type and its parts, an object met again as ("ref", number). The walk
    keeps its own stack: the state holds chains as long as its tables (the timer queues are
    linked lists through their entries), deeper than Python's recursion limit."""
    seen: dict[int, int] = {}
    table: list = []
    kept: list = []  # (alive until the end: no id is reused during the walk)
    todo: list = []

    def part(x):
        if x is None or isinstance(x, (bool, int, float, str, bytes)):
            return x
        if isinstance(x, (set, frozenset)):
            return ("set", sorted(repr(v) for v in x))
        if isinstance(x, array.array) or hasattr(x, "tobytes"):
            return ("buffer", bytes(x.tobytes()))
        if callable(x) and not hasattr(x, "__dict__") and not hasattr(type(x), "__slots__"):
            return ("callable", getattr(x, "__qualname__", type(x).__name__))
        k = seen.get(id(x))
        if k is None:
            k = seen[id(x)] = len(table)
            table.append(None)
            kept.append(x)
            todo.append((k, x))
        return ("ref", k)

    root = part(obj)
    while todo:
        k, x = todo.pop()
        if isinstance(x, (list, tuple, deque)):
            table[k] = (type(x).__name__, [part(v) for v in x])
        elif isinstance(x, dict):
            table[k] = ("dict", [(part(a), part(b)) for a, b in x.items()])
        else:
            fields = {}
            for cls in type(x).__mro__:
                for name in (*getattr(cls, "__slots__", ()), *getattr(cls, "__mypyc_attrs__", ())):
                    if name != "__dict__" and hasattr(x, name):
                        fields[name] = getattr(x, name)
            fields.update(getattr(x, "__dict__", {}))
            table[k] = (type(x).__name__, [(name, part(v)) for name, v in sorted(fields.items())])
    return root, table


def test_snapshot_tells_states_apart_and_walks_chains_longer_than_the_recursion_limit():
    class Node:
        __slots__ = ("next", "value")

    def chain(n: int, last: int = 0):
        head = None
        for i in range(n):
            node = Node()
            node.next, node.value = head, (last if i == 0 else i)
            head = node
        return head

    n = 20 * sys.getrecursionlimit()
    assert snapshot(chain(n)) == snapshot(chain(n))
    assert snapshot(chain(n)) != snapshot(chain(n, last=-1))  # (the far end differs)
    shared = [1]
    assert snapshot([shared, shared]) != snapshot([[1], [1]])  # (aliasing is state too)
    assert snapshot({"a": (1, b"x")}) != snapshot({"a": (1, b"y")})


def state(core: ProxyCore):
    return snapshot((core.stats, core.tracker, core.gateway_seen, core.gateway_proven, core.handshake_only,
                     core.proven_parties, core.out_tcp, core.last_internal_error))


def feed(pair, data: bytes, src, now: float, tcp: bool = False) -> list:
    outs = []
    for c in pair:
        c.out_tcp = False
        outs.append((c.receive_stream if tcp else c.receive_datagram)(data, src, now))
    fast, full, deferring = pair
    assert outs[0] == outs[1] == outs[2], f"outputs differ for {data[:400]!r}"
    assert fast.out_tcp == full.out_tcp == deferring.out_tcp
    deferring.settle()  # (as the edges do after the sends)
    assert state(fast) == state(full) == state(deferring), f"state differs after {data[:400]!r}"
    return outs[0]


def _forward(pair, n: int, tcp: bool, method: bytes = b"INVITE") -> bytes:
    out = feed(pair, _request(n, b"TCP" if tcp else b"UDP", method), GATEWAY, 1000.0, tcp)
    assert len(out) == 1 and out[0][1] == UPSTREAM
    return out[0][0]


def _forward_to_gateway(pair, n: int, tcp: bool) -> bytes:
    """A request from signaling to the gateway (seen before, so the policy lets it through)."""
    _forward(pair, n, False, b"OPTIONS")
    req = (b"MESSAGE sip:gw@127.0.0.3:5062 SIP/2.0\r\n"
           b"Via: SIP/2.0/%s 127.0.0.1:5080;branch=z9hG4bK-s%d\r\n"
           b"From: <sip:sig@127.0.0.1:5080>;tag=s%d\r\n"
           b"To: <sip:gw@127.0.0.3:5062>\r\n"
           b"Call-ID: s%d@127.0.0.1\r\n"
           b"CSeq: 7 MESSAGE\r\n"
           b"Max-Forwards: 70\r\n"
           b"Content-Length: 2\r\n\r\nhi" % (b"TCP" if tcp else b"UDP", n, n, n))
    out = feed(pair, req, UPSTREAM, 1000.0, tcp)
    assert len(out) == 1 and out[0][1] == GATEWAY, out
    return out[0][0]


def _fast_taken(core: ProxyCore, data: bytes) -> bool:
    return core_module._c_response(data, sipmsg._NAME_CACHE, core.own_via_head, len(core_module.BRANCH_PREFIX),
                                   sipmsg.MAX_HEADER_LINES, sipmsg.MAX_CONTENT_LENGTH_DIGITS, core_module.MAX_VIAS,
                                   sipmsg.MAX_MESSAGE) is not None


def _join(lines: list[bytes], body: bytes = b"", length: bool = True) -> bytes:
    lines = lines + [b"Content-Length: %d" % len(body)] if length else lines
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# -- fixed cases: the fast path is taken, and its output is the response minus our Via --------
def test_common_responses_take_the_fast_path_and_lose_only_our_via():
    pair = _pair()
    fwd = _forward(pair, 1, False)
    for k, status in enumerate((b"100 Trying", b"180 Ringing", b"200 OK", b"200 OK")):
        body = SDP if status == b"200 OK" else b""
        data = _join(_answer_lines(fwd, status, 1), body)
        assert _fast_taken(pair[0], data)
        want = b"\r\n".join(ln for ln in data.split(b"\r\n") if not ln.startswith(b"Via: SIP/2.0/UDP 127.0.0.1:5070"))
        out = feed(pair, data, UPSTREAM, 1000.1 + k)
        assert out == [(want, GATEWAY)]
    assert pair[0].stats.response_retransmissions == 1  # the second 200 OK
    assert pair[0].stats.responses[2 * 1 + FROM_SIGNALING] == 2  # 2xx from signaling


def test_our_via_merged_with_the_next_one_and_trailing_garbage():
    pair = _pair()
    fwd = _forward(pair, 2, False)
    lines = _answer_lines(fwd, b"200 OK", 2)
    ours, theirs = [ln for ln in lines if ln.startswith(b"Via:")]
    merged = [ln for ln in lines if not ln.startswith(b"Via:")]
    merged.insert(1, ours + b" ,\t" + theirs[5:] + b" , ,SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKx")
    data = _join(merged + [b"X-Pad: 1"], b"v=0\r\nextra past the length", length=False)
    data = data.replace(b"X-Pad: 1", b"l: 5")
    assert _fast_taken(pair[0], data)
    out = feed(pair, data, UPSTREAM, 1001.0)
    assert out[0][0].split(b"\r\n")[1] == b"Via: " + theirs[5:] + b", SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKx"
    assert out[0][0].endswith(b"\r\n\r\nv=0\r\n") and pair[0].stats.body_truncated == 1


def test_answer_from_the_gateway_side():
    pair = _pair()
    fwd = _forward_to_gateway(pair, 5, False)
    data = _join(_answer_lines(fwd, b"200 OK", 5))
    assert _fast_taken(pair[0], data)
    out = feed(pair, data, GATEWAY, 1000.3)
    assert out[0][1] == UPSTREAM and pair[0].gateway_proven[GATEWAY[0]] == 1000.3  # (it answered: proven)


def test_tcp_request_answered_over_tcp():
    pair = _pair()
    fwd = _forward(pair, 3, True)
    data = _join(_answer_lines(fwd, b"180 Ringing", 3))
    assert _fast_taken(pair[0], data)
    out = feed(pair, data, UPSTREAM, 1000.5)
    assert len(out) == 1 and pair[0].out_tcp


@settings(max_examples=150, deadline=None)
@given(st.permutations(range(8)), st.booleans())
def test_any_header_order_loses_only_our_via(order, with_body):
    """Header order is free (RFC 3261 §7.3.1; only the Vias keep theirs): whatever the order, both
    paths relay the response as written minus our Via line."""
    pair = _pair()
    fwd = _forward(pair, 7, False)
    lines = _answer_lines(fwd, b"200 OK", 7)
    vias = [ln for ln in lines[1:] if ln.startswith(b"Via:")]
    others = [ln for ln in lines[1:] if not ln.startswith(b"Via:")]
    body = SDP if with_body else b""
    slots = others + [b"Content-Length: %d" % len(body), b"<vias>"]
    assert len(slots) == 8  # (Record-Route, From, To, Call-ID, CSeq, Contact, Content-Length, the Vias)
    head = []
    for k in order:
        head.extend(vias if slots[k] == b"<vias>" else [slots[k]])
    data = b"\r\n".join([lines[0], *head]) + b"\r\n\r\n" + body
    assert _fast_taken(pair[0], data)
    out = feed(pair, data, UPSTREAM, 1000.1)
    assert out == [(data.replace(vias[0] + b"\r\n", b"", 1), GATEWAY)]


@pytest.mark.parametrize("edit", [
    lambda d: d.replace(b"Call-ID:", b"Call-ID: dup\r\nCall-ID:"),  # duplicate Call-ID: full path
    lambda d: d.replace(b"CSeq: 1", b"CSeq: 2"),  # not the held transaction: stateless check
    lambda d: d.replace(b"Contact:", b"Contact: a\r\n b\r\nX:"),  # folding
    lambda d: d.replace(b"SIP/2.0 200 OK", b"SIP/2.0 200"),  # repaired status line
    lambda d: d.replace(b"Content-Length: 0", b"Content-Length: 1"),  # body shorter than declared
    lambda d: d.replace(b"\r\n", b"\n"),  # bare LF
    lambda d: d.replace(b"SIP/2.0 200 OK", b"SIP/2.0 799 OK"),  # out of range
])
def test_unusual_shapes_are_left_to_the_full_path(edit):
    pair = _pair()
    fwd = _forward(pair, 4, False)
    data = edit(_join(_answer_lines(fwd, b"200 OK", 4)))
    assert pair[0]._fast_response(data, UPSTREAM, 1000.2) is None  # (changes nothing: compared below)
    feed(pair, data, UPSTREAM, 1000.2)


# -- generated and mutated responses ------------------------------------------------------------
_NAMES = {b"Via": (b"v", b"VIA", b"via ", b"Via\t"), b"Call-ID": (b"i", b"call-id", b"CALL-ID"),
          b"To": (b"t", b"TO"), b"CSeq": (b"cseq", b"CSEQ"), b"Content-Length": (b"l", b"content-length")}
_HOSTILE = [b"\x00", b"\r", b"\n", b"\xff", b"\xc3\xa9", b",", b"\"", b"<", b">", b";", b":", b" ", b"\t",
            b"\r\n ", b"\r\n\r\n", b"z9hG4bKsw", b";rport", b"SIP/2.0/TCP ", b"%", b"\x7f"]


@st.composite
def mutations(draw, lines: list[bytes], body: bytes) -> bytes:
    lines = list(lines)
    ops = draw(st.lists(st.integers(0, 17), max_size=4))
    content_length: bytes | None = b"Content-Length: %d" % len(body)
    for op in ops:
        i = draw(st.integers(1, max(1, len(lines) - 1)))
        if op == 0 and i < len(lines):  # another spelling of a name
            name, colon, value = lines[i].partition(b":")
            alts = _NAMES.get(name)
            if colon and alts:
                lines[i] = draw(st.sampled_from(alts)) + b":" + draw(st.sampled_from([b"", b" ", b"  ", b"\t"])) \
                    + value.lstrip()
        elif op == 1:  # the two Vias in one header, with odd separators
            vias = [k for k, ln in enumerate(lines) if ln.startswith(b"Via:")]
            if len(vias) >= 2:
                sep = draw(st.sampled_from([b",", b", ", b" , ", b",,", b",\t", b" ,  , "]))
                lines[vias[0]] += sep + lines[vias[1]][4:].lstrip()
                del lines[vias[1]]
        elif op == 2 and i < len(lines):  # a fold
            cut = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:cut] + draw(st.sampled_from([b"\r\n ", b"\r\n\t", b"\r\n  "])) + lines[i][cut:]
        elif op == 3 and i < len(lines):  # a duplicate (or a changed copy) of a header
            copy = lines[i] if draw(st.booleans()) else lines[i] + b"x"
            lines.insert(draw(st.integers(1, len(lines))), copy)
        elif op == 4 and i < len(lines):  # a header gone
            del lines[i]
        elif op == 5:  # Content-Length variants
            content_length = draw(st.sampled_from([
                None, b"Content-Length: %d" % (len(body) + 1), b"Content-Length: 0", b"Content-Length:  %d " % len(body),
                b"Content-Length: 0%d" % len(body), b"Content-Length: x", b"Content-Length: 00000000",
                b"Content-Length: %d\r\nContent-Length: %d" % (len(body), len(body)), b"l:%d" % len(body)]))
        elif op == 6:  # another status
            lines[0] = draw(st.sampled_from([b"SIP/2.0 100 Trying", b"SIP/2.0 183 Progress", b"SIP/2.0 486 Busy",
                                             b"SIP/2.0 699 X", b"SIP/2.0 700 X", b"SIP/2.0 099 X", b"SIP/2.0 200",
                                             b"SIP/2.0 200  OK", b"SIP/2.0  200 OK", b"SIP/2.1 200 OK"]))
        elif op == 7 and i < len(lines):  # hostile bytes inside a line
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.sampled_from(_HOSTILE)) + lines[i][at:]
        elif op == 8:  # a huge header, or very many
            if draw(st.booleans()):
                lines.insert(i, b"X-Big: " + b"a" * draw(st.sampled_from([1000, 65500])))
            else:
                lines[i:i] = [b"X-N: 1"] * draw(st.sampled_from([990, 1000]))
        elif op == 9:  # more Via values below ours
            vias = [k for k, ln in enumerate(lines) if ln.startswith(b"Via:")]
            if vias:
                k = draw(st.sampled_from([1, 68, 69, 70]))
                lines[vias[0]] += b"".join(b", SIP/2.0/UDP 10.0.0.%d;branch=z9hG4bK%d" % (j % 250, j)
                                           for j in range(k))
        elif op == 10 and i < len(lines):  # odd whitespace around a value
            name, colon, value = lines[i].partition(b":")
            if colon:
                lines[i] = name + b":" + draw(st.sampled_from([b"", b"\t", b"   "])) + value.strip() \
                    + draw(st.sampled_from([b" ", b"\t", b""]))
        elif op == 11:  # an unknown header name (a token, or not)
            lines.insert(i, draw(st.sampled_from([b"X-Odd-Name: 1", b"Bad Name: 1", b"X@Y: 1", b": nothing",
                                                  b"NoColon", b"Via2: SIP/2.0/UDP a"])))
        elif op == 12:  # our Via changed (extra parameter, other spelling, another branch)
            vias = [k for k, ln in enumerate(lines) if ln.startswith(b"Via:")]
            if vias:
                edit = draw(st.sampled_from([(b";rport", b";rport;x=1"), (b";rport", b" ;rport"),
                                             (b"z9hG4bKsw", b"z9hG4bKsw."), (b"z9hG4bKsw", b"z9hG4bKsx"),
                                             (b"SIP/2.0/UDP 127", b"SIP/2.0/TCP 127"), (b";branch", b"; branch"),
                                             (b"Via: ", b"Via: ,"), (b";rport", b"\"x\";rport")]))
                lines[vias[0]] = lines[vias[0]].replace(*edit, 1)
        elif op == 13 and i < len(lines):  # a quoted string or <...> that never closes
            lines[i] += draw(st.sampled_from([b", \"open", b", <open", b",", b" \\"]))
        elif op == 14:  # the next Via value made odd
            vias = [k for k, ln in enumerate(lines) if ln.startswith(b"Via:")]
            if len(vias) >= 2:
                lines[vias[1]] = draw(st.sampled_from([b"Via:", b"Via: ,", b"Via: , SIP/2.0/UDP 1.2.3.4",
                                                       b"Via: SIP/2.0/TCP 127.0.0.3:5062;branch=z9hG4bK-x;rport",
                                                       b"Via: sip/2.0/tcp 127.0.0.3", b"Via: \"q,\" x, y"]))
        elif op == 15:  # CSeq / To oddities
            lines.append(draw(st.sampled_from([b"CSeq: 1 invite", b"CSeq:  1\tINVITE ", b"CSeq: 01 INVITE",
                                               b"CSeq: 2147483648 INVITE", b"To: <sip:x@y>;TAG=Q",
                                               b"To: \"a>;tag=1\" <sip:x@y>", b"To: <sip:x@y>;tag= ;a"])))
        elif op == 16:  # random bytes flipped anywhere in the head
            raw = bytearray(b"\r\n".join(lines))
            if raw:
                at = draw(st.integers(0, len(raw) - 1))
                raw[at] = draw(st.integers(0, 255))
            lines = bytes(raw).split(b"\r\n")
        elif op == 17:  # bare LF line ends
            lines = [b"\n".join(lines)]
    head = lines + ([content_length] if content_length is not None else [])
    return b"\r\n".join(head) + b"\r\n\r\n" + body + draw(st.sampled_from([b"", b"tail"]))


@st.composite
def scenarios(draw):
    return (draw(st.booleans()),  # request over TCP
            draw(st.sampled_from([b"INVITE", b"OPTIONS", b"MESSAGE"])),  # (MESSAGE: from signaling)
            draw(st.lists(st.tuples(st.sampled_from([b"100 Trying", b"180 Ringing", b"200 OK", b"486 Busy Here"]),
                                    st.booleans(),  # with a body
                                    st.sampled_from([0, 0, 1, 2]),  # from the next hop, the other side, a stranger
                                    st.booleans(),  # over TCP
                                    st.booleans()),  # the core restarted before it (same key)
                          min_size=1, max_size=3)))


@settings(max_examples=int(os.environ.get("RESPONSE_FAST_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios(), st.data())
def test_fast_path_matches_the_full_path(case, data):
    tcp, method, answers = case
    pair = _pair()
    if method == b"MESSAGE":
        fwd = _forward_to_gateway(pair, 9, tcp)
        sources = (GATEWAY, UPSTREAM, ("127.0.0.9", 5062))
    else:
        fwd = _forward(pair, 9, tcp, method)
        sources = (UPSTREAM, GATEWAY, ("127.0.0.9", 5080))
    now = 1000.0
    for status, with_body, who, over_tcp, restarted in answers:
        src = sources[who]
        if restarted:
            pair = _pair()
        body = SDP if with_body else b""
        msg = data.draw(mutations(_answer_lines(fwd, status, 9), body))
        now += 0.01
        feed(pair, msg, src, now, over_tcp)


# -- the C function itself ----------------------------------------------------------------------
def _response_args(core: ProxyCore, data) -> tuple:
    return (data, sipmsg._NAME_CACHE, core.own_via_head, len(core_module.BRANCH_PREFIX), sipmsg.MAX_HEADER_LINES,
            sipmsg.MAX_CONTENT_LENGTH_DIGITS, core_module.MAX_VIAS, sipmsg.MAX_MESSAGE)


def test_response_refuses_bad_arguments():
    from sipwatch import _sipscan
    core = _pair()[0]
    args = _response_args(core, b"SIP/2.0 200 OK\r\n\r\n")
    with pytest.raises(TypeError):
        _sipscan.response(*args[:7])
    with pytest.raises(TypeError):
        _sipscan.response(args[0], list(args[1]), *args[2:])
    with pytest.raises(TypeError):
        _sipscan.response(*args[:2], "head", *args[3:])
    with pytest.raises(TypeError):
        _sipscan.response(*args[:4], "1000", *args[5:])
    assert _sipscan.response(bytearray(args[0]), *args[1:]) is None  # (only bytes qualify)
    assert _sipscan.response(*args[:6], 1000, args[7]) is None  # (more Vias than it can hold)


def test_no_reference_or_memory_is_kept_by_the_response_call():
    from sipwatch import _sipscan
    pair = _pair()
    fwd = _forward(pair, 6, False)
    lines = _answer_lines(fwd, b"200 OK", 6)
    good = _join(lines, SDP)
    merged = _join([lines[0], lines[1] + b", SIP/2.0/UDP a;branch=b, c"] + lines[3:], SDP + b"xx", length=False)
    odd = [good.replace(b"CSeq: 1", b"CSeq: x"), good.replace(b"Call-ID:", b"X-Unknown-Name: 1\r\nCall-ID:"),
           good.replace(b"Content-Length: ", b"Content-Length: 9"), b"INVITE sip:a SIP/2.0\r\n\r\n"]
    args = [_response_args(pair[0], d) for d in [good, merged, *odd]]
    assert _sipscan.response(*args[0]) is not None and _sipscan.response(*args[1]) is not None

    def calls():
        for a in args:
            _sipscan.response(*a)
    watched = [good, merged, *odd, pair[0].own_via_head]
    refs, grown = kept_by(calls, watched, 2000)
    assert refs == [0] * len(watched)
    assert grown < 16_000, grown


# -- the accounting held back until settle() ------------------------------------------------------
def test_held_back_accounting_is_done_before_anything_reads_the_state():
    """With ``defer_bookkeeping`` (the edges' setting) a relayed response's accounting waits for
    ``settle()``; whatever reads the state first does it: the records' drain, the timers, the
    next message. Each leaves the state as the core that did it at once."""
    for read in ("drain", "timers", "next message"):
        fast, full, deferring = _pair()
        fwd = _forward((fast, full, deferring), 3, False, b"OPTIONS")
        data = _join(_answer_lines(fwd, b"200 OK", 3))
        assert full.receive_datagram(data, UPSTREAM, 1000.5) == deferring.receive_datagram(data, UPSTREAM, 1000.5)
        assert deferring._deferred is not None  # (held back: the state differs until it is done)
        assert state(deferring) != state(full)
        if read == "drain":
            assert [k for k, _ in deferring.drain_finished()] == [k for k, _ in full.drain_finished()] != []
        elif read == "timers":
            deferring.handle_timers(1000.6)
            full.handle_timers(1000.6)
        else:
            ping = b"\r\n\r\n"  # (a keep-alive: the next datagram, whatever it is)
            assert deferring.receive_datagram(ping, GATEWAY, 1000.6) == full.receive_datagram(ping, GATEWAY, 1000.6)
        assert deferring._deferred is None
        assert state(deferring) == state(full), read


@pytest.mark.pure_python
def test_held_back_accounting_that_raises_costs_the_record_not_the_caller(monkeypatch):
    fast, full, deferring = _pair()
    fwd = _forward((fast, full, deferring), 4, False, b"OPTIONS")
    data = _join(_answer_lines(fwd, b"200 OK", 4))
    monkeypatch.setattr(deferring.tracker, "response_to", lambda *a: 1 / 0)
    assert deferring.receive_datagram(data, UPSTREAM, 1000.5) == full.receive_datagram(data, UPSTREAM, 1000.5)
    deferring.settle()
    deferring.settle()  # (nothing left: a no-op)
    assert deferring.stats.internal_errors["datagram"] == 1
    assert deferring.last_internal_error.startswith("ZeroDivisionError")
