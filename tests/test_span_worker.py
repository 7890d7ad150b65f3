"""The proxy's span worker process, on the edges of its hand-off: frames bigger than the loop's
bound, malformed frames, records held by the loop when the worker dies. The spans that come out
are checked against the SDK's own encoder (as in test_otlp_encode) through a real OTLP receiver.
"""
from __future__ import annotations

import itertools
import marshal
import os

import pytest
from harness import HAVE_SIPP, Sidecar, free_port, metric, run_call_pair
from otlp_receiver import OtlpReceiver, decode
from test_otlp_encode import key, proxy_records, reference, worker_pipeline

from sipwatch.span_worker import _LEN, F_RECORDS, _read_frame
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


def test_the_stop_goes_even_when_what_waits_for_the_pipe_is_over_the_bound(tmp_path):
    """Frames of records past the bound are dropped (counted); the stop frame never is: a stop
    lost made the worker take the EOF after it for the proxy's death and drop every span it
    still held, delivered or not."""
    import signal
    recs = proxy_records()
    n = len(spans_of(recs))
    stats = Stats(ring_size=16)
    with OtlpReceiver() as rx:
        p = worker_pipeline(stats, f"127.0.0.1:{rx.grpc_port}", "grpc", tmp_path)
        p._pending_max = 1 << 16
        os.kill(p.proc.pid, signal.SIGSTOP)  # its pipe fills, then what waits passes the bound
        try:
            sent = 0
            while not p._dropped and sent < 100_000:
                p.submit(recs)
                with p._lock:
                    p._send_held()
                sent += n
        finally:
            os.kill(p.proc.pid, signal.SIGCONT)
        assert p._dropped and p._pending_bytes > 0
        p._pending_max = p._pending_bytes  # what waits is at the bound: nothing more fits
        p.shutdown(30)
        assert p.proc.returncode == 0
    assert stats.spans_exported == sent - p._dropped > 0
    assert stats.spans_dropped == p._dropped and p._status.get("dropped") == 0


def test_malformed_frames_are_counted_and_the_worker_goes_on(tmp_path):
    """Bytes that are not a marshal frame, and a frame of values that are not record tuples:
    failures and drops are counted, the records after them are still exported."""
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


def test_slices_are_gathered_framed_by_the_dump_size_and_leave_together(tmp_path, monkeypatch):
    """The tuples of consecutive slices become one frame each time DUMP_RECORDS of them
    have gathered (a frame per small slice had cost the worker ~2 µs a call; one dump of a
    HOLD's worth had stalled the loop for milliseconds), so the write after HOLD only joins
    bytes; the frames, and the tuples still open at the shutdown, come out as the spans the
    reference encodes."""
    from sipwatch import span_worker
    monkeypatch.setattr(span_worker, "HOLD", 1e9)  # held until the shutdown, however slow the machine
    monkeypatch.setattr(span_worker, "DUMP_RECORDS", 5)
    recs = proxy_records()
    n = len(spans_of(recs))
    assert n % 5, "some tuples must still be open at the shutdown"
    stats = Stats(ring_size=16)
    with OtlpReceiver() as rx:
        p = worker_pipeline(stats, f"127.0.0.1:{rx.grpc_port}", "grpc", tmp_path)
        for i in range(0, len(recs), 2):
            p.submit(recs[i:i + 2])
        assert len(p._held) > 1 and all(type(frame) is bytes for frame in p._held)
        assert all(len(_read_frame(frame[4], frame[5:])[1]) in (5, 6) for frame in p._held)  # (a slice may cross 5)
        assert 0 < len(p._open) < 5
        assert p._held_records == n
        p.shutdown(10)
        got = rx.snapshot()
    _, ref = reference(spans_of(recs), SpanBuilder(p.resource))
    assert sorted(got, key=key) == sorted(decode(ref), key=key)
    assert stats.spans_exported == n and stats.spans_dropped == 0


def test_a_frame_larger_than_the_read_buffer_is_read_whole(tmp_path):
    """The worker reads into one buffer it keeps: a frame of several megabytes (bigger than the
    buffer and the pipe, so it comes over many reads) is read whole, its records exported and the
    tuple that is not a record counted; the frames after it, read into the buffer given back, too."""
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


