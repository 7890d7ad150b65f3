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


_U64 = 1 << 64  # OTLP times are fixed64 nanoseconds; intValue is an int64
_KIND_MAX = 5
_NUM_DIGITS = 20  # len(str(2**64 - 1)): a longer number string is out of range whatever it says


class _Malformed(Exception):
    """A span (or a line) of the spans file that does not have the shape the renderer relies on."""


def _int(x, lo: int, hi: int) -> int:
    """``x`` (a JSON int, or the decimal string OTLP/JSON writes 64-bit numbers as) in [lo, hi)."""
    if isinstance(x, bool):
        raise _Malformed
    if isinstance(x, str):
        digits = x[1:] if x[:1] == "-" else x
        if not (0 < len(digits) <= _NUM_DIGITS and digits.isascii() and digits.isdigit()):
            raise _Malformed
        x = int(x)
    elif not isinstance(x, int):
        raise _Malformed
    if not lo <= x < hi:
        raise _Malformed
    return x


def _typed(x, kind: type, default=None):
    """``x`` if it is a ``kind`` (``default`` for a missing one, when given), else _Malformed."""
    if x is None and default is not None:
        return default
    if not isinstance(x, kind):
        raise _Malformed
    return x


def _value(v):
    if not isinstance(v, dict):
        raise _Malformed
    for k, x in v.items():
        if k == "intValue":
            return _int(x, -(1 << 63), _U64)
        if k == "arrayValue":
            if not isinstance(x, dict):
                raise _Malformed
            values = x.get("values", ())
            if not isinstance(values, list | tuple):
                raise _Malformed
            return [_value(y) for y in values]
        return x
    return None


def _attrs(kvs) -> dict:
    if kvs is None:
        return {}
    if not isinstance(kvs, list):
        raise _Malformed
    out = {}
    for kv in kvs:
        if not isinstance(kv, dict):
            raise _Malformed
        out[_typed(kv.get("key"), str)] = _value(kv.get("value", {}))
    setup = out.get("sip.call.setup_ms")
    if "sip.call.setup_ms" in out and (isinstance(setup, bool) or not isinstance(setup, int | float)):
        raise _Malformed  # printed with a float format
    return out


def _list(x) -> list:
    if x is None:
        return []
    if not isinstance(x, list):
        raise _Malformed
    return x


def _span(s, service: str) -> SpanRow:
    """One span of the file as a SpanRow; _Malformed when a field has the wrong type or range."""
    s = _typed(s, dict)
    start = _int(s.get("startTimeUnixNano"), 0, _U64)
    end = _int(s.get("endTimeUnixNano"), 0, _U64)
    if end < start:
        raise _Malformed
    events = []
    for e in _list(s.get("events")):
        e = _typed(e, dict)
        events.append((_typed(e.get("name"), str, ""), _int(e.get("timeUnixNano"), 0, _U64),
                       _attrs(e.get("attributes"))))
    return SpanRow(
        _typed(s.get("traceId"), str), _typed(s.get("spanId"), str), _typed(s.get("parentSpanId"), str, ""),
        _typed(s.get("name"), str),
        _int(s.get("kind", 0), 0, _KIND_MAX + 1), start, end,
        _attrs(s.get("attributes")), events,
        _typed(s.get("status"), dict, {}).get("code", 0) == 2, service)


def load_spans_counted(path: str) -> tuple[list[SpanRow], int]:
    """Every well-formed span in an OTLP-JSON lines file (one ExportTraceServiceRequest per line),
    and how many spans (or unreadable lines, resources or scopes) were skipped as malformed. The
    file is written by the sidecar, but anyone who can write a line into it can write anything:
    whatever reaches the renderer has the types and ranges it relies on."""
    out: list[SpanRow] = []
    skipped = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
                resource_spans = _list(_typed(doc, dict).get("resourceSpans"))
            except (orjson.JSONDecodeError, _Malformed):
                skipped += 1
                continue
            for rs in resource_spans:
                try:
                    rs = _typed(rs, dict)
                    service = _typed(_attrs(_typed(rs.get("resource"), dict, {}).get("attributes")).get("service.name"), str, "?")
                    scope_spans = _list(rs.get("scopeSpans"))
                except _Malformed:
                    skipped += 1
                    continue
                for ss in scope_spans:
                    try:
                        spans = _list(_typed(ss, dict).get("spans"))
                    except _Malformed:
                        skipped += 1
                        continue
                    for s in spans:
                        try:
                            out.append(_span(s, service))
                        except _Malformed:
                            skipped += 1
    return out, skipped


