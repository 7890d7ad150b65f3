"""µs per span, in process: the SDK path (SpanBuilder → ReadableSpan → SDK protobuf encoder, and
the OTLP/JSON line from the ReadableSpans) against the direct encoder (protobuf + JSON from
the records). Records: answered calls as the proxy's Tracker emits them (INVITE 100/180/200,
ACK, BYE: 4 spans per call). Run: ``python tests/span_micro.py [calls]``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402

from sipwatch import __version__  # noqa: E402
from sipwatch.otlp_encode import SpanEncoder  # noqa: E402
from sipwatch.state import Tracker  # noqa: E402
from sipwatch.stats import ACK, BYE, INVITE, Stats  # noqa: E402
from sipwatch.tracing import SpanBuilder, make_resource, otlp_json_line  # noqa: E402

BATCH = 512


def records(n: int) -> list:
    return answered_calls(n, lambda i: (
        b"%08d-a3f1c2d4e5b6@10.20.30.40" % i, b'"Alice" <sip:+4930123456%02d@10.0.0.1>;tag=%08d' % (i % 100, i),
        b"<sip:+4940987654%02d@10.0.0.2>" % (i % 100), b"sip:+4940987654%02d@10.0.0.2" % (i % 100)))


def answered_calls(n: int, party, provisional: bool = True) -> list:
    """Finished records of ``n`` answered calls as the proxy's Tracker emits them: INVITE (100 and
    180 when ``provisional``, 200), ACK, BYE (200); ``party(i)`` gives call i's (Call-ID, From, To,
    Request-URI)."""
    tr = Tracker(Stats(ring_size=16), finished_max=10 * n)
    t = 1_764_500_000.0
    sig, gw = ("10.0.0.2", 5060), ("10.0.0.1", 5060)
    for i in range(n):
        call_id, frm, to, ruri = party(i)
        c = tr.new_call(call_id, (7 << 100) + i, 3 * i + 1, 0, True, t, True, frm, to, ruri)
        key = (b"z9hG4bKsw%012d" % i, b"INVITE")
        tr.request(key, INVITE, b"INVITE", 1, c, t, 10**9 + i, c.span_id, 0, sig, True)
        if provisional:
            tr.response(key, 100, t + 0.001)
            tr.response(key, 180, t + 0.01)
        tr.response(key, 200, t + 0.05, b"%08x" % i)
        tr.ack(ACK, b"ACK", 1, c, t + 0.06, 2 * 10**9 + i, 0, sig)
        bk = (b"z9hG4bKswb%012d" % i, b"BYE")
        tr.request(bk, BYE, b"BYE", 2, c, t + 2, 3 * 10**9 + i, c.span_id, 1, gw, False)
        tr.response(bk, 200, t + 2.003)
        t += 0.001
    return list(tr.finished)


def per_span(fn, recs) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for i in range(0, len(recs), BATCH):
            fn(recs[i:i + BATCH])
        best = min(best, time.process_time() - t0)
    return best / len(recs) * 1e6


def cold(recs, res, call_id_mask=None, accelerate=True) -> float:
    """µs per span with a fresh encoder per pass: every call's parties masked once, as in the
    proxy where each call is seen once (the best-of-3 figures below reuse the warm caches)."""
    best = float("inf")
    for _ in range(3):
        enc = SpanEncoder(res.attributes, __version__, "partial", call_id_mask, accelerate=accelerate)
        t0 = time.process_time()
        for i in range(0, len(recs), BATCH):
            out = [enc.call(o) if k == "call" else enc.tx(o) for k, o in recs[i:i + BATCH]]
            enc.request([p for p, _ in out])
            enc.json_line([j for _, j in out])
        best = min(best, time.process_time() - t0)
    return best / len(recs) * 1e6


def handoff(recs) -> float:
    """µs per record on the proxy's loop: the tuple and the frame the span worker gets."""
    from sipwatch.span_worker import call_tuple, records_frame, tx_tuple
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for i in range(0, len(recs), 80):  # a 20-ms tick's worth at 1000 calls/s
            records_frame([call_tuple(o) if k == "call" else tx_tuple(o) for k, o in recs[i:i + 80]])
        best = min(best, time.process_time() - t0)
    return best / len(recs) * 1e6


def main(n: int = 2000) -> None:
    recs = records(n)
    res = make_resource("sipwatch", "proxy", {})
    builder = SpanBuilder(res)
    enc = SpanEncoder(res.attributes, __version__)

    def sdk_pb(batch):
        encode_spans([builder.build(k, o) for k, o in batch]).SerializeToString()

    def sdk_both(batch):
        spans = [builder.build(k, o) for k, o in batch]
        encode_spans(spans).SerializeToString()
        otlp_json_line(spans, res)

    def build_only(batch):
        [builder.build(k, o) for k, o in batch]

    def direct_both(batch):
        out = [enc.call(o) if k == "call" else enc.tx(o) for k, o in batch]
        enc.request([p for p, _ in out])
        enc.json_line([j for _, j in out])

    from sipwatch.span_worker import call_tuple, tx_tuple
    flat = {id(o): call_tuple(o) if k == "call" else tx_tuple(o) for k, o in recs}

    def direct_flat(batch):  # what the span worker does with the tuples it receives
        pbs, lines = [], []
        enc.encode([flat[id(o)] for _, o in batch], pbs, lines)
        enc.request(pbs)
        enc.json_line(lines)

    enc_py = SpanEncoder(res.attributes, __version__, accelerate=False)

    def direct_flat_py(batch):  # the same without the C assembly (sipwatch/_otlpenc.c)
        pbs, lines = [], []
        enc_py.encode([flat[id(o)] for _, o in batch], pbs, lines)
        enc_py.request(pbs)
        enc_py.json_line(lines)

    print(f"{len(recs)} spans ({n} calls), batches of {BATCH}, CPU µs per span (best of 3):")
    for name, fn in (("SpanBuilder only (ReadableSpan)", build_only),
                     ("SDK path: build + SDK protobuf", sdk_pb),
                     ("SDK path: build + SDK protobuf + OTLP/JSON", sdk_both),
                     ("direct: protobuf + OTLP/JSON", direct_both),
                     ("direct, from the worker's tuples" + (" (C)" if enc.accelerated else ""), direct_flat),
                     ("  same, Python only", direct_flat_py)):
        print(f"  {name:45s} {per_span(fn, recs):7.2f}")
    from sipwatch.masking import CallIdMasker
    print(f"  {'direct, cold caches (fresh encoder per pass)':45s} {cold(recs, res):7.2f}")
    print(f"  {'  same, Call-IDs masked (digits mode)':45s} {cold(recs, res, CallIdMasker('digits', b'k')):7.2f}")
    print(f"  {'  same, Python only':45s} {cold(recs, res, CallIdMasker('digits', b'k'), False):7.2f}")
    print(f"  {'loop side: tuple + frame per record':45s} {handoff(recs):7.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
