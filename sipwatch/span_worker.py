"""The proxy's span pipeline in a worker process: the event loop never shares the GIL with span work.

Measured with the export thread in the proxy process (1000 calls/s, SIPp through a real sidecar,
spans to an OTLP collector and a file): the loop's added round trip went from p99 ~1.9 ms to
~9.5 ms, because every datagram callback had to win the GIL back from the encoding thread (uvloop
drops the GIL while it polls, the thread takes it, the next callback waits up to a switch
interval). So the proxy hands the sampled records to a child process instead:

* loop side (:class:`WorkerPipeline.submit`, each slice of a housekeeping tick): each record
  becomes a compact tuple of plain values (:func:`sipwatch.otlp_encode.tx_tuple` /
  ``call_tuple``); the tuples of consecutive slices become one frame (packed by the C module,
  else ``marshal``) once DUMP_RECORDS of them have gathered, and the frames are held until
  HOLD seconds or FRAME_RECORDS records have gathered, then written in one write to a
  non-blocking pipe. What the pipe cannot take waits in a bounded buffer (flushed at the next
  tick); past the bound frames of records are dropped and counted (a stop or re-open always
  waits). No encoding, no masking, no JSON here.
* worker (``python -m sipwatch.span_worker``): reads frames, encodes the tuples as they are
  (:meth:`sipwatch.otlp_encode.SpanEncoder.tx_flat` / ``call_flat``: no record objects are
  rebuilt) into the encoder's outbox (``add``/``take``: each delivery's request and line built
  with one copy) and delivers DELIVER_MIN..DELIVER_MAX spans at a time through the same
  :class:`sipwatch.tracing.SpanPipeline` step as the thread pipeline (spans file, OTLP exporter,
  back-off); it reports its counters back as small frames on its stdout.
  It also writes the call summaries the loop hands over (``submit_summaries``: a tuple per call,
  framed with the records) as log lines on the proxy's stdout, which it inherits: their fields,
  masking and JSON cost the loop ~5 µs per message at 4000 calls/s. It reports the last summary
  written; what it will not write (it died, or its frames waited past PENDING_MAX) comes back to
  the proxy (``take_lost_summaries``), which writes it itself.
  It ignores SIGINT/SIGTERM/SIGHUP (the proxy drives it: re-open, stop) and exits at EOF, so it
  never outlives the proxy. It runs as SCHED_IDLE (else nice 10): span export is background work
  that may lag (its queue is bounded and counted), forwarding is not. At shutdown it is lifted
  back to the normal policy (``lift_to_normal``: by the proxy, and by itself at the stop frame),
  where the system allows it (root, CAP_SYS_NICE or RLIMIT_NICE 20): on a saturated machine an
  idle-priority worker would get almost no CPU before the deadline, and what it holds (spans,
  summaries) would miss it. Measured at 1000 calls/s on
  2 cores: with nice 10 the loop's added round trip p99 was ~3.7-5.4 ms (no tracing ~1.6-2.5 ms),
  with SCHED_IDLE ~1.9-2.6 ms, within the run-to-run spread of no tracing.

Cost (1000 calls/s, 4000 spans/s, SIPp through the compiled sidecar, spans to an OTLP/HTTP
collector and a file): a frame per 8-call slice (~150 a second), records rebuilt as objects,
default collector thresholds and 512-span deliveries cost the worker ~25 µs of CPU a span
(marshal.loads with the collector's passes ~3, rebuild ~3, encoding ~10, the rest wake-ups,
copies and cache misses); held frames, encoding from the tuples and the quiet collector brought
it to ~15-20 µs (callgrind, the worker alone on a recorded stream: 94k -> 64k instructions per
record). The encoder's Python was about 57k instructions a span (half of it the OTLP/JSON line):
assembled in C (``sipwatch/_otlpenc.c``) the worker went from ~6.6-8.3 to ~3.4-4.9 µs of CPU
per SIP message (1000 calls/s, paired runs); what is left is the masking of each call's parties
(Python), marshal.loads, the HTTP export and the file write, and a SCHED_IDLE process's cache
misses.

Counters keep their meaning: ``sipwatch_spans_exported_total`` / ``_dropped_total`` are the
worker's plus what the proxy dropped before the pipe; span failures and the spans file's state
(``failures``, ``file_failing``, ``file_error``, ``file_failures``) read as on the thread pipeline.
"""
from __future__ import annotations

import marshal
import math
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque

from . import heap
from .handoff import span_tuples
from .logs import wait_fds
from .otlp_encode import DELIVER_BYTES, _otlpenc, call_tuple, tx_tuple  # noqa: F401 (the frame format, re-exported)