def load_spans(path: str) -> list[SpanRow]:
    """Every well-formed span in an OTLP-JSON lines file (malformed ones skipped)."""
    return load_spans_counted(path)[0]


def by_trace(spans) -> dict[str, list[SpanRow]]:
    traces: dict[str, list[SpanRow]] = {}
    for s in spans:
        traces.setdefault(s.trace_id, []).append(s)
    return traces


def _roots(spans: list[SpanRow]) -> list[SpanRow]:
    """Link children to parents; spans whose parent is not in the list are roots. Parent ids come
    from the file, so they can form a cycle (a span its own ancestor): of each cycle the earliest
    span is made a root too, so that every span is shown once and the tree is finite."""
    ids = {s.span_id: s for s in spans}
    order = sorted(spans, key=lambda s: (s.start_ns, s.end_ns))
    rank = {id(s): i for i, s in enumerate(order)}
    parent_of = {id(s): ids.get(s.parent_span_id) for s in order}
    # follow each span's parent chain until a root, a span already settled or a cycle: linear,
    # every span is put on a path once
    done: set[int] = set()
    cut: set[int] = set()  # spans shown as roots though they name a parent in the trace
    for s in order:
        path: list[SpanRow] = []
        on_path: set[int] = set()
        x: SpanRow | None = s
        while x is not None and id(x) not in done and id(x) not in on_path:
            path.append(x)
            on_path.add(id(x))
            x = parent_of[id(x)]
        if x is not None and id(x) in on_path:  # the path ran into itself: x .. path[-1] is a cycle
            cycle = path[path.index(x):]
            cut.add(id(min(cycle, key=lambda c: rank[id(c)])))
        done.update(on_path)
    for s in spans:
        s.children = []
    roots = []
    for s in order:
        parent = None if id(s) in cut else parent_of[id(s)]
        (parent.children if parent is not None else roots).append(s)
    return roots


def slowest_trace(spans) -> list[SpanRow] | None:
    """The trace that waited longest on the next hop: the largest sum of transaction (CLIENT)
    span durations. How long a call was held says nothing about where it was slow; time spent
    waiting for answers does. Traces without transaction spans count by their root span."""
    best, best_d = None, None
    for trace in by_trace(spans).values():
        waited = [s.end_ns - s.start_ns for s in trace if s.kind == CLIENT]
        d = sum(waited) if waited else max(r.end_ns - r.start_ns for r in _roots(trace))
        if best_d is None or d > best_d:
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
    several_services = len({s.service for s in trace}) > 1  # once per trace, not per row
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

    def row(s: SpanRow, depth: int) -> None:
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
        # the label is cut to label_w: deeper indents than that would only be cut off again
        label = "  " * min(depth, label_w) + s.name
        if s.kind == 2 and legs > 1 and "sip.leg" in s.attributes:
            label += f" leg {s.attributes['sip.leg']}"
        if s.status_code and s.kind != 2:
            label += f" {s.status_code}"
        if several_services:
            label += f" [{s.service}]"
        line = (f"{label[:label_w]:{label_w}} {_ms(s.start_ns - t0):>9} {_ms(s.end_ns - s.start_ns):>9}  "
                f"|{''.join(bar)}|")
        if marks:
            line += "  " + " ".join(marks)
        rows.append(line)

    # depth first, parents before children, children in start order; a stack rather than
    # recursion, since a parent chain can be as long as the file
    stack = [(r, 0) for r in reversed(roots)]
    while stack:
        s, depth = stack.pop()
        row(s, depth)
        stack.extend((c, depth + 1) for c in reversed(s.children))
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
        spans, skipped = load_spans_counted(args.spans_file)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"sipwatch waterfall: cannot read {args.spans_file}: {exc}\n")
        return 2
    if skipped:
        sys.stderr.write(f"sipwatch waterfall: skipped {skipped} malformed span{'s' if skipped != 1 else ''} "
                         f"or record{'s' if skipped != 1 else ''}\n")
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
