"""The proxy's span worker process, on the edges of its hand-off: frames bigger than the loop's
bound, malformed frames, records held by the loop when the worker dies. The spans that come out
are checked against the SDK's own encoder (as in test_otlp_encode) through a real OTLP receiver.
"""
from __future__ import annotations

import os

from otlp_receiver import OtlpReceiver, decode
from test_otlp_encode import key, proxy_records, reference, worker_pipeline

from sipwatch.span_worker import _LEN, F_RECORDS
from sipwatch.stats import Stats
from sipwatch.tracing import SpanBuilder


def spans_of(recs):
    return [r for r in recs if r[0] == "tx" or r[1].is_call]


def test_frame_over_the_bound_goes_when_the_pipe_has_room(tmp_path):
    """The bound is on what waits for the pipe: a frame bigger than it, written into an empty
    pipe, is delivered whole, not dropped."""
    recs = proxy_records()
    stats = Stats(ring_size=16)
    with OtlpReceiver() as rx:
        p = worker_pipeline(stats, f"127.0.0.1:{rx.grpc_port}", "grpc", tmp_path)
        p._pending_max = 64  # far below one frame of these records
        p.submit(recs)
        p.shutdown(10)
        got = rx.snapshot()
    _, ref = reference(spans_of(recs), SpanBuilder(p.resource))
    assert sorted(got, key=key) == sorted(decode(ref), key=key)
    assert stats.spans_exported == len(spans_of(recs)) and stats.spans_dropped == 0


def test_malformed_frames_are_counted_and_the_worker_goes_on(tmp_path):
    """Bytes that are not a marshal frame, and a frame of values that are not record tuples:
    failures and drops are counted, the records after them are still exported."""
    import marshal
    recs = proxy_records()
    stats = Stats(ring_size=16)
    with OtlpReceiver() as rx:
        p = worker_pipeline(stats, f"127.0.0.1:{rx.grpc_port}", "grpc", tmp_path)
        for payload in (b"\xff not marshal", marshal.dumps([1, (0,), None])):
            os.write(p._w, _LEN.pack(len(payload) + 1) + bytes((F_RECORDS,)) + payload)
        p.submit(recs)
        p.shutdown(10)
        got = rx.snapshot()
    n = len(spans_of(recs))
    assert len(got) == n and stats.spans_exported == n
    assert p.failures == 4 and stats.spans_dropped == 3  # the bad frame, then three bad tuples


def test_records_held_when_the_worker_dies_are_dropped_and_counted(tmp_path):
    """Records the loop holds for the next frame are counted as dropped once the worker is seen
    gone (its status pipe at EOF), as are those submitted after, and after the shutdown."""
    recs = proxy_records()
    n = len(spans_of(recs))
    stats = Stats(ring_size=16)
    p = worker_pipeline(stats, None, None, tmp_path)
    p.submit(recs)  # held: the frame goes at the next tick after HOLD
    p.proc.kill()
    p.proc.wait()
    assert p.failures == 1
    assert stats.spans_dropped == n and not p._held
    p.submit(recs)
    p.failures  # noqa: B018 - polls, as the proxy's tick does
    assert stats.spans_dropped == 2 * n and stats.spans_exported == 0
    p.shutdown(1)
    p.submit(recs)  # after the end: counted, never held
    assert p._dropped == 3 * n and not p._held


def test_slices_are_framed_as_they_come_and_leave_together(tmp_path, monkeypatch):
    """Each submitted slice becomes its marshal frame at once, so the write after HOLD only joins
    bytes (one dump of a HOLD's worth of records had stalled the loop for milliseconds); the
    frames, written back to back, come out as the spans the reference encodes."""
    from sipwatch import span_worker
    monkeypatch.setattr(span_worker, "HOLD", 1e9)  # held until the shutdown, however slow the machine
    recs = proxy_records()
    stats = Stats(ring_size=16)
    with OtlpReceiver() as rx:
        p = worker_pipeline(stats, f"127.0.0.1:{rx.grpc_port}", "grpc", tmp_path)
        for i in range(0, len(recs), 5):
            p.submit(recs[i:i + 5])
        assert len(p._held) > 1 and all(type(frame) is bytes for frame in p._held)
        assert p._held_records == len(spans_of(recs))
        p.shutdown(10)
        got = rx.snapshot()
    _, ref = reference(spans_of(recs), SpanBuilder(p.resource))
    assert sorted(got, key=key) == sorted(decode(ref), key=key)
    assert stats.spans_exported == len(spans_of(recs)) and stats.spans_dropped == 0


def test_a_frame_larger_than_the_read_buffer_is_read_whole(tmp_path):
    """The worker reads into one buffer it keeps: a frame of several megabytes (bigger than the
    buffer and the pipe, so it comes over many reads) is read whole, its records exported and the
    tuple that is not a record counted; the frames after it, read into the buffer given back, too."""
    import marshal
    import select

    from sipwatch.otlp_encode import call_tuple, tx_tuple
    from sipwatch.span_worker import READ_SIZE
    recs = proxy_records()
    tuples = [call_tuple(o) if k == "call" else tx_tuple(o) for k, o in spans_of(recs)]
    half = len(tuples) // 2
    payload = marshal.dumps(tuples[:half] + [(0, b"x" * (3 * READ_SIZE))] + tuples[half:])
    frame = memoryview(_LEN.pack(len(payload) + 1) + bytes((F_RECORDS,)) + payload)
    stats = Stats(ring_size=16)
    with OtlpReceiver() as rx:
        p = worker_pipeline(stats, f"127.0.0.1:{rx.grpc_port}", "grpc", tmp_path)
        while frame:
            select.select([], [p._w], [], 5.0)
            try:
                frame = frame[os.write(p._w, frame[:65536]):]
            except BlockingIOError:
                pass
        p.submit(recs)
        p.shutdown(10)
        got = rx.snapshot()
    _, ref = reference(spans_of(recs), SpanBuilder(p.resource))
    assert sorted(got, key=key) == sorted(decode(ref) * 2, key=key)
    assert stats.spans_exported == 2 * len(tuples) and p.failures == 1 and stats.spans_dropped == 1