_LEN = struct.Struct("<I")
F_CONFIG, F_RECORDS, F_REOPEN, F_STOP, F_SUMMARIES, F_PACKED_RECORDS, F_PACKED_SUMMARIES = 0, 1, 2, 3, 4, 5, 6
# Frames of tuples are packed by the C module when it is built (``_otlpenc.pack_frame``: the
# kinds the tuples hold, a tag byte each; in process 1.3 µs a call against marshal's 2.4, on the
# loop), else, or for a frame holding anything else, written with marshal. The worker reads both.
_pack = _otlpenc.pack_frame if _otlpenc is not None else None
_unpack = _otlpenc.unpack_frame if _otlpenc is not None else None
_TUPLE_FRAMES = (F_RECORDS, F_SUMMARIES, F_PACKED_RECORDS, F_PACKED_SUMMARIES)  # read by _read_frame
PENDING_MAX = 16 << 20  # bytes of frames waiting for the pipe; beyond, frames are dropped
# the worker's summary lines waiting for stdout: past WRITER_SOFT bytes it reads no frames while
# the reader takes lines; a reader that took none for WRITER_STALL seconds no longer holds it
WRITER_SOFT, WRITER_STALL = 1 << 20, 1.0
STATUS_EVERY = 0.1  # seconds between the worker's status frames while busy
MAX_FRAME = 256 << 20
WORKER_NICE = 10
# The loop holds its records up to HOLD seconds (or FRAME_RECORDS of them) and writes them as one
# frame; the worker encodes each frame as it comes and delivers (one spans-file line, one OTLP
# request) DELIVER_MIN..DELIVER_MAX spans at a time, or what it has after EXPORT_LINGER seconds.
# Measured at 1000 calls/s (4000 spans/s): a frame per 8-call slice of the tick (~150 a second)
# cost ~1.2 % of a core in pipe writes and worker wake-ups besides the encoding itself.
HOLD = 0.2
# Tuples are framed DUMP_RECORDS (summaries: DUMP_SUMMARIES) at a time, not a slice's few at a
# time: at 4000 calls/s a tick's ten 8-call slices had made ~1.4 frames a call, and the worker's
# handling of each frame (its loads, its checks, its encoder call) cost it ~2 µs a call more
# (a recorded live stream replayed both ways, 40k calls, medians of 6: 22.5 vs 20.5 µs a call).
# One dump of 160 tuples takes the loop ~0.1 ms; one of a whole HOLD's worth (thousands) had
# stalled it for milliseconds.
DUMP_RECORDS = 160
DUMP_SUMMARIES = 40
GC_THRESHOLD = 100_000  # container allocations (net) between the worker's young collections
FRAME_RECORDS = 2048
# marshal format of the frames the C packing does not take (or all, without it). Version 2 writes
# no back-references: versions 3 and 4 look every object that has other references (here nearly
# all of them) up in a table, which made the dump cost ~1.8x as much (in process, frames of 40
# records: 2.1 vs 1.2 µs a record) for a ~25 % smaller frame; the worker reads every version alike.
MARSHAL_VERSION = 2
DELIVER_MIN = 1024
DELIVER_MAX = 2048
EXPORT_LINGER = 0.3
# Summaries written but not yet reported, at most: the worker writes the lines it holds and
# reports them at this many, and after each read of frames (one write per read, not per frame:
# its system time at 4000 calls/s fell by a third). If it dies, the proxy writes those again.
# (A frame is written whole before the count is checked, so the frame that crosses the mark
# counts whole; the stop's last slice is one frame of everything left.)
UNTOLD_MAX = 64
# a worker that died is started again after RESTART_FIRST seconds, twice as long each time it dies
# again within RESTART_MAX of its start (at most RESTART_MAX): spans come back on their own, and a
# worker that dies at once cannot take the loop's time starting over and over
RESTART_FIRST, RESTART_MAX = 1.0, 60.0
_STATUS_COUNTERS = ("exported", "dropped", "failures", "log_errors", "file_failures", "log_dropped")
READ_SIZE = 1 << 20  # room kept free in the worker's read buffer (the pipe holds 1 MB)


# -- records rebuilt from tuples ----------------------------------------------------------------
# The worker encodes the tuples as they come (SpanEncoder.tx_flat / call_flat); these records are
# what a tuple stands for, so a check can hold a record and its round trip side by side.
class _Peer:
    __slots__ = ("peer",)

    def __init__(self, peer):
        self.peer = peer


class LegsRec:
    """A B2BUA leg group as the encoder reads it (``sipwatch.state.LegGroup``'s Call-IDs)."""

    __slots__ = ("call_ids",)

    def __init__(self, call_ids):
        self.call_ids = call_ids


class CallRec:
    __slots__ = ("trace_id", "span_id", "parent_span_id", "call_id", "from_uri", "to_uri", "ruri", "outcome",
                 "status", "t_start", "t_setup", "t_answer", "t_end", "retrans", "rtp", "transactions",
                 "is_call", "sampled", "group", "leg", "joined_by", "gap_span_id", "gap_start", "gap_parent",
                 "__weakref__")

    def __init__(self, trace_id, span_id, is_call, call_id, from_uri, to_uri):
        self.trace_id, self.span_id, self.is_call = trace_id, span_id, is_call
        self.call_id, self.from_uri, self.to_uri = call_id, from_uri, to_uri
        self.parent_span_id = 0
        self.ruri = b""
        self.outcome, self.status, self.retrans = -1, 0, 0
        self.t_start = self.t_setup = self.t_answer = self.t_end = None
        self.rtp = None
        self.transactions = ()
        self.sampled = True
        self.group = None
        self.leg, self.joined_by, self.gap_span_id, self.gap_start, self.gap_parent = 0, None, 0, 0.0, 0


class TxRec:
    __slots__ = ("trace_id", "span_id", "parent_span_id", "method", "cseq", "direction", "peer", "status",
                 "t_sent", "t_first", "t_final", "retrans", "timed_out", "events", "call", "sampled")


