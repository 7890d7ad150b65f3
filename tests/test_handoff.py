"""The housekeeping's compiled fast paths give what the generic paths give, for records a real
proxy core made from real call flows: the span worker's tuples (value for value, marshal byte for
byte), the call histograms' figures and the call summary's fields. A record that is not of the
proxy's own types (a capture's stand-in, a test's) takes the generic path with the same result."""
from __future__ import annotations

import marshal

import orjson
from prometheus_client import generate_latest

from sipwatch.handoff import call_figures, let_go_all, span_tuples
from sipwatch.metrics import Metrics
from sipwatch.otlp_encode import call_tuple, tx_tuple
from sipwatch.state import RECORD, Call, LegGroup, Transaction
from sipwatch.stats import Stats
from sipwatch.summary import add_summary_fields
from sipwatch.tracecontext import sampled_by_ratio

import bench_micro


class _Plain:
    """The same attributes as the record it wraps, read through ``getattr`` (not a state type)."""

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if name == "call" and isinstance(value, Call):
            return _Plain(value)
        if name == "transactions":
            return [_Plain(t) for t in value]
        return value


def _records(n: int = 40) -> list:
    """Finished records of ``n`` calls (INVITE/100/180/200/ACK/BYE/200) through a proxy core; one
    call in three a B2BUA leg joined to another (its group, leg, joining header and gap)."""
    records = bench_micro._one_round(n, 20_000)[2]
    calls = [o for k, o in records if k == "call"]
    for i, call in enumerate(calls):
        if i % 3 == 1:
            group = LegGroup(calls[i - 1].call_id)
            group.call_ids.append(call.call_id)
            call.group, call.leg, call.joined_by = group, 2, "x-cid"
            call.gap_span_id, call.gap_start, call.gap_parent = 77 + i, call.t_start - 0.004, 99
    return records


def test_span_tuples_are_the_frame_format():
    records = _records()
    assert {type(o) for _, o in records} == {Call, Transaction}
    want = [call_tuple(o) if k == "call" else tx_tuple(o) for k, o in records]
    got = span_tuples(records, False, 1.0, sampled_by_ratio)
    assert got == want
    assert marshal.dumps(got, 2) == marshal.dumps(want, 2)
    assert [type(v) for t in got for v in t] == [type(v) for t in want for v in t]
    # the same records as stand-ins: the generic path, the same frame
    plain = [(k, _Plain(o)) for k, o in records]
    assert marshal.dumps(span_tuples(plain, False, 1.0, sampled_by_ratio), 2) == marshal.dumps(want, 2)


def test_span_tuples_sample_as_the_call_or_the_ratio_decides():
    records = _records()
    calls = [o for k, o in records if k == "call"]
    calls[0].sampled = False
    calls[1].is_call = False  # a non-dialog request: its trace is its transaction spans
    want = [call_tuple(o) if k == "call" else tx_tuple(o) for k, o in records
            if (k != "call" or o.is_call) and o.sampled]
    assert span_tuples(records, False, 1.0, sampled_by_ratio) == want
    mine = [call_tuple(o) if k == "call" else tx_tuple(o) for k, o in records
            if (k != "call" or o.is_call) and sampled_by_ratio(o.trace_id, 0.5)]
    assert 0 < len(mine) < len(records)
    assert span_tuples(records, True, 0.5, sampled_by_ratio) == mine


def _exposition(metrics: Metrics) -> bytes:
    return b"\n".join(x for x in generate_latest(metrics.gateway).split(b"\n") + generate_latest(
        metrics.signaling).split(b"\n") if b"_created" not in x and b"process_" not in x)


def test_call_figures_feed_the_histograms_as_observe_call_does():
    calls = [o for k, o in _records() if k == "call"]
    calls[2].t_answer = None  # failed: no duration
    calls[3].t_setup = None
    one, batched, plain = (Metrics(Stats(), lambda: 0.0) for _ in range(3))
    for call in calls:
        one.observe_call(call)
    batched.observe_calls(calls)
    plain.observe_calls([_Plain(c) for c in calls])
    assert _exposition(batched) == _exposition(one) == _exposition(plain)
    setup, duration, legs = call_figures(calls)
    assert len(setup) == len(calls) - 1 and len(duration) == len(calls) - 1
    assert len(legs) == len([c for c in calls if c.joined_by]) > 0


def test_a_call_whose_figures_fail_is_reported_and_the_rest_counted():
    calls = [o for k, o in _records(4) if k == "call"]
    calls[1].t_start = "not a time"  # t_setup - t_start raises
    errors = []
    setup, _, _ = call_figures(calls, lambda component, exc: errors.append((component, type(exc))))
    assert errors == [("metrics", TypeError)] and len(setup) == 3


def test_summary_fields_of_a_call_are_those_of_the_generic_path():
    for call in [o for k, o in _records() if k == "call"]:
        native = add_summary_fields({}, call, "partial")
        generic = add_summary_fields({}, _Plain(call), "partial")
        assert orjson.dumps(native) == orjson.dumps(generic)
        assert native["transactions"][0]["method"] == "INVITE"
        assert native["setup_ms"] == round((call.t_setup - call.t_start) * 1000.0, 3)
        invite = call.transactions[0]
        assert native["transactions"][0]["rtt_ms"] == round((invite.t_first - invite.t_sent) * 1000.0, 3)
        assert native["duration_s"] == round(call.t_end - call.t_answer, 3)


def test_let_go_of_every_call_even_after_one_fails():
    calls = [o for k, o in _records(3) if k == "call"]
    for c in calls:
        c.holders = RECORD  # only the record's consumer left

    class Broken:
        def let_go(self):
            raise RuntimeError("bug")

    errors = []
    let_go_all([calls[0], Broken(), calls[1], calls[2]], lambda component, exc: errors.append(component))
    assert errors == ["tick"] and all(c.transactions == [] for c in calls)
