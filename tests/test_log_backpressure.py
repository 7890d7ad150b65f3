"""A reader of the sidecar's stdout that stops reading costs log lines, never calls.

The proxy's log lines go out from a writer thread (sipwatch.logs.BackgroundWriter). Before, the
event loop wrote them itself, and a full stdout pipe (a stalled log collector) blocked the loop:
forwarding stopped along with the logs."""
from __future__ import annotations

import os
import threading
import time

import orjson
import pytest

from harness import HAVE_SIPP, Sidecar, free_port, metric, run_call_pair
from sipwatch.logs import BackgroundWriter


def _read_available(fd: int, want_lines: int, timeout: float) -> bytes:
    """Read a non-blocking pipe until ``want_lines`` lines came or ``timeout`` passed."""
    os.set_blocking(fd, False)
    got = b""
    deadline = time.monotonic() + timeout
    while got.count(b"\n") < want_lines and time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if not chunk:
            break
        got += chunk
    return got


def test_writer_queues_while_the_pipe_is_full_drops_past_its_bound_and_loses_nothing_queued():
    r, w = os.pipe()
    stream = os.fdopen(w, "wb", buffering=0)
    writer = BackgroundWriter(stream, max_pending=256 << 10)
    line = b"x" * 999 + b"\n"
    n = 2000  # 2 MB against a 64 KB pipe nobody reads and a 256 KB queue
    done = threading.Event()

    def produce():
        for _ in range(n):
            writer.write(line, 1)
        done.set()
    threading.Thread(target=produce, daemon=True).start()
    assert done.wait(60), "write() blocked on a pipe nobody reads"
    dropped = writer.dropped_lines
    assert 0 < dropped < n
    got = _read_available(r, n - dropped, 60)
    assert got.count(b"\n") == n - dropped and set(got.splitlines()) == {line.rstrip(b"\n")}
    writer.close(5)
    stream.close()
    os.close(r)


@pytest.mark.sipp
@pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp (Debian sip-tester)")
def test_calls_pass_while_nobody_reads_the_sidecars_stdout(tmp_path):
    n = 200  # ~200 KB of call summaries against a 64 KB pipe
    uas_port = free_port()
    sc = Sidecar(tmp_path, uas_port, pipe_stdout=True)
    with sc:
        uac_rc, uas_rc, uac, uas = run_call_pair(tmp_path, "uac_call", "uas_call", sc.port, uas_port, n,
                                                 rate=100)
        assert (uac_rc, uas_rc) == (0, 0), uac.errors() + uas.errors()
        assert int(uac.stat()["SuccessfulCall(C)"]) == n
        gw = sc.wait_for(lambda s: metric(s, "sip_calls_processed_total") >= n)
        assert metric(gw, "sip_calls_processed_total", outcome="answered") == n
        assert metric(gw, "sipwatch_log_lines_dropped_total") == 0  # 8 MB of room: all queued
    summaries = [orjson.loads(x) for x in sc.stdout_bytes.splitlines() if b'"call_summary"' in x]
    assert len(summaries) == n  # every line the pipe could not take at the time came out later