class Rebuilder:
    """Tuples → records; the transactions of one call share one CallRec (the encoder masks a
    call's parties once per CallRec)."""

    def __init__(self, max_calls: int = 4096):
        self._calls: dict = {}
        self._max = max_calls

    def _call(self, trace_id, span_id, is_call, call_id, from_uri, to_uri) -> CallRec:
        key = (trace_id, span_id)
        c = self._calls.get(key)
        if c is None:
            if len(self._calls) >= self._max:
                self._calls.clear()
            c = self._calls[key] = CallRec(trace_id, span_id, is_call, call_id, from_uri, to_uri)
        return c

    def record(self, t) -> tuple:
        if t[0] == 0:
            (_, trace_id, span_id, parent, method, cseq, direction, peer, status, t_sent, t_first, t_final,
             retrans, timed_out, events, call_span, is_call, call_id, from_uri, to_uri) = t
            x = TxRec()
            x.trace_id, x.span_id, x.parent_span_id, x.method, x.cseq = trace_id, span_id, parent, method, cseq
            x.direction, x.peer, x.status, x.t_sent, x.t_first = direction, peer, status, t_sent, t_first
            x.t_final, x.retrans, x.timed_out, x.events = t_final, retrans, timed_out, events
            x.call = self._call(trace_id, call_span, is_call, call_id, from_uri, to_uri)
            x.sampled = True
            return ("tx", x)
        (_, trace_id, span_id, parent, call_id, from_uri, to_uri, ruri, outcome, status, t_start, t_setup,
         t_answer, t_end, retrans, rtp, first_peer, is_call, legs) = t
        c = self._call(trace_id, span_id, is_call, call_id, from_uri, to_uri)
        self._calls.pop((trace_id, span_id), None)  # the call record comes last
        c.parent_span_id, c.ruri, c.outcome, c.status = parent, ruri, outcome, status
        c.t_start, c.t_setup, c.t_answer, c.t_end, c.retrans, c.rtp = t_start, t_setup, t_answer, t_end, retrans, rtp
        c.transactions = [_Peer(first_peer)] if first_peer is not None else ()
        if legs is not None:
            call_ids, c.leg, c.joined_by, c.gap_span_id, c.gap_start, c.gap_parent = legs
            c.group = LegsRec(call_ids)
        return ("call", c)


# -- the proxy's side ----------------------------------------------------------------------------
def _stderr_notice(text: str) -> None:
    """``text`` on stderr if it takes it now (a non-blocking write), else nothing."""
    try:
        fd = sys.stderr.fileno()
        blocking = os.get_blocking(fd)
        os.set_blocking(fd, False)
        try:
            os.write(fd, f"sipwatch: {text}\n".encode())
        finally:
            os.set_blocking(fd, blocking)
    except (OSError, ValueError, AttributeError):
        pass