# -- call summaries written by the worker ------------------------------------------------------
def summary_pipeline(stats, tmp_path, log, cid=None):
    from sipwatch.span_worker import WorkerPipeline
    from sipwatch.tracing import SpanPipeline
    p = SpanPipeline.configured("proxy", stats, None, None, str(tmp_path / "spans.jsonl"), "sw-unit", "partial",
                                None, {}, call_id_mask=cid, worker=True, log=log)
    assert isinstance(p, WorkerPipeline) and p.summaries
    awake(p)
    return p


def piped_summaries(tmp_path, stats=None, cid=None, prepare=None):
    """(a worker pipeline that writes the summaries to a pipe of their own, as the proxy's stdout
    would be; the pipe's read end). ``prepare(w)`` runs on the write end first: the worker's
    duplicate shares its flags."""
    from sipwatch.logs import JsonLog
    r, w = os.pipe()
    if prepare is not None:
        prepare(w)
    log = JsonLog("sw-unit", stream=open(w, "wb"), mask_mode="partial", call_id_mask=cid)
    p = summary_pipeline(stats if stats is not None else Stats(ring_size=16), tmp_path, log, cid)
    log.stream.close()  # the worker holds its own duplicate
    return p, r


def awake(p) -> None:
    """The worker at the normal policy once it has put itself at idle priority (its first
    step), where this system allows it: these tests are about what it writes, not when it gets
    the CPU, and on a busy machine an idle-priority process may wait minutes for it."""
    import time

    from sipwatch.span_worker import lift_to_normal
    if not hasattr(os, "SCHED_IDLE"):
        return
    end = time.monotonic() + 60
    try:
        while os.sched_getscheduler(p.proc.pid) != os.SCHED_IDLE:
            if time.monotonic() > end or p.proc.poll() is not None:
                return
            time.sleep(0.005)
    except OSError:
        return
    lift_to_normal(p.proc.pid)


def calls_of(recs):
    return [o for k, o in recs if k == "call" and o.is_call]


def reference_lines(calls, cid) -> list[bytes]:
    """The lines the proxy's own log writes for ``calls`` (its in-process path)."""
    import io

    from sipwatch.logs import JsonLog
    out = io.BytesIO()
    log = JsonLog("sw-unit", stream=out, mask_mode="partial", call_id_mask=cid)
    for c in calls:
        log.call_summary(c)
    return out.getvalue().splitlines()


def read_all(fd) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def test_the_worker_writes_the_call_summaries_the_proxy_would(tmp_path):
    """Summaries handed over as tuples come out on the proxy's stdout (a pipe here, as under a
    container runtime) as the very lines the proxy's own log writes, masks included, in order;
    the worker reports the last one written, so the proxy holds none back."""
    from sipwatch.handoff import summary_tuples
    from sipwatch.masking import CallIdMasker
    recs = proxy_records()
    calls = calls_of(recs)
    cid = CallIdMasker("digits", b"k")
    stats = Stats(ring_size=16)
    p, r = piped_summaries(tmp_path, stats, cid)
    for i in range(0, len(calls), 2):
        p.submit_summaries(summary_tuples(calls[i:i + 2], None))
    p.submit(recs)
    p.shutdown(10)
    got = read_all(r).splitlines()
    assert got == reference_lines(calls, cid) and len(got) == len(calls) > 5
    assert p.take_lost_summaries() == [] and not p._unwritten and p.log_errors == 0


def test_summaries_of_small_slices_are_framed_together_and_written_in_order(tmp_path, monkeypatch):
    """Summaries gather over slices into frames of DUMP_SUMMARIES or a few more (not a frame
    per slice); each frame carries the sequence number of its last summary, and the lines come
    out in order, those still open at the shutdown included."""
    from sipwatch import span_worker
    from sipwatch.handoff import summary_tuples
    monkeypatch.setattr(span_worker, "HOLD", 1e9)
    monkeypatch.setattr(span_worker, "DUMP_SUMMARIES", 3)
    calls = calls_of(proxy_records())
    assert len(calls) % 3
    p, r = piped_summaries(tmp_path)
    p.submit_summaries(summary_tuples(calls[:2], None))
    for c in calls[2:]:
        p.submit_summaries(summary_tuples([c], None))
    frames = [_read_frame(f[4], f[5:])[1] for f in p._held]
    assert [len(t) for _, t in frames] and all(len(t) == 3 for _, t in frames)
    assert [seq for seq, _ in frames] == list(itertools.accumulate(len(t) for _, t in frames))
    assert 0 < len(p._open_summaries) < 3
    p.shutdown(10)
    assert read_all(r).splitlines() == reference_lines(calls, None)
    assert p.take_lost_summaries() == [] and not p._unwritten


