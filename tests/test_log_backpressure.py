"""A reader of the sidecar's stdout that stops reading costs log lines, never calls.

Once the event loop wrote the lines itself with blocking writes, and a full stdout pipe (a stalled
log collector) blocked the loop: forwarding stopped along with the logs. The proxy now writes a
pipe or socket through sipwatch.logs.NonBlockingWriter (on the loop, never blocking), and falls
back to a writer thread (BackgroundWriter) where stdout cannot be reopened."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import orjson
import pytest

from harness import HAVE_SIPP, Sidecar, free_port, metric, run_call_pair
import uvloop

from sipwatch.logs import BackgroundWriter, NonBlockingWriter, stdout_writer


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


def test_writer_thread_on_a_non_blocking_pipe_loses_nothing():
    """Whoever started the proxy may have made its stdout pipe non-blocking, and where that pipe
    cannot be opened a second time (no /proc) the writer thread writes it as it is: a full pipe
    then takes part of a write, or none. Every line still comes out, whole and in order, once the
    reader drains it; none is lost to EAGAIN or counted dropped."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    stream = os.fdopen(w, "wb")  # buffered, as sys.stdout.buffer is
    stream.write(b"first\n")  # held in the stream's buffer: it goes out before the thread's lines
    writer = BackgroundWriter(stream, max_pending=8 << 20)
    lines = _lines(400)  # 400 KB against a 64 KB pipe nobody reads yet
    for i in range(0, len(lines), 4):
        writer.write(b"".join(lines[i:i + 4]), 4)
    time.sleep(0.5)  # the thread meets the full pipe
    got = _read_available(r, len(lines) + 1, 60)
    writer.close(5)
    assert writer.dropped_lines == 0
    assert got.splitlines() == [b"first"] + [x.rstrip(b"\n") for x in lines]
    os.close(r)
    try:
        stream.close()
    except OSError:
        pass


def _lines(n: int) -> list[bytes]:
    return [b"%06d" % i + b"x" * 993 + b"\n" for i in range(n)]


def _deliver_after_stall(writer, reader_fd: int, lines: list[bytes], crlf: bool = False) -> tuple[int, bytes]:
    """On a uvloop loop: write every line while nobody reads (as fast as the loop can), then read
    while the loop runs the writer's callbacks. Returns (lines dropped, bytes that came out).
    ``crlf``: the reader is a terminal, which writes each line end as CR LF (a byte more a line:
    counting without it stopped reading before the last lines came out, on a loaded machine)."""
    async def main():
        loop = asyncio.get_running_loop()
        for line in lines:
            writer.write(line, 1)  # a blocking write would hang here at 64 KB
        dropped = writer.dropped_lines
        want = sum(len(x) for x in lines[:len(lines) - dropped])
        if crlf:
            want += sum(x.count(b"\n") for x in lines[:len(lines) - dropped])
        got = bytearray()
        os.set_blocking(reader_fd, False)
        deadline = loop.time() + 60
        while len(got) < want and loop.time() < deadline:
            try:
                chunk = os.read(reader_fd, 1 << 16)
            except BlockingIOError:
                chunk = b""
            got += chunk
            await asyncio.sleep(0 if chunk else 0.005)  # the writer's add_writer callback runs
        return dropped, bytes(got)
    return uvloop.run(main())


def test_loop_writer_never_blocks_drops_past_its_bound_and_delivers_the_rest_in_order():
    r, w = os.pipe()
    stream = os.fdopen(w, "wb", buffering=0)
    writer = stdout_writer(stream, max_pending=256 << 10)
    assert isinstance(writer, NonBlockingWriter)
    assert os.get_blocking(w), "stdout's own file description (shared with stderr) changed flags"
    lines = _lines(2000)  # 2 MB against a 64 KB pipe and a 256 KB queue
    dropped, got = _deliver_after_stall(writer, r, lines)
    assert 0 < dropped < len(lines)
    # what was taken came out whole and in order: the lines before the queue filled
    assert got == b"".join(lines[:len(lines) - dropped])
    writer.close(1)
    stream.close()
    os.close(r)