class WorkerPipeline:
    """Same surface as :class:`sipwatch.tracing.SpanPipeline` (submit, reopen, shutdown,
    failures, file_failing, file_error, file_failures, sample_ratio, resource)."""

    def __init__(self, stats, config: dict, sample_ratio: float = 1.0, parent_based: bool = True,
                 pending_max: int = PENDING_MAX, log_fd: int | None = None):
        """``log_fd``: the proxy's log (its stdout), where the worker then writes the call
        summaries handed to it (:meth:`submit_summaries`; ``config["log"]`` says how)."""
        from .tracecontext import sampled_by_ratio
        self._sampled_by_ratio = sampled_by_ratio
        self.stats = stats
        self.sample_ratio = sample_ratio
        self.parent_based = parent_based
        self._own_decision = not parent_based
        self.spans_file = config.get("spans_file")
        self.resource = None
        self._held: list[bytes] = []  # frames of records not written yet (see HOLD)
        self._open: list = []  # record tuples not framed yet (see DUMP_RECORDS)
        self._open_summaries: list = []  # summary tuples not framed yet (see DUMP_SUMMARIES)
        self._held_records = 0  # records in the held frames and the open tuples
        self._held_since = 0.0
        # Call summaries handed over: one entry [last sequence number, tuples] per frame, kept
        # until the worker says it wrote them (its status' "summaries": the last number written).
        # What it will not write (it died, or its pipe stayed full) goes to _lost, which the
        # proxy takes back (take_lost_summaries) and writes itself: no summary is lost.
        self._summary_seq = 0
        self._unwritten: deque = deque()
        self._held_summaries: list = []  # the entries of the held frames
        self._lost: deque = deque()
        self._pending: deque = deque()  # [frame, offset, records]
        self._pending_bytes = 0
        self._pending_max = pending_max
        self._dropped = 0  # records dropped before the pipe (loop side)
        self._status: dict = {}
        self._inbuf = bytearray()
        self._dead = False
        self._closed = False  # shut down: the worker's exit is expected
        self._extra_failures = 0
        self._lock = threading.RLock()  # SIGHUP's re-open on the loop vs shutdown in the flush thread
        # records of the frames written whole into the pipe (to this worker): those a dead worker
        # had not reported taken (or still held) are counted dropped
        self._written_records = 0
        # counters of the workers that died, added to the running one's status
        self._base = dict.fromkeys(_STATUS_COUNTERS, 0)
        self.restarts = 0
        self._restart_at = 0.0
        self._restart_wait = RESTART_FIRST
        self._spawned_at = 0.0
        self.summaries = False  # the worker writes the call summaries
        # notice(text): a line about the worker's life (the proxy's log: tracing._worker_pipeline);
        # by default stderr, written only if it takes the line at once (it may be the stdout pipe
        # whose reader stalled, and the loop must not wait on it)
        self.notice = _stderr_notice
        self._spawn(config, log_fd)

    def _spawn(self, config: dict, log_fd: int | None) -> None:
        """Start a worker and hand it ``config`` (kept for a restart)."""
        self._config, self._log_fd = config, log_fd
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # the worker's heap as the proxy's (sipwatch.heap), chosen before its modules are imported
        first = "from sipwatch import heap; heap.use_huge_pages(); " if heap.active() else ""
        code = f"import sys; sys.path.insert(0, {root!r}); {first}from sipwatch.span_worker import main; main()"
        passed: tuple = ()
        if log_fd is not None and config.get("log") is not None:
            passed = (os.dup(log_fd),)  # the same open file (offset, pipe) under a number of its own
            config = dict(config, log=dict(config["log"], fd=passed[0]))
            self.summaries = True
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, close_fds=True, pass_fds=passed)
        finally:
            for fd in passed:
                os.close(fd)
        self._w = self.proc.stdin.fileno()
        self._r = self.proc.stdout.fileno()
        try:
            import fcntl
            fcntl.fcntl(self._w, 1031, 1 << 20)  # F_SETPIPE_SZ: room for a few ticks of records
        except (OSError, ImportError, AttributeError):
            pass
        cfg = pickle.dumps(config)
        os.write(self._w, _LEN.pack(len(cfg) + 1) + bytes((F_CONFIG,)) + cfg)  # blocking: the pipe is empty
        os.set_blocking(self._w, False)
        os.set_blocking(self._r, False)
        self._spawned_at = time.monotonic()

    def _schedule_restart(self, now: float) -> None:
        """The next start in ``_restart_wait`` seconds, and the wait after it twice as long."""
        self._restart_at = now + self._restart_wait
        self._restart_wait = min(2 * self._restart_wait, RESTART_MAX)

    def _restart(self) -> None:
        """A new worker in place of the dead one (on the loop, at most every RESTART_MAX s)."""
        old = self.proc
        try:
            self._spawn(self._config, self._log_fd)
        except Exception as exc:  # noqa: BLE001 - cannot start one now: try again later
            # (the dead one's pipes stay open until then: their numbers are not reused by
            # anything this process opens meanwhile and then read or written as the worker's)
            if self.proc is not old:  # started, then its configuration could not be written
                _discard(self.proc)
            self.proc, self._w, self._r = old, old.stdin.fileno(), old.stdout.fileno()
            self._schedule_restart(time.monotonic())
            self.notice(f"span worker could not be started again: {exc}")
            return
        _discard(old)
        self._inbuf.clear()
        self._status = {}
        self._written_records = 0
        self._dead = False
        self.restarts += 1
        self.stats.span_worker_restarts = self.restarts
        self.notice("span worker started again")

    # loop side -----------------------------------------------------------------------------
    def submit(self, records) -> None:
        """The sampled records of a slice as tuples, framed with those of the slices before once
        DUMP_RECORDS have gathered, held for the next write (see HOLD).

        Framed as they gather, not the HOLD's thousands at the write: one dump of 800 records had
        stopped the loop for ~4 ms live, the tick's longest stall."""
        held = span_tuples(records, self._own_decision, self.sample_ratio, self._sampled_by_ratio)
        if self._dead or self._closed:  # gone or shut down: nothing more is held for it
            self._dropped += len(held) + self._held_records
            self._held = []
            self._open = []
            self._held_records = 0
            return
        if held:
            if not self._holding():
                self._held_since = time.monotonic()
            self._open += held
            self._held_records += len(held)
            if len(self._open) >= DUMP_RECORDS:
                self._frame_open()
        if self._holding() and (self._held_records >= FRAME_RECORDS or time.monotonic() - self._held_since >= HOLD):
            self._poll()  # writes what is held, reads the worker's counters

    def _holding(self) -> bool:
        """Anything submitted and not written yet (framed or not)?"""
        return bool(self._held or self._open or self._open_summaries)

    def _frame_open(self) -> None:
        """The open tuples (summaries, records) as frames, held for the next write."""
        if self._open_summaries:
            self._frame_summaries(self._open_summaries)
            self._open_summaries = []
        if self._open:
            self._held.append(records_frame(self._open))
            self._open = []

    def _frame_summaries(self, tuples: list) -> None:
        """``tuples`` as one held frame of summaries, numbered; one with a value marshal does not
        take goes back to the proxy (``_lost``), which writes it, and the others still go."""
        try:
            frame = summaries_frame(self._summary_seq + len(tuples), tuples)
        except (ValueError, TypeError):
            fit: list = []
            for t in tuples:
                (fit if _marshals(t) else self._lost).append(t)
            if len(fit) < len(tuples):
                if fit:
                    self._frame_summaries(fit)
            else:  # (each alone but not together: never seen) the proxy writes them all
                self._lost.extend(fit)
            return
        self._summary_seq += len(tuples)
        entry = [self._summary_seq, tuples]
        self._held.append(frame)
        self._held_summaries.append(entry)
        self._unwritten.append(entry)

    def submit_summaries(self, tuples: list) -> None:
        """The call summaries of a slice (:func:`~sipwatch.summary.summary_tuple`), framed with
        those of the slices before once DUMP_SUMMARIES have gathered and held with the span
        records (written with them), for the worker to write as log lines. What cannot reach it
        comes back through :meth:`take_lost_summaries`."""
        if not tuples:
            return
        if self._dead or self._closed:
            self._lost.extend(tuples)
            return
        if not self._holding():
            self._held_since = time.monotonic()
        self._open_summaries += tuples
        if len(self._open_summaries) >= DUMP_SUMMARIES:
            self._frame_open()

    def _summaries_lost(self, entries) -> None:
        for entry in entries:
            if entry[1] is not None:
                self._lost.extend(entry[1])
                entry[1] = None

    def _summaries_written(self, seq: int) -> None:
        q = self._unwritten
        while q and q[0][0] <= seq:
            q.popleft()

    def give_back_summaries(self) -> None:
        """Every summary not reported written, to ``_lost`` (the proxy's stop cannot wait for the
        shutdown any longer: a line written twice is better than one never written)."""
        self._summaries_lost(self._unwritten)
        self._lost.extend(self._open_summaries)
        self._open_summaries = []

    def take_lost_summaries(self) -> list:
        """The summaries handed over that the worker will not write (see ``_lost``)."""
        lost = self._lost
        out = []
        while lost:
            out.append(lost.popleft())
        return out

    def _send_held(self) -> None:
        """The held frames in one write (lock held)."""
        self._frame_open()
        held = self._held
        if held:
            n = self._held_records
            summaries = self._held_summaries
            self._held = []
            self._held_records = 0
            self._held_summaries = []
            self._write_frames(b"".join(held) if len(held) > 1 else held[0], n, summaries)

    def _send(self, kind: int, payload: bytes, n: int) -> None:
        with self._lock:
            self._send_held()  # what was submitted before goes first
            self._send_locked(kind, payload, n)

    def _send_locked(self, kind: int, payload: bytes, n: int) -> None:
        self._write_frames(_LEN.pack(len(payload) + 1) + bytes((kind,)) + payload, n)

    def _write_frames(self, frame: bytes, n: int, summaries: list | None = None) -> None:
        """Whole frames (one or several back to back) carrying ``n`` records (and the summary
        entries ``summaries``), into the pipe or, what it cannot take, after what already waits
        for it."""
        if self._closed or self._dead:
            self._dropped += n
            if summaries:
                self._summaries_lost(summaries)
            return
        off = 0
        if not self._pending:  # straight into the pipe; only what it cannot take waits
            try:
                off = os.write(self._w, frame)
            except BlockingIOError:
                off = 0
            except OSError:
                self._worker_died()
                self._dropped += n
                if summaries:
                    self._summaries_lost(summaries)
                return
            if off >= len(frame):
                self._written_records += n
                return
        # past the bound frames of records and summaries are dropped (summaries come back); a
        # control frame (stop, re-open) never is: a stop lost made the worker take the EOF that
        # follows for the proxy's death and drop what it held
        if off == 0 and (n or summaries) and self._pending_bytes + len(frame) > self._pending_max:
            self._dropped += n
            if summaries:
                self._summaries_lost(summaries)
            return
        self._pending.append([frame, off, n])  # a frame begun must be finished (framing)
        self._pending_bytes += len(frame)
        self._flush()

    def _flush(self) -> None:
        q = self._pending
        while q:
            item = q[0]
            frame, off = item[0], item[1]
            try:
                k = os.write(self._w, memoryview(frame)[off:])
            except BlockingIOError:
                return
            except OSError:
                self._worker_died()
                return
            item[1] = off + k
            if item[1] >= len(frame):
                q.popleft()
                self._pending_bytes -= len(frame)
                self._written_records += item[2]

    def _worker_died(self) -> None:
        first = not self._dead
        if first:
            self._dead = True
            self._extra_failures += 1
            now = time.monotonic()
            if now - self._spawned_at > RESTART_MAX:  # it had lived: start again soon
                self._restart_wait = RESTART_FIRST
            self._schedule_restart(now)
            self.notice(f"span worker gone; spans are dropped until it is started again "
                        f"(in {self._restart_at - now:.0f} s)")
        self._dropped += self._held_records
        self._held = []
        self._open = []
        self._held_records = 0
        self._held_summaries = []
        open_summaries = self._open_summaries  # (after those of the frames: the older ones)
        self._open_summaries = []
        while True:  # its last reports first: what it said it wrote is not written again
            data = self._read_status()
            if not data:
                break
            self._inbuf += data
        self._parse_status()
        self._summaries_lost(self._unwritten)  # held, waiting, or in the pipe: the proxy writes them
        self._unwritten.clear()
        self._lost.extend(open_summaries)
        for item in self._pending:
            self._dropped += item[2]
        self._pending.clear()
        self._pending_bytes = 0
        if first:
            st = self._status if isinstance(self._status, dict) else {}
            # written to it and not taken, or taken and still held, as it last said: never exported
            taken, held = st.get("taken", 0), st.get("held", 0)
            self._dropped += max(self._written_records - taken, 0) + held
            self._written_records = 0
            for k in _STATUS_COUNTERS:  # its counters stay in the totals
                self._base[k] += st.get(k, 0)
            self._status = {}

    def _poll(self) -> None:
        """Flush what waits for the pipe and read the worker's latest counters (never blocks)."""
        with self._lock:
            self._poll_locked()

    def _poll_locked(self) -> None:
        if self._closed:
            return
        if self._dead and time.monotonic() >= self._restart_at:
            self._restart()
        if self._pending:
            self._flush()
        if self._holding() and (self._held_records >= FRAME_RECORDS or time.monotonic() - self._held_since >= HOLD):
            self._send_held()
        while True:
            data = self._read_status()
            if data is None:
                break
            if not data:
                if not self._dead and self.proc.poll() is not None:
                    self._worker_died()
                break
            self._inbuf += data
        self._parse_status()
        self._publish()

    def _read_status(self) -> bytes | None:
        """What the status pipe holds: bytes, b"" at EOF (or a broken pipe), None if empty."""
        try:
            return os.read(self._r, 65536)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _parse_status(self) -> None:
        buf = self._inbuf
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            try:
                self._status = marshal.loads(bytes(buf[pos + 4:pos + 4 + n]))
            except (ValueError, EOFError, TypeError):
                pass
            pos += 4 + n
        del buf[:pos]
        written = self._status.get("summaries", 0) if isinstance(self._status, dict) else 0
        if isinstance(written, int):
            self._summaries_written(written)

    def _publish(self) -> None:
        st = self._status
        base = self._base
        self.stats.spans_exported = base["exported"] + st.get("exported", 0)
        self.stats.spans_dropped = base["dropped"] + st.get("dropped", 0) + self._dropped

    @property
    def failures(self) -> int:
        self._poll()
        return self._base["failures"] + self._status.get("failures", 0) + self._extra_failures

    @property
    def log_dropped(self) -> int:
        """Summary lines the workers dropped because stdout's reader fell behind."""
        return self._base["log_dropped"] + self._status.get("log_dropped", 0)

    @property
    def log_errors(self) -> int:
        """Summaries the worker could not write as they were (each got a minimal line)."""
        return self._base["log_errors"] + self._status.get("log_errors", 0)

    @property
    def file_failures(self) -> int:
        return self._base["file_failures"] + self._status.get("file_failures", 0)

    @property
    def file_failing(self) -> bool:
        return bool(self._status.get("file_failing", False))

    @property
    def file_error(self):
        return self._status.get("file_error")

    def reopen(self) -> bool:
        if self.spans_file is None:
            return False
        self._send(F_REOPEN, b"", 0)
        return True

    def shutdown(self, timeout: float = 5.0) -> None:
        """Hand over what is queued, let the worker export it within ``timeout`` seconds, wait."""
        from .tracing import EXPORT_TIMEOUT
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return
            lifting = not self._dead and lift_to_normal(self.proc.pid)  # (see the module's docstring)
            self._send_held()
            self._send_locked(F_STOP, marshal.dumps(float(timeout)), 0)
            while self._pending and not self._dead and time.monotonic() < deadline:
                if lifting:  # again: a worker still starting takes its idle policy after the first
                    lift_to_normal(self.proc.pid)
                self._flush()
                if self._pending:  # (its status read meanwhile: a worker blocked on it reads nothing)
                    r, _ = wait_fds([self._r], [self._w], max(0.0, min(0.2, deadline - time.monotonic())))
                    if r:
                        data = self._read_status()
                        if data:
                            self._inbuf += data
            for item in self._pending:
                self._dropped += item[2]
            self._pending.clear()
            self._closed = True
        try:
            self.proc.stdin.close()  # EOF: the worker finishes and exits
        except OSError:
            pass
        end = deadline + EXPORT_TIMEOUT + 1.0
        while time.monotonic() < end:
            if lifting:
                lift_to_normal(self.proc.pid)
            r, _ = wait_fds([self._r], [], max(0.0, min(0.2, end - time.monotonic())))
            if r:
                data = self._read_status()
                if data is None:
                    continue
                if not data:
                    break
                self._inbuf += data
        self._parse_status()
        if self.proc.poll() is None:
            try:
                self.proc.wait(max(0.0, end - time.monotonic()) + 0.5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            self.proc.stdout.close()
        except OSError:
            pass
        with self._lock:  # what the worker did not write, the proxy writes
            self._summaries_lost(self._unwritten)
            self._unwritten.clear()
        self._publish()


def _discard(proc) -> None:
    """A worker process given up: its pipes closed, itself killed and reaped (briefly)."""
    for f in (proc.stdin, proc.stdout):
        try:
            f.close()
        except OSError:
            pass
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(0.5)
    except subprocess.TimeoutExpired:
        pass


def _frame(kind: int, packed_kind: int, value) -> bytes:
    payload = _pack(value) if _pack is not None else None
    if payload is None:
        payload = marshal.dumps(value, MARSHAL_VERSION)
    else:
        kind = packed_kind
    return _LEN.pack(len(payload) + 1) + bytes((kind,)) + payload


def records_frame(tuples: list) -> bytes:
    """The frame of a list of span tuples (packed, else marshal)."""
    return _frame(F_RECORDS, F_PACKED_RECORDS, tuples)


def summaries_frame(seq: int, tuples: list) -> bytes:
    """The frame of summary tuples, ``seq`` the number of the last (packed, else marshal: which
    raises ValueError/TypeError for a value it does not take)."""
    return _frame(F_SUMMARIES, F_PACKED_SUMMARIES, (seq, tuples))


def _read_frame(kind: int, payload):
    """(kind, value) of a frame of tuples, a packed kind read as the plain one (F_RECORDS,
    F_SUMMARIES); a value that cannot be read is None."""
    try:
        if kind == F_RECORDS or kind == F_SUMMARIES:
            return kind, marshal.loads(payload)
        kind = F_RECORDS if kind == F_PACKED_RECORDS else F_SUMMARIES
        return kind, _unpack(payload) if _unpack is not None else None
    except (ValueError, EOFError, TypeError):
        return kind, None


def _marshals(value) -> bool:
    try:
        marshal.dumps(value, MARSHAL_VERSION)
    except (ValueError, TypeError):
        return False
    return True


# -- the worker ----------------------------------------------------------------------------------
class _Counters:
    spans_exported = 0
    spans_dropped = 0


def encode_frame(pipeline, tuples, deliver) -> None:
    """A frame's record tuples encoded straight into the encoder's outbox (no record objects:
    :meth:`sipwatch.otlp_encode.SpanEncoder.add`, in C when built), ``deliver()`` called each
    time it holds DELIVER_MAX spans (or DELIVER_BYTES of them) and once more at the end if it
    holds DELIVER_MIN; a tuple that cannot be encoded is counted (failure, dropped), never fatal."""
    enc = pipeline.encoder
    i = 0
    while True:
        i, failed = enc.add(tuples, i, DELIVER_MAX, DELIVER_BYTES)
        if failed:
            pipeline._export_dropped += failed
            pipeline.failures += failed
        if i >= len(tuples):
            break
        deliver()
    if enc.held() >= DELIVER_MIN:
        deliver()


def quiet_collector() -> None:
    """What start-up built stays out of the cyclic collector's walks (``gc.freeze``), and it runs
    rarely: a frame's tuples are thousands of container allocations, and each 700 of them set
    off a collection at the default threshold. Nothing here makes cycles on the way (tuples,
    bytes, and encoder caches that live on), so little is lost by waiting."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)


def summary_log(cfg: dict, on_error):
    """The worker's writer of call summaries: the proxy's log settings, on the proxy's stdout
    (a duplicate of it, ``cfg["fd"]``). On a pipe or socket each write is whole lines of at most
    PIPE_BUF bytes, so the proxy's own lines never land inside one of them, nor they inside the
    proxy's. The writer is the proxy's kind (:func:`sipwatch.logs.stdout_writer`): never waits
    on a reader that stopped. A worker stuck in a write to a full pipe read no frames and
    delivered no span, without a drop counted; what waits now is bounded, and past the bound
    lines are dropped and counted (``log_dropped``, the proxy's ``sipwatch_log_lines_dropped_total``).
    A summary is reported written once its line is out, or dropped and counted; one still waiting
    when the worker dies comes back to the proxy, as before (only a line partly written when the
    writer had to give up is lost uncounted, should the worker die then)."""
    from .logs import JsonLog, WholeWrites, interleaves
    stream = WholeWrites(cfg["fd"])
    log = JsonLog(cfg["service_name"], stream=stream, mask_mode=cfg["mask_mode"], level=cfg["level"],
                  call_id_mask=cfg["call_id_mask"], on_error=on_error, background=True)
    log.atomic_lines = interleaves(stream)
    log.deferred = True  # a write per read of frames (and per UNTOLD_MAX lines), not per frame
    return log


def lift_to_normal(pid: int) -> bool:
    """SCHED_OTHER for process ``pid`` (0: this one), if the system lets this process do it."""
    try:
        os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
    except (OSError, AttributeError):
        return False
    return True


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:  # background work: the proxy's loop (and everything else) gets the CPU first
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        try:
            os.nice(WORKER_NICE)
        except OSError:
            pass
    from .otlp_encode import SpanEncoder
    from .tracing import SpanPipeline, make_exporter
    out = sys.stdout.buffer
    inp = sys.stdin.buffer.fileno()
    # frames are read into this one buffer (unread bytes: buf[start:end]) instead of a fresh bytes
    # object per read that is then appended: no allocation, page faults or copy per read
    buf = bytearray(READ_SIZE)
    start = end = 0
    pipeline = None
    log = None  # the proxy's log, for the call summaries it hands over (config "log")
    summaries_done = 0  # the last summary sequence number handed to the log (its line maybe held)
    written = [0]  # the last one whose line was written out and reported: what status says
    counters = _Counters()
    last_status = None
    last_sent = 0.0
    deadline = float("inf")

    def status(force: bool = False) -> None:
        nonlocal last_status, last_sent
        if pipeline is None:
            return
        pipeline._publish()
        st = {"exported": counters.spans_exported, "dropped": counters.spans_dropped,
              "failures": pipeline.failures, "file_failures": pipeline.file_failures,
              "file_failing": pipeline.file_failing, "file_error": pipeline.file_error,
              "summaries": written[0], "log_errors": log_errors[0],
              "log_dropped": log.dropped_lines if log is not None else 0,
              "taken": taken[0], "held": held()}
        now = time.monotonic()
        if st != last_status and (force or now - last_sent >= STATUS_EVERY):
            payload = marshal.dumps(st)
            try:
                out.write(_LEN.pack(len(payload)) + payload)
                out.flush()
            except OSError:
                pass
            last_status, last_sent = st, now

    def report_written(seq: int) -> None:
        """The held summary lines out, then the report that they are (never the other way).
        Lines the writer holds for the pipe are reported once the pipe took them (``marks``), or
        once the writer had to drop lines past its bound: then the waiting ones are dropped and
        counted too (``discard``), and reported, so the proxy does not keep every later summary
        for a reader that is gone. A reader that pauses within the bound loses nothing."""
        log.flush()
        handed[0] = seq
        w = log.writer
        if w is not None and getattr(w, "waiting", False):
            marks.append((w.handed_total, seq))
            settle()
            return
        marks.clear()
        written[0] = seq
        status(force=True)

    def settle() -> None:
        """Report the summaries whose lines the pipe has taken since (see ``report_written``)."""
        if not marks:
            return
        w = log.writer
        gone = w.waiting and w.dropped_lines > dropped_seen[0]
        if gone:  # the lines waiting are dropped, counted, not reported written while still there
            w.discard()
        dropped_seen[0] = w.dropped_lines
        out = w.taken_total
        seq = None
        while marks and (gone or not w.waiting or marks[0][0] <= out):
            seq = marks.popleft()[1]
        if seq is not None:
            written[0] = seq
            status(force=True)

    handed = [0]  # the last summary whose line went to the writer (out, waiting, or dropped and counted)
    marks: deque = deque()  # (the writer's handed_total once that line was in it, its sequence number)
    dropped_seen = [0]  # the writer's dropped lines when marks were last settled
    stall = WRITER_STALL

    log_errors = [0]  # summaries that could not be encoded as they are (the proxy counts them)
    taken = [0]  # record tuples read from the proxy (a dead worker's untaken ones are its drops)

    def log_error(component, exc) -> None:
        log_errors[0] += 1

    held_since = 0.0  # when the encoder's outbox (the next delivery) took its first span

    def held() -> int:
        return pipeline.encoder.held() if pipeline is not None else 0

    def deliver() -> None:
        """What the outbox holds as one OTLP request and one spans-file line."""
        enc = pipeline.encoder
        if time.monotonic() > deadline:
            pipeline._export_dropped += enc.take(False, False)[0]
        else:
            pipeline.deliver_batch(enc.held(), lambda want_request, want_line: enc.take(want_request, want_line)[1:])
        status()

    eof = False
    while not eof:
        wait = STATUS_EVERY
        if held():
            wait = max(0.0, min(wait, held_since + EXPORT_LINGER - time.monotonic()))
        writer = log.writer if log is not None else None
        wfd = -1
        hold_input = False
        poller = select.poll()  # (select.select refuses descriptors past 1023)
        if writer is not None and getattr(writer, "waiting", False):
            wfd = writer.fileno()  # lines wait for the pipe's room: wake for it too
            poller.register(wfd, select.POLLOUT)
            # a reader of stdout that keeps taking lines slows this down (frames wait; no line is
            # dropped); one that took nothing for WRITER_STALL seconds holds up no span: frames
            # are read again and the lines past the writer's bound are dropped, counted
            hold_input = writer.pending_bytes > WRITER_SOFT and time.monotonic() - writer.progress_at < stall
        if hold_input:
            wait = min(wait, stall)
        else:
            poller.register(inp, select.POLLIN)
        try:
            events = poller.poll(math.ceil(wait * 1000))
        except InterruptedError:
            events = []
        ready = room = False
        for fd, _ in events:
            ready = ready or fd == inp
            room = room or fd == wfd
        if room:
            writer.pump()
        if ready:
            if len(buf) - end < READ_SIZE:
                if start:  # the unread bytes to the front
                    buf[:end - start] = buf[start:end]
                    start, end = 0, end - start
                if len(buf) - end < READ_SIZE:  # a frame larger than the buffer: grow it
                    buf.extend(bytes(end + READ_SIZE - len(buf)))
            with memoryview(buf) as view:
                got = os.readv(inp, [view[end:]])
            if not got:
                eof = True
                if deadline == float("inf"):  # the proxy went away without a stop: do not linger
                    deadline = 0.0
            end += got
        pos = start
        while end - pos >= 5:
            (n,) = _LEN.unpack_from(buf, pos)
            if n < 1 or n > MAX_FRAME:
                eof = True  # not our protocol: stop
                break
            if end - pos - 4 < n:
                break
            kind = buf[pos + 4]
            with memoryview(buf) as view:
                payload = view[pos + 5:pos + 4 + n]
                if kind in _TUPLE_FRAMES:
                    kind, payload = _read_frame(kind, payload)
                else:
                    payload = bytes(payload)
            pos += 4 + n
            if kind == F_CONFIG:
                if pipeline is not None:  # only the first frame configures (it is unpickled)
                    eof = True
                    break
                cfg = pickle.loads(payload)
                enc = SpanEncoder(cfg["resource"], cfg["version"], cfg["mask_mode"], cfg["call_id_mask"],
                                  cfg["schema_url"])
                exporter = make_exporter(cfg["endpoint"], cfg["protocol"], cfg["env"]) if cfg["endpoint"] else None
                pipeline = SpanPipeline(counters, enc, exporter, cfg["spans_file"], threaded=False)
                if cfg.get("log") is not None:
                    log = summary_log(cfg["log"], log_error)
                    stall = float(cfg["log"].get("stall", WRITER_STALL))
                quiet_collector()
            elif pipeline is None:
                continue
            elif kind == F_RECORDS:
                tuples = payload
                if not isinstance(tuples, list):
                    pipeline.failures += 1  # not a frame of records: counted, the next one may be
                    continue
                taken[0] += len(tuples)
                if not pipeline._backend_or_file():
                    pipeline._export_dropped += len(tuples)  # backend in back-off, no file: shed now
                    continue
                if not held():
                    held_since = time.monotonic()
                encode_frame(pipeline, tuples, deliver)
            elif kind == F_SUMMARIES:
                if not (isinstance(payload, tuple) and len(payload) == 2 and isinstance(payload[0], int)
                        and isinstance(payload[1], list)):
                    # its lines are lost unless the proxy writes them, and the next frame's report
                    # would say they were written: stop here, so that all from here come back
                    eof = True
                    break
                if log is not None:
                    log.summaries_of(payload[1])  # held (deferred) for the write before the report
                    summaries_done = payload[0]
                    if summaries_done - handed[0] >= UNTOLD_MAX:
                        report_written(summaries_done)
            elif kind == F_REOPEN:
                if held():  # what came before the re-open goes to the old file
                    deliver()
                pipeline._reopen_file()
            elif kind == F_STOP:
                deadline = time.monotonic() + marshal.loads(payload)
                lift_to_normal(0)  # (the proxy did it already, unless this started after)
        start = pos
        if summaries_done != handed[0]:  # at once: what the proxy would write again if this died
            report_written(summaries_done)
        elif marks:
            settle()
        if start == end:
            start = end = 0
            if len(buf) > 4 * READ_SIZE:  # a huge frame went through: give its room back
                buf = bytearray(READ_SIZE)
        if held() and (eof or deadline != float("inf") or time.monotonic() - held_since >= EXPORT_LINGER):
            deliver()
        status()
    if held():
        deliver()
    if pipeline is not None:
        pipeline.close()
    if log is not None:  # what waits for the pipe, within the stop's deadline
        log.close(max(0.0, min(2.0, deadline - time.monotonic())) if deadline != float("inf") else 2.0)
        w = log.writer
        if not (w is not None and getattr(w, "waiting", False)):
            written[0] = handed[0]
    status(force=True)


if __name__ == "__main__":
    main()
