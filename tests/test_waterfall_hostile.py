"""``sipwatch waterfall`` on a spans file someone else wrote lines into: a malformed span is skipped
and counted (one line on stderr), the well-formed spans beside it still render, parent cycles and
very deep parent chains render, and the cost per row does not grow with the size of the trace."""
from __future__ import annotations

import orjson
import pytest

from sipwatch.waterfall import SpanRow, main, render_waterfall, slowest_trace


def span(tid="good", sid="a", parent="", name="INVITE", kind=3, st="1000", en="2000", **extra) -> dict:
    s = {"traceId": tid, "spanId": sid, "name": name, "kind": kind,
         "startTimeUnixNano": st, "endTimeUnixNano": en, "attributes": [], "events": []}
    if parent:
        s["parentSpanId"] = parent
    s.update(extra)
    return s


def line(spans, service="sipwatch") -> bytes:
    return orjson.dumps({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"spans": spans}]}]}) + b"\n"


GOOD = line([span(sid="root", name="SIP call", kind=2, st="1000", en="9000000"),
             span(sid="tx", parent="root", name="VALIDTX", st="2000", en="5000000")])

HOSTILE = {
    "top_level_list": b"[1,2,3]\n",
    "not_json": b"{\"resourceSpans\": [\n",
    "status_string": line([span(tid="bad", status="bad")]),
    "attribute_value_int": line([span(tid="bad", attributes=[{"key": "x", "value": 5}])]),
    "attribute_key_list": line([span(tid="bad", attributes=[{"key": ["x"], "value": {"stringValue": "y"}}])]),
    "int_value_garbage": line([span(tid="bad", attributes=[{"key": "x", "value": {"intValue": "1e999"}}])]),
    "timestamp_4000_digits": line([span(tid="bad", st="1", en="9" * 4000)]),
    "timestamp_negative": line([span(tid="bad", st="-5", en=str(-10**18))]),
    "end_before_start": line([span(tid="bad", st="5000", en="1000")]),
    "setup_ms_string": line([span(tid="bad", kind=2, attributes=[
        {"key": "sip.call.setup_ms", "value": {"stringValue": "x"}}])]),
    "kind_null": line([span(tid="bad", kind=None)]),
    "kind_out_of_range": line([span(tid="bad", kind=99)]),
    "event_time_null": line([span(tid="bad", events=[{"name": "e", "timeUnixNano": None}])]),
    "trace_id_list": line([span(tid=[1])]),
    "name_int": line([span(tid="bad", name=5)]),
    "span_not_object": line([7]),
    "service_name_list": line([span(tid="bad")], service=None).replace(
        b'{"stringValue":null}', b'{"arrayValue":{"values":[{"stringValue":"x"}]}}'),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_malformed_span_is_skipped_and_counted(case, tmp_path, capsys):
    f = tmp_path / "spans.jsonl"
    f.write_bytes(HOSTILE[case] + GOOD)
    assert main([str(f), "--ladder"]) == 0
    out, err = capsys.readouterr()
    assert "VALIDTX" in out and "SIP call" in out
    assert "Traceback" not in err
    assert err.splitlines() == ["sipwatch waterfall: skipped 1 malformed span or record"]


@pytest.mark.parametrize("case", ["top_level_list", "status_string", "kind_null", "timestamp_negative"])
def test_only_malformed_spans_is_a_clean_error(case, tmp_path, capsys):
    f = tmp_path / "spans.jsonl"
    f.write_bytes(HOSTILE[case])
    assert main([str(f)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["sipwatch waterfall: skipped 1 malformed span or record",
                                "sipwatch waterfall: no spans"]


def test_parent_cycle_renders_every_span(tmp_path, capsys):
    """Spans naming each other as parent (no root at all) still render, each once."""
    f = tmp_path / "spans.jsonl"
    f.write_bytes(line([span(sid="a", parent="b", name="CYCA", st="1000", en="9000"),
                        span(sid="b", parent="a", name="CYCB", st="2000", en="9000"),
                        span(sid="c", parent="c", name="SELF", st="3000", en="9000"),
                        span(sid="d", parent="b", name="TAIL", st="4000", en="9000")]))
    assert main([str(f)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    rows = [r for r in out.splitlines() if r.lstrip().startswith(("CYC", "SELF", "TAIL"))]
    assert [r.split()[0] for r in rows] == ["CYCA", "CYCB", "TAIL", "SELF"]
    assert rows[0].startswith("CYCA") and rows[1].startswith("  CYCB") and rows[2].startswith("    TAIL")


def test_deep_parent_chain_renders(tmp_path, capsys):
    """A parent chain far deeper than the recursion limit: one row per span, the indent cut
    at the label width as before."""
    n = 3000
    f = tmp_path / "spans.jsonl"
    f.write_bytes(line([span(sid=f"s{i}", parent=f"s{i - 1}" if i else "", name=f"N{i}",
                             st=str(1000 + i), en="3000000") for i in range(n)]))
    assert main([str(f)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = out[2:-1]
    assert len(rows) == n
    assert rows[0].startswith("N0 ") and rows[1].startswith("  N1 ")
    assert rows[-1].startswith(" " * 30 + " ")  # label is all indent at this depth


def test_slowest_trace_with_negative_duration_is_found():
    """A trace whose only durations are negative is still a trace (it was "no spans")."""
    s = SpanRow("t", "a", "", "INVITE", 2, 10, 5, {}, [], False, "svc")
    assert slowest_trace([s]) == [s]


class CountingList(list):
    """A trace that counts how often it is iterated from the start."""
    iterations = 0

    def __iter__(self):
        CountingList.iterations += 1
        return super().__iter__()


@pytest.mark.parametrize("n", [50, 400])
def test_per_row_work_does_not_walk_the_whole_trace(n, monkeypatch):
    """Rendering looks at the whole trace a fixed number of times, not once per row."""
    root = SpanRow("t", "root", "", "SIP call", 2, 0, 10**9, {}, [], False, "a")
    kids = [SpanRow("t", f"s{i}", "root", "INVITE", 3, i, i + 1000, {}, [], False, "b" if i % 2 else "a")
            for i in range(n)]
    trace = CountingList([root, *kids])
    monkeypatch.setattr(CountingList, "iterations", 0)
    text = render_waterfall(trace)
    assert text.count("INVITE [b]") == n // 2  # several services: each row says its service
    assert CountingList.iterations < 20


class Name(str):
    """A span name that records the longest indent put in front of it."""
    longest_indent = 0

    def __radd__(self, other):
        Name.longest_indent = max(Name.longest_indent, len(other))
        return str.__add__(other, self)


def test_deep_chain_labels_do_not_grow_with_depth(monkeypatch):
    """A row's label is cut at the label width: a deep span's indent is not built any longer
    than that (else a chain of n spans costs n squared)."""
    n = 500  # within the recursion limit: this is about the labels, not the depth
    monkeypatch.setattr(Name, "longest_indent", 0)
    chain = [SpanRow("t", f"s{i}", f"s{i - 1}" if i else "", Name("X"), 3, i, 10**6, {}, [], False, "a")
             for i in range(n)]
    text = render_waterfall(chain)
    assert len(text.splitlines()) == n + 3
    assert 0 < Name.longest_indent <= 60
