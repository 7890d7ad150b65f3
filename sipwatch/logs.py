"""JSON lines on stdout (orjson): one object per event, one call summary per finished call.

Fields every record has: ``timestamp`` (RFC 3339 UTC), ``log_level``, ``service_name``,
``call_sid`` (the SIP Call-ID, masked as ``--mask-call-id`` says, or null), ``trace_id``
(32 hex, or null), ``message``, ``event``. Nothing here runs per datagram: call summaries are
written from drained finished-call records.

Writing a line never raises: a value orjson refuses (an integer past 64 bits, a non-string key,
a lone surrogate, an unknown type) is written as a string instead, and a record that still
cannot be encoded becomes a short ``log_error`` line. Such failures are counted (component
``log`` of ``sipwatch_internal_errors_total``) through ``on_error``.

The proxy writes through :func:`stdout_writer`: a reader of stdout that stops reading (a full
pipe) then costs log lines, counted, never the event loop's time.
"""
from __future__ import annotations

import asyncio
import math
import os
import select
import socket
import stat
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Final

import orjson

from .masking import mask_uri
from .otlp_encode import _otlpenc
from .stats import METHODS, OUTCOMES
from .summary import (UNSAFE_PAST_C0, S_CALL_ID, S_END, S_TRACE_ID, add_summary_fields, call_sid_of,  # noqa: F401 (re-exported)
                      call_summary_fields, leg_fields, summary_fields_of, summary_tuple)

LEVELS = ("debug", "info", "warning", "error")
# the most bytes of lines in one write: a writer's bound on what waits (max_pending) is applied
# per write, so one write of a whole tick's (or the shutdown's) lines could be dropped whole, the
# summaries of ordinary calls with those of a peer whose calls made huge lines
WRITE_MAX = 64 << 10
_MAX_DEPTH = 32  # deeper structures are cut (a record is built by us, but from peer input)
_MAX_ITEMS = 10_000