def test_loop_writer_on_a_socket_stdout_as_systemd_gives_it():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = os.fdopen(os.dup(a.fileno()), "wb", buffering=0)
    writer = stdout_writer(stream, max_pending=256 << 10)
    assert isinstance(writer, NonBlockingWriter)
    assert a.getblocking()
    lines = _lines(2000)
    dropped, got = _deliver_after_stall(writer, b.fileno(), lines)
    assert 0 < dropped < len(lines) and got == b"".join(lines[:len(lines) - dropped])
    writer.close(1)
    stream.close()
    a.close()
    b.close()


def test_writer_thread_on_a_terminal_nobody_reads():
    """A terminal stalls a writer as a full pipe does (nobody reading the session, Ctrl-S): it
    was written directly, blocking, and forwarding stopped with the proxy in write(2). It gets
    the writer thread now (a non-blocking write to a terminal is cut short at any size, and the
    span worker's line then landed inside the proxy's: a thread's blocking write is whole)."""
    import pty
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "wb", buffering=0)
    writer = stdout_writer(stream, max_pending=256 << 10)
    assert isinstance(writer, BackgroundWriter)
    assert os.get_blocking(slave), "the terminal's own file description changed flags"
    lines = _lines(2000)
    dropped, got = _deliver_after_stall(writer, master, lines, crlf=True)
    assert 0 < dropped < len(lines)
    # a terminal may translate line ends: every line that came out is whole, in order
    assert got.replace(b"\r\n", b"\n") == b"".join(lines[:len(lines) - dropped])
    writer.close(1)
    stream.close()
    os.close(master)


def test_a_flush_is_written_in_bounded_writes_so_a_bound_drops_only_what_is_past_it():
    """The deferred lines of a tick (or of the shutdown) went out as one write, and a writer's
    bound drops a write whole: a peer whose calls made 15-KB lines took the summaries of every
    other call in the batch with its own. Writes are now of at most WRITE_MAX bytes."""
    from sipwatch.logs import WRITE_MAX, JsonLog

    class Writer:
        dropped_lines = 0

        def __init__(self):
            self.writes = []

        def write(self, data, lines):
            self.writes.append((data, lines))

    log = JsonLog("t", stream=open(os.devnull, "wb"))
    log.writer = w = Writer()
    log.deferred = True
    for i in range(900):
        log.info("x", "e", i=i, pad="y" * (15000 if i % 3 else 10))
    log.deferred = False
    log.flush()
    assert len(w.writes) > 1
    assert all(len(d) <= WRITE_MAX or lines == 1 for d, lines in w.writes)
    out = b"".join(d for d, _ in w.writes).splitlines()
    assert [orjson.loads(x)["i"] for x in out] == list(range(900))
    assert sum(lines for _, lines in w.writes) == 900


def test_a_regular_file_is_written_directly(tmp_path):
    with open(tmp_path / "out.log", "wb") as fh:
        assert stdout_writer(fh) is None


@pytest.mark.sipp
@pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp (Debian sip-tester)")
@pytest.mark.parametrize("spans", [False, True], ids=["proxy-writes", "worker-writes"])
def test_calls_pass_while_nobody_reads_the_sidecars_stdout(tmp_path, spans):
    """With spans on, the span worker writes the call summaries: it blocks on the full pipe
    (the loop never does), and its lines come out once the pipe is read again."""
    n = 200  # ~200 KB of call summaries against a 64 KB pipe
    uas_port = free_port()
    extra = ("--spans-file", str(tmp_path / "spans.jsonl")) if spans else ()
    sc = Sidecar(tmp_path, uas_port, *extra, pipe_stdout=True)
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
    assert len({s["call_sid"] for s in summaries}) == n
