"""Text waterfall and ladder of one call from exported spans (the ``--spans-file`` OTLP-JSON lines).

For looking at a trace where no Jaeger/Tempo is at hand: one row per span, nested by parent,
bars scaled to the call's duration, provisional responses marked on their transaction's bar.
A call through a B2BUA shows its legs in one trace: each further leg's ``SIP call`` span (labelled
``leg N``) nests under the leg it was placed for, next to the ``B2BUA leg setup`` span (the time
the B2BUA took from that leg's INVITE to placing this one); the ladder prefixes each message with
its leg.

    sipwatch waterfall SPANS.jsonl [--trace TRACE_ID] [--ladder]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import orjson

WIDTH = 48
KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
CLIENT = 3  # OTLP SpanKind of the transaction spans


@dataclass
class SpanRow:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict
    events: list  # [(name, time_ns, attributes)]
    error: bool
    service: str
    children: list = field(default_factory=list)

    @property
    def status_code(self):
        return self.attributes.get("sip.response.status_code")


def _value(v: dict):
    for k, x in v.items():
        if k == "intValue":
            return int(x)
        if k == "arrayValue":
            return [_value(y) for y in x.get("values", ())]
        return x
    return None


def _attrs(kvs) -> dict:
    return {kv["key"]: _value(kv.get("value", {})) for kv in kvs or ()}


def load_spans(path: str) -> list[SpanRow]:
    """Every span in an OTLP-JSON lines file (one ExportTraceServiceRequest per line)."""
    out = []
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            doc = orjson.loads(line)
            for rs in doc.get("resourceSpans", ()):
                service = _attrs(rs.get("resource", {}).get("attributes")).get("service.name", "?")
                for ss in rs.get("scopeSpans", ()):
                    for s in ss.get("spans", ()):
                        out.append(SpanRow(
                            s["traceId"], s["spanId"], s.get("parentSpanId", ""), s["name"],
                            int(s.get("kind", 0)), int(s["startTimeUnixNano"]),
                            int(s["endTimeUnixNano"]), _attrs(s.get("attributes")),
                            [(e.get("name", ""), int(e["timeUnixNano"]), _attrs(e.get("attributes")))
                             for e in s.get("events", ())],
                            s.get("status", {}).get("code", 0) == 2, service))
    return out


def by_trace(spans) -> dict[str, list[SpanRow]]:
    traces: dict[str, list[SpanRow]] = {}
    for s in spans:
        traces.setdefault(s.trace_id, []).append(s)
    return traces


def _roots(spans: list[SpanRow]) -> list[SpanRow]:
    """Link children to parents; spans whose parent is not in the list are roots."""
    ids = {s.span_id: s for s in spans}
    for s in spans:
        s.children = []
    roots = []
    for s in sorted(spans, key=lambda s: (s.start_ns, s.end_ns)):
        parent = ids.get(s.parent_span_id)
        (parent.children if parent is not None else roots).append(s)
    return roots


def slowest_trace(spans) -> list[SpanRow] | None:
    """The trace that waited longest on the next hop: the largest sum of transaction (CLIENT)
    span durations. How long a call was held says nothing about where it was slow; time spent
    waiting for answers does. Traces without transaction spans count by their root span."""
    best, best_d = None, -1
    for trace in by_trace(spans).values():
        waited = [s.end_ns - s.start_ns for s in trace if s.kind == CLIENT]
        d = sum(waited) if waited else max(r.end_ns - r.start_ns for r in _roots(trace))
        if d > best_d:
            best, best_d = trace, d
    return best


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f}"


def render_waterfall(trace: list[SpanRow], width: int = WIDTH) -> str:
    """One row per span: offset, duration, a bar on a common scale with events marked."""
    roots = _roots(trace)
    t0 = min(s.start_ns for s in trace)
    t1 = max(s.end_ns for s in trace)
    total = max(t1 - t0, 1)
    call = next((s for s in roots if s.kind == 2), roots[0])
    a = call.attributes
    legs = sum(1 for s in trace if s.kind == 2 and "sip.leg" in s.attributes)
    head = [f"trace {call.trace_id}  call-id {a.get('sip.call_id', '?')}  "
            + (f"legs {legs}  " if legs > 1 else "")
            + f"{a.get('sip.call.outcome', call.name)}"
            + (f" ({call.status_code})" if call.status_code else "")
            + (f"  setup {a['sip.call.setup_ms']:.1f} ms" if "sip.call.setup_ms" in a else "")
            + f"  total {_ms(total)} ms"]
    label_w = 30
    head.append(f"{'span':{label_w}} {'start ms':>9} {'dur ms':>9}  |0{' ' * (width - 2 - len(_ms(total)))}{_ms(total)}|")
    rows: list[str] = []

    def col(ns: int) -> int:
        return min(width - 1, max(0, (ns - t0) * width // total))

    def walk(s: SpanRow, depth: int) -> None:
        bar = [" "] * width
        lo, hi = col(s.start_ns), col(s.end_ns)
        for i in range(lo, hi + 1):
            bar[i] = "="
        marks = []
        for name, t, attrs in s.events:
            code = attrs.get("sip.response.status_code", name)
            bar[col(t)] = "|"
            marks.append(f"{code}@{_ms(t - s.start_ns)}")
        if s.error:
            bar[hi] = "X"
        label = "  " * depth + s.name
        if s.kind == 2 and legs > 1 and "sip.leg" in s.attributes:
            label += f" leg {s.attributes['sip.leg']}"
        if s.status_code and s.kind != 2:
            label += f" {s.status_code}"
        if len({x.service for x in trace}) > 1:
            label += f" [{s.service}]"
        line = (f"{label[:label_w]:{label_w}} {_ms(s.start_ns - t0):>9} {_ms(s.end_ns - s.start_ns):>9}  "
                f"|{''.join(bar)}|")
        if marks:
            line += "  " + " ".join(marks)
        rows.append(line)
        for c in s.children:
            walk(c, depth + 1)

    for r in roots:
        walk(r, 0)
    legend = "  (= span, | provisional response (status@ms after the span start), X error)"
    return "\n".join(head + rows + [legend])


def render_ladder(trace: list[SpanRow]) -> str:
    """Messages in time order as seen by the proxy: requests out, responses back."""
    t0 = min(s.start_ns for s in trace)
    # a trace with several B2BUA legs: each message says its leg (its call span's sip.leg)
    leg_of = {s.span_id: s.attributes["sip.leg"] for s in trace if s.kind == 2 and "sip.leg" in s.attributes}
    several = len(leg_of) > 1
    msgs = []
    for s in trace:
        if s.kind == 1 and several:  # the B2BUA's own time between two legs' INVITEs
            msgs.append((s.end_ns - 1, f"{'':8}   B2BUA placed leg {s.attributes.get('sip.leg', '?')} "
                                   f"{_ms(s.end_ns - s.start_ns)} ms after leg "
                                   f"{leg_of.get(s.parent_span_id, '?')}'s INVITE"))
        if s.kind != 3:
            continue
        tag = f"[leg {leg_of.get(s.parent_span_id, '?')}] " if several else ""
        peer = f"{s.attributes.get('server.address', '?')}:{s.attributes.get('server.port', '?')}"
        msgs.append((s.start_ns, f"{tag}{s.name:<8} ------------------------>  {peer}"))
        for _, t, attrs in s.events:
            msgs.append((t, f"{tag}{'':8} <------------------------  {attrs.get('sip.response.status_code', '?')}"))
        if s.status_code:
            msgs.append((s.end_ns, f"{tag}{'':8} <------------------------  {s.status_code} ({s.name})"))
        elif s.error:
            msgs.append((s.end_ns, f"{tag}{'':8}           x timeout        ({s.name})"))
    msgs.sort(key=lambda m: m[0])
    return "\n".join(f"{_ms(t - t0):>9} ms  {text}" for t, text in msgs)


def render_slowest(path: str, ladder: bool = False) -> str:
    """Waterfall of the slowest call in an OTLP-JSON lines file (what the demo prints)."""
    trace = slowest_trace(load_spans(path))
    if trace is None:
        return "(no spans)"
    out = render_waterfall(trace)
    return out + "\n\n" + render_ladder(trace) if ladder else out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sipwatch waterfall", description="Text waterfall of a call from an OTLP-JSON lines spans file.")
    p.add_argument("spans_file")
    p.add_argument("--trace", help="trace id to show (default: the slowest call)")
    p.add_argument("--ladder", action="store_true", help="also print the message ladder")
    args = p.parse_args(argv)
    try:
        spans = load_spans(args.spans_file)
    except (OSError, ValueError, KeyError) as exc:
        sys.stderr.write(f"sipwatch waterfall: cannot read {args.spans_file}: {exc}\n")
        return 2
    trace = by_trace(spans).get(args.trace) if args.trace else slowest_trace(spans)
    if not trace:
        sys.stderr.write("sipwatch waterfall: no such trace\n" if args.trace else "sipwatch waterfall: no spans\n")
        return 1
    from .summary import terminal_safe  # (names and attributes came from the network)
    print(terminal_safe(render_waterfall(trace)))
    if args.ladder:
        print()
        print(terminal_safe(render_ladder(trace)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
