"""The housekeeping's shortcuts give what the slow ways give: ``round3`` what ``round(x, 3)``
gives, the log timestamp what ``datetime`` formats, the batched histogram update what
prometheus-client's own ``observe`` exposes, and a tick's backlog leaves in few writes, in order."""
from __future__ import annotations

import io
import math
import random
import struct
from datetime import datetime, timezone

import orjson
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from sipwatch.logs import JsonLog, _stamp
from sipwatch.masking import CallIdMasker
from sipwatch.metrics import CALL_SETUP_BUCKETS, observe_all
from sipwatch.summary import round3
from sipwatch.waterfall import load_spans

from test_resilience import _Call, _app


def _same_float(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b and math.copysign(1, a) == math.copysign(1, b)


def test_round3_is_round_to_three_places():
    rnd = random.Random(3)
    values = [rnd.uniform(-1e3, 1e5) for _ in range(200_000)]
    for _ in range(50_000):  # ties and their neighbours, where the shortcut must step aside
        k = rnd.randrange(-10**9, 10**9)
        half = (k + 0.5) / 1000
        values += [half, math.nextafter(half, -math.inf), math.nextafter(half, math.inf), k / 1000]
    values += [struct.unpack("d", struct.pack("Q", rnd.getrandbits(64)))[0] for _ in range(50_000)]
    values += [0.0, -0.0, -0.0004, 0.0004, 2.675, 1e9, -1e9, 1e300, math.inf, -math.inf, math.nan, 7, -3]
    wrong = [x for x in values if not _same_float(round3(x), round(x, 3))]
    assert not wrong[:5]


def _datetime_stamp(t) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _stamp_values() -> list:
    rnd = random.Random(4)
    values = [rnd.uniform(0, 4e9) for _ in range(50_000)]
    values += [k + 0.9999995 for k in range(0, 200_000, 7)]  # the microsecond rounds into the next second
    values += [k + 0.0000005 for k in range(0, 200_000, 7)]
    values += [1_700_000_000 + k / 1e6 + 5e-7 for k in range(5000)]  # half a microsecond: ties to even
    values += [0, 0.0, 1, 1_764_619_611, 253402300799.25, 253402300798.9999996, 5e-324, 0.4999995e-6]
    rnd.shuffle(values)  # seconds out of order: the per-second text must follow
    return values


def test_log_timestamp_is_what_datetime_formats():
    """_stamp (through the C module's stamp when it is built) gives datetime's text."""
    wrong = [t for t in _stamp_values() if _stamp(None, t) != _datetime_stamp(t)]
    assert not wrong[:5]


def test_the_python_stamp_is_what_datetime_formats():
    """The Python stamp of a float in range (what _stamp uses without the C module) too."""
    from sipwatch.logs import _stamp_float
    wrong = [t for t in _stamp_values() if _stamp_float(float(t)) != _datetime_stamp(t)]
    assert not wrong[:5]


def test_the_c_stamp_takes_only_float_times_in_range():
    """What the C stamp does not take (another type, NaN, negative, past year 9999) it refuses
    (None), and _stamp gives it its own text."""
    from sipwatch import logs
    if logs._c_stamp is None:
        pytest.skip("the C extension sipwatch._otlpenc is not built")
    for bad in (1, True, None, "1.5", -0.0001, -5e-324, math.nan, math.inf, -math.inf, 253402300799.0, 1e300):
        assert logs._c_stamp(bad) is None, bad
    assert logs._c_stamp(-0.0) == logs._c_stamp(0.0) == "1970-01-01T00:00:00.000000Z"
    assert _stamp(None, 7) == _stamp(None, 7.0) == "1970-01-01T00:00:07.000000Z"


def test_log_timestamp_of_no_timestamp_is_now():
    before = datetime.now(timezone.utc)
    for bad in (math.nan, math.inf, -math.inf, 1e300, 2**80):
        stamped = datetime.fromisoformat(_stamp(None, bad).replace("Z", "+00:00"))
        assert before <= stamped <= datetime.now(timezone.utc)


def _exposition(hist_registry) -> bytes:
    return b"\n".join(line for line in generate_latest(hist_registry).split(b"\n") if b"_created" not in line)


def _observed(batches) -> tuple[bytes, bytes]:
    one, many = CollectorRegistry(), CollectorRegistry()
    h_one = Histogram("x_seconds", "x", buckets=CALL_SETUP_BUCKETS, registry=one)
    h_many = Histogram("x_seconds", "x", buckets=CALL_SETUP_BUCKETS, registry=many)
    for batch in batches:
        for v in batch:
            h_one.observe(v)
        observe_all(h_many, batch)
    return _exposition(one), _exposition(many)


def test_batched_observations_expose_what_observe_exposes():
    rnd = random.Random(5)
    batches = [[rnd.expovariate(1.0) for _ in range(rnd.randrange(0, 30))] for _ in range(200)]
    batches += [[0.0, -1.0, 60.0, 60.000001, 0.05, 1e-9, 0.1], [2.0], []]
    one, many = _observed(batches)
    assert many == one
    assert b"x_seconds_count" in one and b"x_seconds_sum" in one
    # infinities and NaN land where observe puts them (NaN in no bucket, both in the sum)
    one, many = _observed([[1.0, math.inf, 3.0], [math.nan, 0.2, -math.inf]])
    assert many == one


def test_plain_call_ids_are_shown_as_they_are_and_digit_runs_masked():
    m = CallIdMasker("digits", b"k")
    assert m(b"a84b4c76e66710@pc33.example.com") == "a84b4c76e66710@pc33.example.com"
    assert m(b"12345-abc@10.0.0.1") == "12345-abc@10.0.0.1"
    masked = m(b"call-4930123456@gw")
    assert masked.startswith("call-******3456@gw~") and len(masked) == len("call-******3456@gw~") + 16
    assert m(b"call-4930123456@gw") == masked
    assert m(b"\xff123456") .startswith("\ufffd**3456~")


class _CountingStream(io.BytesIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, data):
        self.writes += 1
        return super().write(data)


def test_held_lines_go_out_before_a_line_written_at_once():
    stream = _CountingStream()
    log = JsonLog("svc", stream=stream, clock=lambda: 1_700_000_000.0)
    log.deferred = True
    log.info("first", "a")
    log.info("second", "b")
    log.deferred = False
    assert stream.writes == 0
    log.info("third", "c")  # takes the held lines along, in order, in one write
    assert stream.writes == 1
    assert [orjson.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["a", "b", "c"]


def test_a_ticks_backlog_is_written_in_one_write_in_order_after_the_tick(tmp_path):
    """The tick leaves its records to slices in callbacks of their own; the slices hold their
    lines until the last one writes them all."""
    import asyncio

    from sipwatch.app import CALLS_PER_SLICE

    app, _ = _app(tmp_path, "--no-tracing")
    stream = app.log.stream = _CountingStream()
    n = 4 * CALLS_PER_SLICE + 3

    async def run():
        for i in range(n):
            app.core.tracker.finished.append(("call", _Call(b"w-%d@gw" % i)))
        app.tick()
        assert stream.writes == 0 and len(app._backlog) == n
        for _ in range(10 * n):
            await asyncio.sleep(0)
            if not app._backlog and not app._slice_pending:
                break

    asyncio.run(run())
    assert stream.writes == 1
    sids = [r["call_sid"] for r in map(orjson.loads, stream.getvalue().splitlines()) if r["event"] == "call_summary"]
    assert sids == ["w-%d@gw" % i for i in range(n)]


def test_a_call_span_keeps_its_transport_after_the_summary_lets_the_transactions_go(tmp_path):
    """The span record is taken before the call summary lets the call's transactions go (the last
    holder empties the list): a TCP call that left the table before its slice ran, e.g. evicted
    under pressure, still shows the transport of its first hop, not the default "udp"."""
    spans = tmp_path / "spans.jsonl"
    app, _ = _app(tmp_path, "--spans-file", str(spans))
    try:
        call = _Call(b"tcp-call@gw")
        call.transactions[0].peer = ("127.0.0.1", 5060, "tcp")
        app.core.tracker.finished.append(("call", call))
        app.tick()
        assert call.transactions == []  # the summary let them go
    finally:
        app.spans.shutdown(10.0)
    found = [s.attributes["network.transport"] for s in load_spans(str(spans)) if "network.transport" in s.attributes]
    assert found == ["tcp"]


def test_a_lingering_transaction_lets_its_response_events_go_once_its_span_is_handed_on(tmp_path):
    """A finished call lingers ``timer_b`` with its INVITE and BYE in the transaction table (late
    retransmissions still match). Their response events, read by their spans alone, were 10 of
    such a call's ~54 objects, freed cold at the linger's end: the tick lets them go once it has
    handed the spans on. The spans still carry them, and a late retransmission of the 200 is
    still counted and relayed as one."""
    from test_core import GATEWAY, SIDECAR, SIGNALING, invite, response_to
    from test_gc import _calls
    from test_hardening import forwarded

    spans = tmp_path / "spans.jsonl"
    app, _ = _app(tmp_path, "--spans-file", str(spans), "--upstream", "%s:%d" % SIGNALING,
                  "--advertise", "%s:%d" % SIDECAR)
    core = app.core
    try:
        now = app.clock()  # (the tick's timers run on it)
        _calls(core, 2, now - 2)
        # one more, its forwarded INVITE kept for the late retransmission of its 200 below
        (fwd, _), = forwarded(core.receive_datagram(invite(call_id=b"late-200", branch=b"z9hG4bK-late"),
                                                    GATEWAY, now - 2))
        core.receive_datagram(response_to(fwd, 180, b"Ringing"), SIGNALING, now - 1.99)
        core.receive_datagram(response_to(fwd, 200), SIGNALING, now - 1.98)
        core.receive_datagram(invite(method=b"ACK", call_id=b"late-200", branch=b"z9hG4bK-latea",
                                     to_tag=b"uas-1", body=b""), GATEWAY, now - 1.97)
        (bye, _), = forwarded(core.receive_datagram(
            invite(method=b"BYE", cseq=2, call_id=b"late-200", branch=b"z9hG4bK-lateb", to_tag=b"uas-1",
                   body=b""), GATEWAY, now - 1))
        core.receive_datagram(response_to(bye, 200), SIGNALING, now - 0.99)
        app.tick()
        txs = list(core.tracker.transactions.values())
        assert sorted(tx.method for tx in txs) == [b"BYE"] * 3 + [b"INVITE"] * 3
        assert all(tx.events == () and tx.t_final is not None for tx in txs)
        # a late retransmission of the INVITE's 200 (as when the UAS did not see the ACK)
        before = core.stats.response_retransmissions
        (relayed, to), = core.receive_datagram(response_to(fwd, 200), SIGNALING, now)
        assert to == GATEWAY and relayed.startswith(b"SIP/2.0 200 ")
        assert core.stats.response_retransmissions == before + 1
    finally:
        app.spans.shutdown(10.0)
    events = [[next(iter(attrs.values())) for _, _, attrs in s.events]  # each event's first attribute
              for s in load_spans(str(spans)) if s.name.startswith("INVITE")]
    assert events == [[180]] * 3


def test_the_span_pipeline_health_is_read_every_few_ticks(tmp_path):
    """Its figures change at most every 100 ms (the worker's status frames); each read cost
    ~45 µs of the loop's time live, so it is read every HEALTH_EVERY ticks, not every tick."""
    from sipwatch.app import HEALTH_EVERY

    class Pipeline:
        reads = 0
        file_failing = False

        @property
        def failures(self):
            Pipeline.reads += 1
            return 0

    app, _ = _app(tmp_path, "--no-tracing")
    app.spans = Pipeline()
    for i in range(3 * HEALTH_EVERY):
        app._ticks = i
        app.tick()
    assert HEALTH_EVERY > 1 and Pipeline.reads == 3


def test_the_collector_runs_in_a_callback_of_its_own(tmp_path):
    """The tick's young collection is not part of the tick's own stop of the loop: it runs in
    a later callback, after the loop polled its sockets (at once when no loop runs, at shutdown)."""
    import asyncio

    app, _ = _app(tmp_path, "--no-tracing")
    steps = []

    class Policy:
        def tick(self):
            steps.append("gc")

    app.gc = Policy()

    async def run():
        app.tick()
        assert steps == []
        for _ in range(5):
            await asyncio.sleep(0)
        assert steps == ["gc"]

    asyncio.run(run())
    app.tick()
    assert steps == ["gc", "gc"]


def test_the_backlog_takes_no_more_records_while_it_holds_its_bound(tmp_path, monkeypatch):
    """Records finished faster than the slices run them: the tick moved every one from the core
    into the backlog, which had no bound. Past MAX_BACKLOG the tick leaves them in the core's own
    queue (bounded, drops counted), and takes them once the slices have caught up."""
    import asyncio

    from sipwatch import app as app_module

    monkeypatch.setattr(app_module, "MAX_BACKLOG", 10)
    app, _ = _app(tmp_path, "--no-tracing")
    app.log.stream = _CountingStream()
    finished = app.core.tracker.finished

    async def run():
        for i in range(25):
            finished.append(("call", _Call(b"b-%d@gw" % i)))
        app.tick()
        assert len(app._backlog) == 25 and not finished  # (under the bound: all taken)
        for i in range(25, 50):
            finished.append(("call", _Call(b"b-%d@gw" % i)))
        app.tick()  # before any slice ran: the backlog is over its bound
        assert len(app._backlog) == 25 and len(finished) == 25
        for _ in range(1000):
            await asyncio.sleep(0)
            if not app._backlog and not app._slice_pending:
                break
        app.tick()
        assert not finished
        for _ in range(1000):
            await asyncio.sleep(0)
            if not app._backlog and not app._slice_pending:
                break

    asyncio.run(run())
    sids = [r["call_sid"] for r in map(orjson.loads, app.log.stream.getvalue().splitlines())
            if r["event"] == "call_summary"]
    assert sids == ["b-%d@gw" % i for i in range(50)]