def test_summaries_the_worker_cannot_write_come_back_to_the_proxy(tmp_path):
    """Held when the worker dies, submitted after it died or after the shutdown: every summary
    comes back, once, in order, for the proxy to write itself."""
    import io

    from sipwatch.handoff import summary_tuples
    from sipwatch.logs import JsonLog
    calls = calls_of(proxy_records())
    p, r = piped_summaries(tmp_path)
    first = summary_tuples(calls[:3], None)
    p.submit_summaries(first)  # held for the next frame
    p.proc.kill()
    p.proc.wait()
    assert p.failures == 1  # (polls: the worker is seen gone)
    later = summary_tuples(calls[3:], None)
    p.submit_summaries(later)
    back = p.take_lost_summaries()
    assert back == first + later
    p.shutdown(1)
    p.submit_summaries(first)
    assert p.take_lost_summaries() == first
    assert read_all(r) == b""  # the worker wrote none of them
    out = io.BytesIO()
    JsonLog("sw-unit", stream=out).call_summary_of(back[0])
    assert out.getvalue().splitlines() == reference_lines(calls[:1], None)


def test_summaries_past_the_bound_come_back_and_the_rest_are_written_once(tmp_path):
    """A stopped worker (its pipe full, more waiting than the bound allows): what cannot wait
    comes back to the proxy; the rest the worker writes once it runs again. Every call has its
    summary exactly once between the two."""
    import signal
    import threading

    from sipwatch.handoff import summary_tuples
    calls = calls_of(proxy_records())
    p, r = piped_summaries(tmp_path)
    p._pending_max = 1 << 16
    got: list = []
    reader = threading.Thread(target=lambda: got.append(read_all(r)), daemon=True)
    reader.start()
    os.kill(p.proc.pid, signal.SIGSTOP)
    try:
        sent = 0
        while not p._lost and sent < 200_000:
            p.submit_summaries(summary_tuples(calls, None))
            p._poll()  # writes what is held (as the tick does after HOLD)
            sent += len(calls)
    finally:
        os.kill(p.proc.pid, signal.SIGCONT)
    back = p.take_lost_summaries()
    assert back and len(back) % len(calls) == 0
    p.shutdown(60)
    reader.join(30)
    written = got[0].splitlines()
    assert p.take_lost_summaries() == [] and p.proc.returncode == 0
    assert len(written) + len(back) == sent
    assert written[:len(calls)] == reference_lines(calls, None)


def test_shared_stdout_gets_whole_lines_of_at_most_pipe_buf_per_write():
    """With another process writing to the same pipe, each write is whole lines, at most
    PIPE_BUF bytes unless one line is longer (a pipe keeps such writes whole)."""
    from sipwatch.logs import JsonLog

    class Writes:
        def __init__(self):
            self.writes = []

        def write(self, b):
            self.writes.append(bytes(b))

        def flush(self):
            pass

    out = Writes()
    log = JsonLog("sw-unit", stream=out)
    log.atomic_lines = True
    log.deferred = True
    sizes = [10, 3000, 900, 5000, 100, 4095, 4094, 1, 2000, 2000]
    for n in sizes:
        log.info("x", "e", pad="y" * n)
    log.flush()
    joined = b"".join(out.writes)
    assert joined.count(b"\n") == len(sizes) and joined.endswith(b"\n")
    for chunk in out.writes:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= 4096 or chunk.count(b"\n") == 1
    assert len(out.writes) < len(sizes)  # lines that fit together went together
    log.atomic_lines = False
    for n in sizes:
        log.info("x", "e", pad="y" * n)
    log.flush()
    assert len(out.writes[-1]) > 4096 * 4  # unshared: the whole batch in one write


@pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp (Debian sip-tester)")
def test_every_call_keeps_its_summary_when_the_span_worker_is_killed(tmp_path):
    """SIPp calls through a sidecar with spans on; the span worker (which writes the call
    summaries) is killed in the middle. The proxy takes back what the worker had not written
    and writes it and every later summary itself: each call has its line, once (a summary
    written in the instant between the worker's write and its report may show twice)."""
    import signal
    import subprocess
    import threading
    import time

    import orjson
    n = 300
    uas_port = free_port()
    with Sidecar(tmp_path, uas_port, "--spans-file", str(tmp_path / "spans.jsonl")) as sc:
        result: list = []
        t = threading.Thread(target=lambda: result.append(
            run_call_pair(tmp_path, "uac_call", "uas_call", sc.port, uas_port, n, rate=100)), daemon=True)
        t.start()
        worker = int(subprocess.check_output(["pgrep", "-P", str(sc.proc.pid)]).split()[0])
        sc.wait_for(lambda s: metric(s, "sip_calls_processed_total") >= n // 3, timeout=60)
        os.kill(worker, signal.SIGKILL)
        t.join(120)
        uac_rc, uas_rc, uac, uas = result[0]
        assert (uac_rc, uas_rc) == (0, 0), uac.errors() + uas.errors()
        gw = sc.wait_for(lambda s: metric(s, "sip_calls_processed_total") >= n, timeout=30)
        assert metric(gw, "sip_calls_processed_total", outcome="answered") == n
        time.sleep(0.5)  # the tick after the last call's linger
    lines = [orjson.loads(x) for x in sc.stdout_path.read_bytes().splitlines() if b'"call_summary"' in x]
    sids = [x["call_sid"] for x in lines]
    assert len(set(sids)) == n and all(x["outcome"] == "answered" for x in lines)
    # Twice only what the worker wrote in its last batch, before it could report it: the
    # worker's last lines, each once more in the proxy's first lines after it (a block each).
    first: dict = {}
    twice = []
    for i, sid in enumerate(sids):
        if sid in first:
            twice.append((first[sid], i))
        else:
            first[sid] = i
    from sipwatch.app import CALLS_PER_SLICE
    from sipwatch.span_worker import UNTOLD_MAX
    assert len(twice) <= UNTOLD_MAX + CALLS_PER_SLICE
    if twice:
        a = [i for i, _ in twice]
        b = [j for _, j in twice]
        assert a == list(range(a[0], a[0] + len(a))) and a[-1] + 1 == b[0], "not one batch written twice"
        assert b == list(range(b[0], b[0] + len(b)))
    assert b"span worker gone" in sc.stdout_path.read_bytes()  # (stderr goes to the same file)


def _can_lift() -> bool:
    """Whether this process may take another one out of SCHED_IDLE (root, CAP_SYS_NICE, RLIMIT_NICE)."""
    import subprocess
    import sys

    from sipwatch.span_worker import lift_to_normal
    if not hasattr(os, "SCHED_IDLE") or not hasattr(os, "sched_setaffinity"):
        return False
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        os.sched_setscheduler(child.pid, os.SCHED_IDLE, os.sched_param(0))
        return lift_to_normal(child.pid)
    except OSError:
        return False
    finally:
        child.stdin.close()
        child.wait()


def test_a_starved_worker_is_lifted_at_shutdown_and_delivers_what_it_holds(tmp_path):
    """On a CPU that a busy process keeps full, the idle-priority worker gets next to nothing
    (the scheduler's weight 3 against 1024). At shutdown the proxy lifts it to the normal policy:
    the spans it was handed are all exported within the deadline, none dropped. (One CPU is
    kept busy, by a process pinned to it with the worker; the others stay free.)"""
    import subprocess
    import sys
    import time

    if not _can_lift():
        pytest.skip("this process may not lift another out of SCHED_IDLE")
    recs = proxy_records()
    spans = spans_of(recs)
    stats = Stats(ring_size=16)
    cpu = min(os.sched_getaffinity(0))
    hog = None
    with OtlpReceiver() as rx:
        p = worker_pipeline(stats, f"127.0.0.1:{rx.grpc_port}", "grpc", tmp_path)
        try:
            end = time.monotonic() + 60
            while os.sched_getscheduler(p.proc.pid) != os.SCHED_IDLE and time.monotonic() < end:
                time.sleep(0.02)  # (its first step: before its imports and its configuration)
            assert os.sched_getscheduler(p.proc.pid) == os.SCHED_IDLE
            os.sched_setaffinity(p.proc.pid, {cpu})
            hog = subprocess.Popen([sys.executable, "-c",
                                    f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
            time.sleep(0.3)  # the hog owns the CPU
            rounds = 150
            for _ in range(rounds):
                p.submit(recs)
            p.shutdown(3)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            if p.proc.poll() is None:
                p.proc.kill()
        got = rx.snapshot()
    assert stats.spans_dropped == 0
    assert stats.spans_exported == rounds * len(spans) == len(got)


def test_a_stop_that_cannot_wait_takes_back_every_summary_not_reported_written(tmp_path):
    """The proxy's stop gives up waiting for a worker that does not finish (stopped here): every
    summary the worker has not reported written comes back for the proxy to write, and the
    shutdown finishing later gives none of them back a second time."""
    import signal

    from sipwatch.handoff import summary_tuples
    calls = calls_of(proxy_records())
    p, r = piped_summaries(tmp_path)
    os.kill(p.proc.pid, signal.SIGSTOP)
    try:
        tuples = summary_tuples(calls, None)
        p.submit_summaries(tuples[:3])
        p._poll()
        p.submit_summaries(tuples[3:])
        p.give_back_summaries()
        assert p.take_lost_summaries() == tuples
    finally:
        os.kill(p.proc.pid, signal.SIGCONT)
    p.shutdown(2)
    assert p.take_lost_summaries() == []
    os.close(r)


def _fill(fd) -> None:
    """Fill a pipe to the brim, then leave it blocking (the flag is shared with every dup)."""
    os.set_blocking(fd, False)
    try:
        while True:
            os.write(fd, b"x" * 65536)
    except BlockingIOError:
        pass
    try:
        while True:
            os.write(fd, b"x")
    except BlockingIOError:
        pass
    os.set_blocking(fd, True)


def test_a_summary_is_reported_written_only_once_its_line_is_out(tmp_path):
    """The worker holds a read's summary lines for one write at its end; a delivery of spans in
    the same read sends a status before that write. If that status counted the held lines and
    the write then never happened (stdout full, the worker killed), the proxy would not write
    them either. Here the status from the delivery must leave them for the proxy."""
    import signal
    import time

    from sipwatch.handoff import summary_tuples
    from sipwatch.span_worker import DELIVER_MIN, STATUS_EVERY
    recs = proxy_records()
    calls = calls_of(recs)
    stats = Stats(ring_size=16)
    p, r = piped_summaries(tmp_path, stats, prepare=_fill)  # the worker's write of the summaries blocks
    try:
        end = time.monotonic() + 60
        while not p._status and time.monotonic() < end:  # its first status, sent on the config
            p._poll()
            time.sleep(0.01)
        assert p._status, "the worker sent no status"
        time.sleep(3 * STATUS_EVERY)  # so the delivery's status goes out at once
        tuples = summary_tuples(calls, None)
        os.kill(p.proc.pid, signal.SIGSTOP)  # the frames all land before it reads: one read
        try:
            p.submit_summaries(tuples)
            n = 0
            while n < DELIVER_MIN:
                p.submit(recs)
                n += len(spans_of(recs))
            with p._lock:
                p._send_held()
            assert not p._pending
        finally:
            os.kill(p.proc.pid, signal.SIGCONT)
        while stats.spans_exported < DELIVER_MIN and time.monotonic() < end:
            p._poll()
            time.sleep(0.01)
        assert stats.spans_exported >= DELIVER_MIN, "no status from the delivery"
        p.proc.kill()
        p.proc.wait()
        p._poll()
        assert p.take_lost_summaries() == tuples
    finally:
        p.proc.kill()
        p.proc.wait()
        p.shutdown(1)
        os.close(r)


def test_a_summaries_frame_that_does_not_load_stops_the_worker_and_every_line_is_kept(tmp_path, monkeypatch):
    """A frame of summaries the worker cannot read carries lines only the proxy can still write;
    the next frame's report would count them written. The worker stops there instead, and the
    summaries from that frame on come back to the proxy: every call has its line, once."""
    import time

    from sipwatch import span_worker
    from sipwatch.handoff import summary_tuples
    calls = calls_of(proxy_records())
    p, r = piped_summaries(tmp_path)
    first, bad, last = (summary_tuples(calls[i:i + 2], None) for i in (0, 2, 4))
    p.submit_summaries(first)
    with p._lock:
        p._send_held()

    class Garbling:  # the dump of the next frame arrives damaged (marshal, or packed)
        @staticmethod
        def dumps(value, version=None):
            return b"\xff damaged" + marshal.dumps(value, version)[9:]
    monkeypatch.setattr(span_worker, "marshal", Garbling)
    if span_worker._pack is not None:
        pack = span_worker._pack
        monkeypatch.setattr(span_worker, "_pack", lambda value: b"\xff damaged" + pack(value)[9:])
    p.submit_summaries(bad)
    with p._lock:
        p._frame_open()
    monkeypatch.undo()
    p.submit_summaries(last)
    with p._lock:
        p._send_held()
    end = time.monotonic() + 60
    while not p._dead and time.monotonic() < end:
        p._poll()
        time.sleep(0.01)
    assert p._dead, "the worker went on"
    back = p.take_lost_summaries()
    written = read_all(r).splitlines()
    assert back == bad + last
    assert written == reference_lines(calls[:2], None)
    p.shutdown(1)


def test_summaries_marshal_cannot_take_come_back_to_the_proxy(tmp_path):
    """A summary with a value marshal refuses is not lost between the two processes, and the
    others framed with it still go to the worker."""
    from sipwatch.handoff import summary_tuples
    calls = calls_of(proxy_records())
    p, r = piped_summaries(tmp_path)
    odd = [tuple(summary_tuples(calls[:1], None)[0]) + (object(),)]
    good = summary_tuples(calls[1:3], None)
    p.submit_summaries(good[:1])
    p.submit_summaries(odd)
    p.submit_summaries(good[1:])
    with p._lock:
        p._frame_open()
    assert p.take_lost_summaries() == odd
    p.shutdown(10)
    assert read_all(r).splitlines() == reference_lines(calls[1:3], None)
    assert p.take_lost_summaries() == [] and not p._unwritten


def test_the_writer_thread_keeps_each_batch_in_a_write_of_its_own():
    """The writer thread (stdout a pipe that cannot be reopened) writes the batches queued while
    it was busy one by one: joined, two batches of whole lines that each fit a pipe's atomic
    write would make one write past it, which the worker's lines could split."""
    import threading

    from sipwatch.logs import BackgroundWriter

    class Writes:
        def __init__(self):
            self.writes = []
            self.gate = threading.Event()

        def write(self, b):
            self.gate.wait(30)
            self.writes.append(bytes(b))

        def flush(self):
            pass

    out = Writes()
    w = BackgroundWriter(out)
    batches = [b"a" * 10 + b"\n", b"b" * 3000 + b"\n", b"c" * 3000 + b"\n", b"d" * 4000 + b"\n"]
    for b in batches:
        w.write(b, 1)  # the first blocks the thread; the rest queue behind it
    out.gate.set()
    w.close(30)
    assert out.writes == batches


def test_summaries_reach_a_non_blocking_stdout_whole(tmp_path):
    """The worker writes to the proxy's own stdout, flags and all. Whoever started the proxy may
    have made that pipe non-blocking: with the pipe full, every line still comes out, whole and
    in order, once the reader drains it (none lost to EAGAIN, none cut short)."""
    import fcntl
    import struct
    import termios
    import threading
    import time

    from sipwatch.handoff import summary_tuples
    recs = proxy_records()
    calls = calls_of(recs)
    def full_and_non_blocking(w):
        _fill(w)
        os.set_blocking(w, False)  # the flag belongs to the pipe's end, shared with the worker's dup
    p, r = piped_summaries(tmp_path, prepare=full_and_non_blocking)
    for i in range(0, len(calls), 2):
        p.submit_summaries(summary_tuples(calls[i:i + 2], None))
    with p._lock:
        p._send_held()
    end = time.monotonic() + 60  # the worker has read the frames: it writes next, into the full pipe
    while struct.unpack("i", fcntl.ioctl(p._w, termios.FIONREAD, b"\0\0\0\0"))[0] and time.monotonic() < end:
        time.sleep(0.01)
    time.sleep(0.3)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(read_all(r)), daemon=True)
    reader.start()
    p.shutdown(30)
    reader.join(30)
    lines = got[0].lstrip(b"x").splitlines()
    assert lines == reference_lines(calls, None)
    assert p.take_lost_summaries() == [] and p.log_errors == 0


def big_party_records(calls: int, size: int) -> list:
    """Finished answered calls whose From is ``size`` bytes long (a display name a sender chose,
    which the call's span carries)."""
    from span_micro import answered_calls
    return answered_calls(calls, lambda i: (b"big-%d@host" % i, b'"' + b"A" * size + b'" <sip:alice@10.0.0.1>;tag=%d' % i,
                                            b"<sip:bob@10.0.0.2>", b"sip:bob@10.0.0.2"), provisional=False)


@pytest.mark.parametrize("worker", [True, False], ids=["worker", "thread"])
def test_calls_with_huge_headers_do_not_push_a_request_past_the_backends_limit(tmp_path, worker):
    """A gRPC OTLP receiver refuses messages over 4 MiB by default (grpcio's, the OTel
    Collector's): 200 calls whose From is 40 KB make ~8 MB of spans, and one request of them all
    (the worker's delivery; the thread's batch of 512 records, ~5 MB) lost every span, theirs and
    the others'. Requests stay near DELIVER_BYTES: every span arrives."""
    recs = big_party_records(200, 40_000)
    n = len(spans_of(recs))
    stats = Stats(ring_size=16)
    with OtlpReceiver() as rx:
        endpoint = f"127.0.0.1:{rx.grpc_port}"
        if worker:
            p = worker_pipeline(stats, endpoint, "grpc", tmp_path)
        else:
            from sipwatch.tracing import SpanPipeline
            p = SpanPipeline.configured("capture", stats, endpoint, "grpc", None, "sw-unit", "partial", None, {})
        p.submit(recs)
        p.shutdown(20)
        got = rx.wait_for(n, 5)
    assert len(got) == n == 800
    assert stats.spans_exported == n and stats.spans_dropped == 0


@pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp (Debian sip-tester)")
def test_a_killed_span_worker_is_started_again_and_every_span_is_counted(tmp_path):
    """The span worker stopped, spans pile up in its pipe, then it is killed: those spans were
    neither exported nor counted dropped (1500 of 2100 vanished from the counters), and every
    later span was dropped for the life of the process. Now each span is exported or counted
    dropped, and a new worker exports the spans after it."""
    import signal
    import subprocess
    import time

    spans = tmp_path / "spans.jsonl"
    uas_port = free_port()
    counts = (50, 300, 60)
    with Sidecar(tmp_path, uas_port, "--spans-file", str(spans)) as sc:
        def options(n):
            r = run_call_pair(tmp_path, "uac_options", "uas_options", sc.port, uas_port, n, rate=200)
            assert r[:2] == (0, 0), r[2].errors() + r[3].errors()

        options(counts[0])
        sc.wait_for(lambda s: metric(s, "sipwatch_spans_exported_total") >= counts[0], side="signaling", timeout=20)
        worker = int(subprocess.check_output(["pgrep", "-P", str(sc.proc.pid)]).split()[0])
        os.kill(worker, signal.SIGSTOP)
        options(counts[1])
        time.sleep(0.5)  # (the loop hands them to the pipe within its hold)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while b"span worker started again" not in sc.stdout_path.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b"span worker started again" in sc.stdout_path.read_bytes()
        options(counts[2])
        sig = sc.wait_for(lambda s: metric(s, "sipwatch_spans_exported_total") + metric(s, "sipwatch_spans_dropped_total")
                          >= sum(counts), side="signaling", timeout=20)
        later = set(subprocess.check_output(["pgrep", "-P", str(sc.proc.pid)]).split())
        assert str(worker).encode() not in later and later  # a new worker runs
    exported, dropped = metric(sig, "sipwatch_spans_exported_total"), metric(sig, "sipwatch_spans_dropped_total")
    assert exported + dropped == sum(counts), (exported, dropped)
    assert metric(sig, "sipwatch_span_worker_restarts_total") == 1
    assert exported >= counts[0] + counts[2]
    text = spans.read_text()
    assert text.count('"name":"OPTIONS"') == exported, (text.count('"name":"OPTIONS"'), exported)


class _Planted:
    """Unpickling it writes a file: what a configuration frame may not do after the first."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_only_the_first_frame_configures_the_worker(tmp_path):
    """A configuration frame is unpickled; one was taken whenever it came, so whoever could write
    to the worker's stdin (a process of the same user through /proc/PID/fd/0) ran code in it.
    After the first, one ends the worker's reading (the proxy starts a new one)."""
    import pickle
    import time

    from sipwatch.span_worker import F_CONFIG
    planted = tmp_path / "planted"
    p = worker_pipeline(Stats(ring_size=16), None, "grpc", tmp_path)
    try:
        p._send(F_CONFIG, pickle.dumps(_Planted(str(planted))), 0)
        deadline = time.monotonic() + 10
        while p.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.proc.poll() is not None  # it stopped reading and left
        assert not planted.exists()
    finally:
        p.shutdown(1.0)


def test_a_worker_that_cannot_be_started_again_leaves_no_pipe_to_be_reused(tmp_path, monkeypatch):
    """The restart closed the dead worker's pipes before starting the new one: when that failed
    (fork refused), their numbers went to whatever opened next, and the proxy read that file as
    the worker's status (a blocking one stopped the loop) and failed at shutdown."""
    import errno
    import signal

    import sipwatch.span_worker as sw
    p = worker_pipeline(Stats(ring_size=16), None, "grpc", tmp_path)
    os.kill(p.proc.pid, signal.SIGKILL)
    p.proc.wait()
    p._poll()
    assert p._dead
    real = sw.subprocess.Popen

    def refused(*args, **kwargs):
        raise OSError(errno.EAGAIN, "fork refused")
    monkeypatch.setattr(sw.subprocess, "Popen", refused)
    p._restart_at = 0.0
    p._poll()
    assert p._dead and p.restarts == 0
    r, w = os.pipe()
    try:
        os.write(w, b"not the worker's")
        assert r not in (p._r, p._w) and w not in (p._r, p._w)
        p._poll()
        assert os.read(r, 100) == b"not the worker's"
    finally:
        os.close(r)
        os.close(w)
    monkeypatch.setattr(sw.subprocess, "Popen", real)
    p._restart_at = 0.0
    p._poll()
    assert not p._dead and p.restarts == 1 and p.proc.poll() is None
    p.shutdown(1.0)


def test_a_stdout_nobody_reads_holds_up_no_span_and_its_lines_are_counted(tmp_path):
    """The worker wrote the summaries with writes that waited for room: with stdout's reader
    stalled (a hung log shipper) it read no more frames and no span of any call was exported,
    with no drop counted anywhere. Now the lines wait in a bounded writer; once the reader has
    taken nothing for WRITER_STALL seconds, frames are read again, spans go out, and the lines
    past the bound (and those still waiting at the end) are counted dropped."""
    import time

    from sipwatch.handoff import summary_tuples
    from sipwatch.span_worker import WRITER_STALL
    recs = proxy_records()
    calls = calls_of(recs)
    per = len(spans_of(recs))
    stats = Stats(ring_size=16)
    p, r = piped_summaries(tmp_path, stats, prepare=_fill)  # the pipe full, nobody reading
    try:
        tuples = summary_tuples(calls, None)
        submitted = sent = 0
        end = time.monotonic() + 120
        started = time.monotonic()
        # well past the stall, and past the writer's 8-MB bound of lines
        while time.monotonic() < end and (time.monotonic() - started < 3 * WRITER_STALL or p.log_dropped == 0):
            if submitted - stats.spans_exported < 50 * per:  # (what the worker has yet to take: bounded)
                for _ in range(20):
                    p.submit(recs)
                    p.submit_summaries(tuples)
                    submitted += per
                    sent += len(tuples)
            p._poll()
            time.sleep(0.01)
        while time.monotonic() < end and stats.spans_exported < submitted:
            p._poll()
            time.sleep(0.01)
        assert stats.spans_exported >= submitted > 0, (stats.spans_exported, submitted)
        assert p.log_dropped > 0 and stats.spans_dropped == 0
        p.shutdown(5)
        assert p.proc.returncode == 0
        # every summary: in the pipe (none fit), dropped and counted, or given back to the proxy
        back = len(p.take_lost_summaries())
        assert p.log_dropped + back == sent, (p.log_dropped, back, sent)
    finally:
        p.proc.kill()
        p.proc.wait()
        os.close(r)


def test_summaries_waiting_for_a_stalled_stdout_are_not_reported_written(tmp_path):
    """Lines waiting for stdout were reported written once its reader had taken nothing for a
    second: a worker killed then lost them, uncounted (the proxy, told they were out, did not
    write them). Within the writer's bound they stay unreported now, and a dead worker's come
    back to the proxy; past the bound they are dropped and counted first."""
    import signal
    import time

    from sipwatch.handoff import summary_tuples
    stats = Stats(ring_size=16)
    p, r = piped_summaries(tmp_path, stats, prepare=_fill)  # full, nobody reading
    try:
        end = time.monotonic() + 60
        while not p._status and time.monotonic() < end:
            p._poll()
            time.sleep(0.01)
        tuples = summary_tuples(calls_of(proxy_records()), None)
        p.submit_summaries(tuples)
        with p._lock:
            p._send_held()
        from sipwatch.span_worker import WRITER_STALL
        until = time.monotonic() + 3 * WRITER_STALL
        while time.monotonic() < until:  # well past the stall
            p._poll()
            time.sleep(0.02)
        assert p._status.get("summaries", 0) == 0
        os.kill(p.proc.pid, signal.SIGKILL)
        p.proc.wait()
        p._poll()
        assert p.take_lost_summaries() == tuples and p.log_dropped == 0
    finally:
        p.proc.kill()
        p.proc.wait()
        os.close(r)