def _default(obj):
    """orjson's fallback for types it does not know: bytes decoded, everything else str()."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", "replace")
    return str(obj)


def _sanitize(obj, depth: int = 0):
    """A copy orjson can always encode: big ints and odd keys as strings, bounded depth and size."""
    if obj is None or isinstance(obj, (bool, float)):
        return obj
    if isinstance(obj, int):
        return obj if -(1 << 63) <= obj < (1 << 64) else str(obj)
    if isinstance(obj, str):
        return obj.encode("utf-8", "replace").decode("utf-8")
    if depth >= _MAX_DEPTH:
        return "<too deep>"
    if isinstance(obj, dict):
        out = {}
        for i, (k, v) in enumerate(obj.items()):
            if i >= _MAX_ITEMS:
                out["<truncated>"] = len(obj) - i
                break
            out[_sanitize(k, depth + 1) if isinstance(k, str) else str(k)] = _sanitize(v, depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_sanitize(v, depth + 1) for v in obj[:_MAX_ITEMS]]
        if len(obj) > _MAX_ITEMS:
            items.append(f"<{len(obj) - _MAX_ITEMS} more>")
        return items
    try:
        return _sanitize(_default(obj), depth + 1)
    except Exception:
        return f"<{type(obj).__name__}>"


_orjson_dumps = orjson.dumps
# in a line's strings as JSON escapes: what a terminal or log viewer would act on or reorder
# (an 8-bit CSI, bidi overrides) and a JSON encoder leaves as it is (see summary.UNSAFE_PAST_C0)
_JSON_UNSAFE: Final = {c: "\\u%04x" % c for c in UNSAFE_PAST_C0}


def json_line_safe(line: bytes) -> bytes:
    """``line`` (UTF-8 JSON) with the characters above escaped; an ASCII line (nearly every
    one) is returned as it is, after one scan in C."""
    if line.isascii() and b"\x7f" not in line:
        return line
    return line.decode("utf-8", "surrogateescape").translate(_JSON_UNSAFE).encode("utf-8", "surrogateescape")


# the C writer of summary lines, or None: the C span assembly not built, or SIPWATCH_NO_C=1 (then
# every line is built as a dict and dumped, the reference)
_c_summary_line = _otlpenc.summary_line if _otlpenc is not None else None
_OUTCOMES_JSON: Final = tuple(orjson.dumps(o) for o in OUTCOMES)
# the C stamp of a float time in range (_stamp_float's text; None for any other), or None
_c_stamp: Final = _otlpenc.stamp if _otlpenc is not None else None


def _round_json(x: float, ndigits: int) -> tuple[float, bytes]:
    """``round(x, ndigits)`` and its JSON, for the figures the C writer leaves to Python."""
    v = round(x, ndigits)
    return v, orjson.dumps(v)


def dumps(rec: dict) -> tuple[bytes, Exception | None]:
    """(JSON bytes, the error that forced a fallback or None). Never raises."""
    try:
        return orjson.dumps(rec, default=_default), None
    except Exception as exc:  # noqa: BLE001 - any value from a peer may end up here
        first = exc
    try:
        return orjson.dumps(_sanitize(rec)), first
    except Exception:  # noqa: BLE001
        pass
    minimal = {k: rec.get(k) for k in ("timestamp", "log_level", "service_name", "event")
               if isinstance(rec.get(k), str)}
    minimal["log_error"] = f"record could not be encoded: {type(first).__name__}"
    try:
        return orjson.dumps(minimal), first
    except Exception:  # noqa: BLE001
        return b'{"event":"log_error"}', first


def wait_fds(readable: list, writable: list, timeout: float) -> tuple[list, list]:
    """``select.select`` for descriptors of any number (select refuses those past 1023, which a
    proxy holding thousands of TCP connections opens): (ready to read, ready to write)."""
    poller = select.poll()
    for fd in readable:
        poller.register(fd, select.POLLIN)
    for fd in writable:
        if fd in readable:
            poller.modify(fd, select.POLLIN | select.POLLOUT)
        else:
            poller.register(fd, select.POLLOUT)
    try:
        events = poller.poll(max(0, math.ceil(timeout * 1000)))
    except InterruptedError:
        return [], []
    r = [fd for fd, ev in events if fd in readable and ev & (select.POLLIN | select.POLLHUP | select.POLLERR)]
    w = [fd for fd, ev in events if fd in writable and ev & (select.POLLOUT | select.POLLHUP | select.POLLERR)]
    return r, w


class WholeWrites:
    """A descriptor written whole. It may be non-blocking without this process having asked for
    it: stdout's flags are shared with whoever started the proxy (and with its span worker), and
    a write to a full non-blocking pipe takes part of a line, or none, the rest lost or glued to
    the next line. This one writes the rest when there is room again; it waits, so only a thread
    or process that may wait uses it (the span worker; the proxy's writer thread). A write of at
    most PIPE_BUF bytes to a pipe is still all or nothing."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                done += os.write(self.fd, view[done:])
            except BlockingIOError:
                wait_fds([], [self.fd], 1.0)
        return done

    def flush(self) -> None:
        pass


class BackgroundWriter:
    """Writes batches of lines to a stream from a thread of its own.

    ``write`` only queues (the event loop never waits on a pipe whose reader stalled: a blocking
    write there had stopped forwarding along with the logs); the thread writes, with the GIL
    released while the kernel blocks, each batch in a write of its own (joined, two batches of
    whole lines that each fit a pipe's atomic write would not). Past ``max_pending`` bytes
    waiting, batches are dropped and their lines counted in ``dropped_lines``. ``close`` writes
    what is left, within a bound. A stream with a descriptor is written through
    :class:`WholeWrites` (what its buffer held goes first): this writer is what the proxy falls
    back to when it cannot open its stdout pipe a second time, non-blocking flags and all."""

    def __init__(self, stream, max_pending: int = 8 << 20):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        if fd is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # (a full non-blocking pipe: the buffer's rest is the stream's to lose)
        self.stream = stream if fd is None else WholeWrites(fd)
        self.max_pending = max_pending
        self.dropped_lines = 0
        self._queue: deque = deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._closing = False
        self._writer_thread = threading.Thread(target=self._run, name="sipwatch-log-writer", daemon=True)
        self._writer_thread.start()

    def write(self, data: bytes, lines: int) -> None:
        with self._cond:
            if self._closing or self._pending + len(data) > self.max_pending:
                self.dropped_lines += lines
                return
            self._queue.append(data)
            self._pending += len(data)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            done = 0
            for data in batch:  # write by write, as queued: a shared pipe's lines stay whole
                try:
                    self.stream.write(data)
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stdout gone: the lines are lost, the proxy carries on
                done += len(data)
            with self._cond:
                self._pending -= done

    def close(self, timeout: float = 2.0) -> None:
        """Stop taking lines, write the queued ones (a stalled reader gets ``timeout`` s)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._writer_thread.join(timeout)


class NonBlockingWriter:
    """Writes lines to a pipe or socket without ever blocking the event loop, and without a thread.

    ``write`` writes at once what the pipe takes (one non-blocking system call) and queues the
    rest; the loop then writes the queue when the pipe has room (``add_writer``). Past
    ``max_pending`` bytes queued, writes are dropped and their lines counted in
    ``dropped_lines``. Measured against the writer thread it replaces (:class:`BackgroundWriter`),
    each hand-off to the thread cost a wake-up and a GIL hand-over that forwarding waited for.

    ``fd`` must be a private non-blocking file description (see :func:`stdout_writer`), or
    ``sock`` a socket sent to with ``MSG_DONTWAIT``, so no other process sharing stdout (or
    stderr, when it is the same pipe) sees its flags change. ``close`` writes what is left,
    within a bound."""

    def __init__(self, fd: int | None = None, sock: socket.socket | None = None,
                 max_pending: int = 8 << 20):
        self._fd = fd
        self._sock = sock
        self._poll_fd: int = sock.fileno() if sock is not None else (fd if fd is not None else -1)
        self.max_pending = max_pending
        self.dropped_lines = 0
        self._queue: deque[bytes] = deque()
        self._pending = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # armed: add_writer registered
        self._broken = False
        self.progress_at = time.monotonic()  # when the pipe last took bytes (or lines began to wait)
        self.handed_total = 0  # bytes accepted (not dropped), ever
        self._partial = False  # the queue's first bytes are the rest of a write cut short
        self.taken_total = 0  # bytes the pipe took, ever: the lines up to here are out

    def _send(self, data) -> int:
        """Bytes taken now; 0 when the pipe is full. A broken pipe swallows everything."""
        if self._broken:
            return len(data)
        try:
            if self._sock is not None:
                return self._sock.send(data, socket.MSG_DONTWAIT)
            return os.write(self._fd, data)  # type: ignore[arg-type]
        except (BlockingIOError, InterruptedError):
            return 0
        except (OSError, ValueError):
            self._broken = True  # stdout gone: the lines are lost, the proxy carries on
            return len(data)

    def write(self, data: bytes, lines: int) -> None:
        if self._pending + len(data) > self.max_pending or self._broken:
            self.dropped_lines += lines  # (broken: stdout is gone, the lines with it)
            return
        self.handed_total += len(data)
        if not self._queue:
            n = self._send(data)
            self.taken_total += n
            self.progress_at = time.monotonic()  # (taken, or the wait begins)
            if n >= len(data):
                return
            self._partial = n > 0
            data = data[n:]
        self._queue.append(data)
        self._pending += len(data)
        self._arm()

    def _arm(self) -> None:
        if self._loop is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (start-up, shutdown): the next write or close() goes on
        try:
            loop.add_writer(self._poll_fd, self._drain)
            self._loop = loop
        except (OSError, ValueError, RuntimeError, NotImplementedError):
            pass

    @property
    def pending_bytes(self) -> int:
        return self._pending

    @property
    def waiting(self) -> bool:
        """Bytes queued for the pipe: a writer without an event loop (the span worker) polls
        :meth:`fileno` for room and calls :meth:`pump`."""
        return bool(self._queue)

    def fileno(self) -> int:
        return self._poll_fd

    def pump(self) -> bool:
        """Write what the pipe takes now, without waiting; True when nothing is left."""
        return self._drain()

    def discard(self) -> None:
        """Give up on the lines waiting (their reader took nothing for long): counted dropped
        and as out of the queue (``taken_total``), but for a line partly written already, which
        must end before another starts."""
        queue = self._queue
        keep = queue.popleft() if queue and self._partial else None
        for d in queue:
            self.dropped_lines += d.count(b"\n")
            self.taken_total += len(d)
            self._pending -= len(d)
        queue.clear()
        if keep is not None:
            queue.append(keep)
        elif self._loop is not None:
            self._disarm()

    def _disarm(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            try:
                loop.remove_writer(self._poll_fd)
            except Exception:  # noqa: BLE001 - a closed loop: nothing left to remove
                pass

    def _drain(self) -> bool:
        """Write from the queue until it is empty or the pipe is full; True when empty."""
        queue = self._queue
        try:
            while queue:
                data = queue[0]
                n = self._send(data)
                if n <= 0:
                    return False
                self.progress_at = time.monotonic()
                self.taken_total += n
                self._pending -= n
                if n < len(data):
                    queue[0] = data[n:]
                    self._partial = True
                    return False
                queue.popleft()
                self._partial = False
            self._disarm()
            return True
        except Exception:  # noqa: BLE001 - a callback of the loop must not raise
            self._broken = True
            queue.clear()
            self._pending = 0
            self._disarm()
            return True

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued, waiting for room at most ``timeout`` s in all."""
        self._disarm()
        deadline = time.monotonic() + timeout
        while not self._drain():
            left = deadline - time.monotonic()
            if left <= 0 or self._poll_fd < 0:
                break
            try:
                wait_fds([], [self._poll_fd], left)
            except (OSError, ValueError):
                break
        if self._queue:  # what the reader never took: its lines lost, counted
            self.dropped_lines += sum(d.count(b"\n") for d in self._queue)
            self._queue.clear()
            self._pending = 0
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def interleaves(stream) -> bool:
    """Whether writes of two processes to ``stream`` can interleave within a write: a pipe or a
    socket (past PIPE_BUF bytes), not a regular file (Linux serialises writes through one open
    file), a terminal or ``/dev/null``."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def stdout_writer(stream, max_pending: int = 8 << 20):
    """The writer for the proxy's log lines on ``stream`` (stdout), by what it is connected to.

    * a pipe (a container runtime, a log shipper): a second, private file description of the
      same pipe, opened non-blocking (``/proc/self/fd``), for :class:`NonBlockingWriter`;
    * a socket (e.g. systemd's journal stream): a duplicate sent to with ``MSG_DONTWAIT``;
    * a terminal: :class:`BackgroundWriter` (a thread). A terminal nobody reads (a session
      suspended, or held with Ctrl-S) stalls a writer as a full pipe does, and a blocking write
      there stopped forwarding; a non-blocking one is cut short at any size, and the span
      worker's line then lands inside the proxy's. A blocking write from a thread is whole;
    * a regular file or ``/dev/null``: None, written directly (they do not stall on a reader);
    * a pipe that cannot be reopened: :class:`BackgroundWriter` (a thread)."""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        return None
    if stat.S_ISSOCK(mode):
        try:
            return NonBlockingWriter(sock=socket.socket(fileno=os.dup(fd)), max_pending=max_pending)
        except OSError:
            return BackgroundWriter(stream, max_pending)
    if stat.S_ISCHR(mode):
        try:
            tty = os.isatty(fd)
        except OSError:
            tty = False
        return BackgroundWriter(stream, max_pending) if tty else None
    if not stat.S_ISFIFO(mode):
        return None
    try:
        own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return BackgroundWriter(stream, max_pending)
    try:
        stream.flush()  # what the stream buffered goes first
    except (OSError, ValueError):
        pass
    return NonBlockingWriter(fd=own, max_pending=max_pending)


class JsonLog:
    def __init__(self, service_name: str = "sipwatch", stream=None, mask_mode: str = "partial",
                 level: str = "info", clock=time.time, call_id_mask=None, on_error=None,
                 background: bool = False):
        if level not in LEVELS:
            raise ValueError(f"unknown log level {level!r} (expected one of {', '.join(LEVELS)})")
        self.service_name = service_name
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.mask_mode = mask_mode
        self.min_level = LEVELS.index(level)
        self.clock = clock
        # bytes Call-ID -> str as logged (masking.CallIdMasker); None: as is
        self.call_id_mask = call_id_mask
        # on_error(component, exc): count (and report) a record that could not be encoded
        self.on_error = on_error
        # deferred: lines wait in memory until flush() writes them in one system call (the
        # proxy flushes at the end of every housekeeping tick and after the last slice of its
        # backlog); else each line is written at once, with the lines still held before it
        self.deferred = False
        # atomic_lines: each write whole lines of at most PIPE_BUF bytes (a longer line alone),
        # for a pipe or socket shared with another process (the span worker writes the call
        # summaries): a pipe never interleaves writes that size
        self.atomic_lines = False
        self._pending: list[bytes] = []
        # what comes between the timestamp and the Call-ID in a summary line (the C writer's)
        self._summary_head = b',"log_level":"info","service_name":' + orjson.dumps(service_name) + b',"call_sid":'
        # background: lines go to the stream without blocking the caller (the proxy: see
        # stdout_writer); None when the stream cannot stall (a file) or background is off
        self.writer = stdout_writer(self.stream) if background else None

    def emit(self, level: str, message: str, event: str, call_sid=None, trace_id=None,
             when=None, **fields) -> None:  # when: a timestamp (anything else stamps now)
        if LEVELS.index(level) < self.min_level:
            return
        self._emit_record(level, message, event, call_sid, trace_id, when, fields)

    def _emit_record(self, level: str, message: str, event: str, call_sid, trace_id, when, fields: dict) -> None:
        """``emit`` past its level check, with the extra fields as a dict (no keyword packing)."""
        rec = {
            "timestamp": _stamp(self.clock, when),
            "log_level": level,
            "service_name": self.service_name,
            "call_sid": call_sid,
            "trace_id": trace_id,
            "message": message,
            "event": event,
        }
        rec.update(fields)
        self._write_record(rec)

    def _write_record(self, rec: dict) -> None:
        """One record as a line: held while ``deferred``, else written at once, after the lines
        still held (their order is kept)."""
        try:
            line = _orjson_dumps(rec, default=_default)
        except Exception:  # noqa: BLE001 - the fallbacks, and the error counted
            line, err = dumps(rec)
            if err is not None and self.on_error is not None:
                try:
                    self.on_error("log", err)
                except Exception:  # noqa: BLE001
                    pass
        self._hold_line(line)

    def _hold_line(self, line: bytes) -> None:
        """A line held while ``deferred`` (written at 1000), else written at once after the
        lines still held (their order is kept)."""
        pending = self._pending
        pending.append(json_line_safe(line))
        if self.deferred:
            if len(pending) >= 1000:
                self.flush()
            return
        self.flush()

    def flush(self) -> None:
        """Write the deferred lines, if any, in one write."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        n = len(pending)
        if self.atomic_lines and n > 1 and sum(map(len, pending)) + n > _PIPE_BUF:
            for chunk, lines in _line_chunks(pending, _PIPE_BUF):
                self._write(chunk, lines)
            return
        if n > 1 and sum(map(len, pending)) + n > WRITE_MAX:  # (one line alone may be longer)
            for chunk, lines in _line_chunks(pending, WRITE_MAX):
                self._write(chunk, lines)
            return
        pending.append(b"")
        self._write(b"\n".join(pending), n)

    def _write(self, data: bytes, lines: int) -> None:
        if self.writer is not None:
            self.writer.write(data, lines)
            return
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stdout gone (pipe closed at shutdown): never take the proxy down for a log line

    @property
    def dropped_lines(self) -> int:
        return 0 if self.writer is None else self.writer.dropped_lines

    def close(self, timeout: float = 2.0) -> None:
        """Write what is pending; with a background writer, wait for it (at most ``timeout`` s)."""
        self.flush()
        if self.writer is not None:
            self.writer.close(timeout)

    def info(self, message: str, event: str, **fields) -> None:
        self.emit("info", message, event, **fields)

    def warning(self, message: str, event: str, **fields) -> None:
        self.emit("warning", message, event, **fields)

    def error(self, message: str, event: str, **fields) -> None:
        self.emit("error", message, event, **fields)

    def minimal_summary(self, summary, exc: BaseException) -> None:
        """The line of a call whose summary could not be built: its Call-ID and trace id as far as
        they can be read from ``summary`` (a call, or its summary tuple), and the error's type
        (counts of calls from the logs stay right). Never raises."""
        try:
            if isinstance(summary, tuple):
                cid = summary[S_CALL_ID] if len(summary) > S_CALL_ID else None
                trace = summary[S_TRACE_ID] if len(summary) > S_TRACE_ID else None
            else:
                cid = getattr(summary, "call_id", None)
                trace = getattr(summary, "trace_id", None)
            mask = self.call_id_mask
            sid = None
            if isinstance(cid, bytes):
                sid = mask(cid) if mask is not None else cid.decode("utf-8", "replace")
            self.emit("info", "call finished", "call_summary", call_sid=sid,
                      trace_id="%032x" % trace if isinstance(trace, int) and 0 <= trace < 1 << 128 else None,
                      summary_error=type(exc).__name__)
        except Exception:  # noqa: BLE001
            pass
        if self.on_error is not None:
            try:
                self.on_error("log", exc)
            except Exception:  # noqa: BLE001
                pass

    def call_summary(self, call, rtp: list[dict] | None = None) -> None:
        """The one record per finished call: setup, outcome, duration, retransmissions, RTTs
        (and, where media was seen, one entry per RTP stream)."""
        if self.min_level > _INFO:
            return
        self.call_summary_of(summary_tuple(call), rtp)

    def call_summary_of(self, t: tuple, rtp: list[dict] | None = None) -> None:
        """:meth:`call_summary` of a call's :func:`~sipwatch.summary.summary_tuple` (how the
        proxy's span worker writes the lines the proxy hands it).

        The record is built in its final order in one dict (what ``emit`` would make of
        :func:`call_summary_fields`: its own fields first, then the summary's); the timestamp,
        the call's end, is filled in last."""
        if self.min_level > _INFO:
            return
        mask = self.call_id_mask
        cid = t[S_CALL_ID]
        call_sid = mask(cid) if mask is not None else cid.decode("utf-8", "replace")
        write = _c_summary_line
        if write is not None and rtp is None and len(t) == 15:
            mode = self.mask_mode
            end = t[S_END]
            stamp = _c_stamp(end) if _c_stamp is not None else None  # (a record's end: a float, nearly always)
            if stamp is None:
                stamp = _stamp(self.clock, end)
            line = write(t, stamp, self._summary_head, call_sid, mask_uri(t[9], mode),
                         mask_uri(t[10], mode), mask_uri(t[11], mode), _OUTCOMES_JSON, _round_json)
            if line is not None:
                self._hold_line(line)
                return
        rec = {"timestamp": "", "log_level": "info", "service_name": self.service_name, "call_sid": call_sid,
               "trace_id": "%032x" % t[S_TRACE_ID], "message": "call finished", "event": "call_summary"}
        summary_fields_of(rec, t, self.mask_mode, mask)
        if rtp is not None:
            rec["rtp"] = rtp
        rec["timestamp"] = _stamp(self.clock, t[S_END])
        self._write_record(rec)

    def summaries_of(self, tuples) -> None:
        """:meth:`call_summary_of` of each tuple; one that cannot be written as it is still gets
        its line (:meth:`minimal_summary`), and the rest go on."""
        if isinstance(tuples, list):
            for t in tuples:
                try:
                    self.call_summary_of(t)
                except Exception as exc:  # noqa: BLE001 - counted, and a minimal line instead
                    self.minimal_summary(t, exc)


_INFO = LEVELS.index("info")
_PIPE_BUF = 4096  # POSIX: a pipe write of at most this many bytes is never interleaved with another


def _line_chunks(lines: list, limit: int):
    """(bytes, line count) of consecutive ``lines``, each newline-terminated, each chunk at most
    ``limit`` bytes unless a single line is longer."""
    chunk: list = []
    size = 0
    for line in lines:
        k = len(line) + 1
        if chunk and size + k > limit:
            chunk.append(b"")
            yield b"\n".join(chunk), len(chunk) - 1
            chunk, size = [], 0
        chunk.append(line)
        size += k
    if chunk:
        n = len(chunk)
        chunk.append(b"")
        yield b"\n".join(chunk), n
_UTC = timezone.utc
_STAMP_MAX = 253402300799  # 9999-12-31T23:59:59: later seconds are not RFC 3339 years
_DIGITS3: Final = tuple("%03d" % i for i in range(1000))  # microseconds in two halves of 3 digits


class _Second:
    """The second stamped last: its start and its text ``YYYY-MM-DDTHH:MM:SS.``."""

    def __init__(self) -> None:
        self.start = -1.0
        self.text = ""


_LAST_SECOND: Final = _Second()


def _stamp(clock, when) -> str:
    """RFC 3339 UTC with microseconds (``2026-12-01T19:46:51.123456Z``) of ``when`` (None: of
    ``clock()``), or of now when that is no timestamp.

    The date and time of day are formatted once per second, the microseconds without datetime:
    ``datetime.fromtimestamp`` takes the fraction of the second (exact for a timestamp >= 0),
    scales it to microseconds and rounds half to even, carrying a full million into the next
    second; Python's ``round`` of a float rounds the same way, so the text is the one datetime
    gives. A float (every clock's and record's time) is worked in machine doubles under mypyc."""
    try:
        t = clock() if when is None else when
        kind = type(t)
        if kind is float:
            if 0.0 <= t < _STAMP_MAX:
                return _stamp_float(t) if _c_stamp is None else _c_stamp(t)
        elif kind is int and 0 <= t < _STAMP_MAX:
            return _stamp_float(float(t))
        ts = datetime.fromtimestamp(t, _UTC)
    except (OverflowError, OSError, ValueError, TypeError):
        return datetime.now(_UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return ts.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _stamp_float(t: float) -> str:
    """:func:`_stamp` of ``0 <= t < _STAMP_MAX``. The fraction of the second is exact, and so is
    ``f - floor(f)`` of its microseconds: the half-to-even rounding below is ``round``'s."""
    second = float(math.floor(t))
    f = (t - second) * 1e6
    micro = math.floor(f)
    d = f - micro
    if d > 0.5 or (d == 0.5 and micro % 2 == 1):
        micro += 1
    if micro >= 1_000_000:
        second += 1.0
        micro -= 1_000_000
    last = _LAST_SECOND
    if last.start != second:
        last.text = datetime.fromtimestamp(second, _UTC).isoformat(timespec="microseconds")[:20]
        last.start = second
    return last.text + _DIGITS3[micro // 1000] + _DIGITS3[micro % 1000] + "Z"


def masked_error_text(text: str, mode: str) -> str:
    """The text of an exception for a log line: it can quote peer input, so numbers are masked
    as the log's mode says, before it is cut to 300 characters (a number cut first would show
    its middle digits as if they were its last four)."""
    return mask_uri(text, mode)[:300]


class ErrorReporter:
    """Counts internal failures per component and logs them, at most one line per component
    every ``interval`` seconds (with the number of failures not logged in between).

    ``report`` never raises: it is called from ``except`` blocks of the tick, the metrics
    collectors and the span pipeline's hand-off. Failures counted where no log may be written
    (a datagram callback: ``Stats.failed``) are logged by ``catch_up``, which the housekeeping
    calls.
    """

    def __init__(self, log: JsonLog, counters: dict, interval: float = 10.0, clock=time.monotonic):
        self.log = log
        self.counters = counters  # Stats.internal_errors
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._seen: dict[str, int] = {}  # each component's count that a line (or its suppression) covers

    def report(self, component: str, exc: BaseException, count: bool = True, **fields) -> None:
        try:
            if count:
                self.counters[component] = self.counters.get(component, 0) + 1
            self._seen[component] = self.counters.get(component, 0)
            if not self._due(component, self.clock()):
                self._suppressed[component] = self._suppressed.get(component, 0) + 1
                return
            self._line(component, str(exc), error_type=type(exc).__name__, **fields)
        except Exception:  # noqa: BLE001 - the reporter of last resort must not fail
            pass

    def _due(self, component: str, now: float) -> bool:
        """Whether ``component`` may have a line now (one every ``interval``); taken if so."""
        last = self._last.get(component)
        if last is not None and now - last < self.interval:
            return False
        self._last[component] = now
        return True

    def _line(self, component: str, text: str, **fields) -> None:
        """The ``internal_error`` line: the text masked, the failures suppressed since the last."""
        self.log.error(f"internal error in {component}, carrying on", "internal_error",
                       component=component, error=masked_error_text(text, self.log.mask_mode),
                       suppressed=self._suppressed.pop(component, 0),
                       total=self.counters.get(component, 0), **fields)

    def catch_up(self, texts: dict) -> None:
        """Log the failures counted since the last line of their component without passing
        through ``report`` (``texts``: each component's last failure, ``Stats.internal_error_text``),
        under the same limit of one line per component every ``interval``. Never raises."""
        try:
            now = -1.0
            for component, total in self.counters.items():
                new = total - self._seen.get(component, 0)
                if new <= 0:
                    continue
                if now < 0:
                    now = self.clock()
                if not self._due(component, now):
                    continue  # a later tick writes it, with the failures counted meanwhile
                self._seen[component] = total
                self._line(component, str(texts.get(component) or ""), new=new)
        except Exception:  # noqa: BLE001 - as report
            pass


__all__ = ["JsonLog", "BackgroundWriter", "NonBlockingWriter", "WholeWrites", "stdout_writer", "ErrorReporter",
           "masked_error_text", "call_summary_fields", "dumps", "METHODS"]
