"""Transaction and call state with injected time: RTT, retransmissions, timeouts, call outcomes.

Shared by the inline proxy (:mod:`sipwatch.core`) and passive capture (:mod:`sipwatch.observer`),
so both compute figures with the same code. Nothing here reads a clock or touches a socket.

* A transaction is keyed by whatever identifies one hop's request (the proxy uses its own
  outgoing branch and the CSeq method). RTT = first copy forwarded → first response's arrival.
* Timers as RFC 3261 states them for a proxy's client transactions (§16.6 step 11, §16.8,
  §17.1): every request runs Timer B/F (``timer_b``, 64*T1) from its first copy. An INVITE that
  got a provisional response (any 1xx) leaves Timer B and runs Timer C (``timer_c``, > 3 min),
  restarted by each further provisional (a UAS re-sends 180 every minute to keep it alive,
  §13.3.1.1). Timer C runs from the first 1xx rather than from the forwarding (§16.6 starts it
  there, and only 101-199 restart it), so an INVITE answered by 100 alone times out one RTT
  later than the RFC's proxy would; in exchange every Timer C deadline is "now + timer_c" and
  its queue stays sorted (but for times that go backwards, below). A non-INVITE keeps Timer F whatever 1xx it gets. A transaction with no final
  response when its timer fires is a timeout.
* A call is an INVITE dialog, keyed by Call-ID (:meth:`Tracker.lookup_call` says which entry a
  request belongs to: a REGISTER/OPTIONS entry, or an INVITE dialog that ended, does not swallow
  a new INVITE with the same Call-ID). It is counted once, when the initial INVITE gets its final
  response or times out, and finishes at the final response to BYE (answered calls), at the
  final response (failed calls), at timeout, or after ``max_call_duration``; ``Call.ended_by``
  says which.
* State that ended leaves: a transaction lingers ``timer_b`` after its final response (late
  retransmissions still match, like Timer J/K/D), a call ``timer_b`` after it finished (late ACK,
  BYE retransmissions), then both are dropped. Each kind of timer has one constant delay and one
  :class:`DeadlineQueue`, kept in deadline order by adding at the back; an object waits in one
  queue at a time and leaves it in O(1) when it is rescheduled, moves on or leaves the table, so
  expiry costs O(expired) and nothing stale is left behind. (Timestamps that go backwards make
  an entry expire at most that much late: a capture's, and the proxy's for a response, which
  carries its arrival and may have waited in the socket behind later-read work.)
* B2BUA legs: a new dialog whose correlation header (sipwatch.correlation) names an open call
  it may join (:meth:`Tracker.may_join`) becomes a further leg of it (:meth:`Tracker.join_leg`):
  the legs share a :class:`LegGroup` of Call-IDs. Session-ID / icid keys live in
  ``Tracker.corr_index`` (capped at ``max_calls``) and leave with their call.
* Both tables are capped. When one is full, the entry that makes room is one that already ended
  (the oldest to end first); only when none has ended, the least recently active live entry is
  evicted (counted, and a live call's record is still emitted with ``ended_by="evicted"``).

Memory (tracemalloc, CPython 3.11, :func:`memory_per_call`, ``python -m sipwatch.state``): about
3.3 KB per answered call held open (INVITE/100/200/ACK, Call-ID and URIs of 30-50 bytes; 3.7 KB
with the mypyc build), all of it (the Call, its transaction records, their table entries) leaving
``timer_b`` after the call ends. (With the timers in OrderedDicts 3.4 and 3.9 KB; with deques of
timer entries before that, 3.9 and 4.5 KB.)
In the proxy a finished call keeps none of its transactions once its record is consumed (see
``Call.holders``): the ones late retransmissions can match linger in the transaction table,
without their response events once their spans have them (``handoff.forget_events``).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Final, Generic, TypeVar

from .correlation import HEADER_NAMES as CORRELATION_HEADERS, KINDS as CORRELATION_KINDS, MALFORMED, XCID, key_of
from .stats import (
    ANSWERED, BYE, CANCEL, CANCELLED, CORR_JOINED, CORR_MALFORMED, CORR_REFUSED, CORR_UNMATCHED, FROM_GATEWAY, INVITE,
    TIMEOUT, Stats, outcome_of,
)

MAX_TX_PER_CALL = 64
# bytes of a request's method kept in its transaction's record (the summary, spans, analyze): a
# method is any token, and 64 KB of one was carried into the call's summary and every span
MAX_METHOD_KEPT: Final = 32
MAX_LEGS = 16  # legs joined into one group; more start traces of their own (counted refused)
# a leg group keeps every leg's Call-ID after the leg has left the table: only this long (the
# correlation keys' own bound) may a Call-ID be to join one or to start one
MAX_LEG_CALL_ID = 256
MAX_FORK_TAGS = 16  # To-tags of 2xx answers remembered per INVITE (more are each counted a fork)
# The bytes of the values a call keeps (Call-ID, From, To, Request-URI, correlation keys) that the
# call table may hold, per call of max_calls: a real call keeps ~200-400 of them, while a datagram
# may carry 60 KB of Call-ID or From, so a count alone bounded the table at ~6 GB (100,000 calls
# of 60 KB). Past this, the table makes room as at max_calls (oldest first, counted evicted).
# The transaction table likewise, each transaction charged its call's bytes: a call that left the
# call table stays alive as long as one of its transactions is held.
CALL_BYTES_EACH = 1024
_NEVER = float("inf")  # the deadline of an empty timer queue
# Transaction.timer / Call.timer: the timer queue it waits in (Tracker._txq / Tracker._callq)
TX_B: Final = 0  # pending, Timer B/F
TX_C: Final = 1  # pending INVITE after a 1xx, Timer C
TX_LINGER: Final = 2  # completed, lingering
CALL_SHORT: Final = 0  # non-dialog entries, auth challenges
CALL_LONG: Final = 1  # INVITE dialogs, max_call_duration
CALL_LINGER: Final = 2  # finished calls, lingering
# Call.holders: who still needs a call's transactions (bits)
TABLE: Final = 1
RECORD: Final = 2
# due timers the proxy handles per expire() call (Tracker.expire_budget): ~0.8 µs each live (their
# objects are cold in the cache), so at 4000 calls/s (~700 due every 20-ms tick) one call held the
# loop ~0.5 ms; the rest follow in later calls (the proxy's next callback), in the same order
EXPIRE_STEP: Final = 128

# Call.ended_by values
ENDED_BY = ("bye", "final", "timeout", "cancel", "max_duration", "evicted", "replaced", "eof",
            "shutdown")


class Timed:
    """What waits on a timer: a :class:`Transaction` or a :class:`Call`. The links of the one
    :class:`DeadlineQueue` it waits in live in the object itself, so joining, leaving or moving
    to the back of a queue is a few pointer stores: no hash of the object, no entry or node
    allocated, no table to grow. (An OrderedDict keyed by the object, which this replaced, was
    ~4 % of the proxy's samples at 4000 calls/s: each insert hashed into a table of ~100k
    entries, cold, and allocated its node; perf.) While queued, an object and its neighbours
    refer to each other; leaving a queue drops both links, so what left every queue is freed by
    reference counting."""

    __slots__ = ("q_prev", "q_next", "deadline")

    def __init__(self, deadline: float) -> None:
        self.q_prev: Timed | None = None
        self.q_next: Timed | None = None
        self.deadline = deadline


class Transaction(Timed):
    __slots__ = (
        "key", "midx", "method", "cseq", "call", "t_sent", "t_first", "t_final", "status",
        "events", "retrans", "span_id", "trace_id", "parent_span_id", "sampled",
        "direction", "peer", "initial_invite", "timed_out", "tags", "timer", "reply", "via_below",
        "nbytes",
    )

    def __init__(self, key, midx, method, cseq, call, now, span_id, trace_id, parent_span_id,
                 sampled, deadline, direction, peer, initial_invite):
        self.key = key
        self.midx = midx
        self.method = method if len(method) <= MAX_METHOD_KEPT else method[:MAX_METHOD_KEPT]
        self.cseq = cseq
        self.call = call
        self.t_sent = now
        self.t_first = None
        self.t_final = None
        self.status = 0
        # (status, time) of every distinct response: a tuple, grown by one per response (an ACK's
        # stays the shared empty one; at the state caps a list's spare room cost ~120 B a call).
        # Read until the final response (retransmission or new status) and by the span record
        self.events: tuple[tuple[int, float], ...] = ()
        self.retrans = 0
        self.span_id = span_id
        self.trace_id = trace_id
        self.parent_span_id = parent_span_id
        self.sampled = sampled
        self.q_prev = None  # (Timed: not waiting on a timer yet)
        self.q_next = None
        self.deadline = deadline
        self.direction = direction
        self.peer = peer
        self.initial_invite = initial_invite
        self.timed_out = False
        # hashes of the To-tags of the 2xx answers to an INVITE (forks), once answered: hashes, so
        # that what a transaction holds does not follow the size of the tags a peer sends
        self.tags: list[int] | None = None
        # which of its tracker's timer queues it waits in (TX_B/TX_C/TX_LINGER), -1: none (an index,
        # not the queue: the queue holds the transaction, and a back-reference would be a cycle)
        self.timer = -1
        # set by the proxy: where responses go, and the Via value it wrote below its own (a
        # response that carries that very value back needs no MAC check: see ProxyCore._response)
        self.reply = None
        self.via_below = None
        self.nbytes = 0  # what it adds to Tracker.tx_bytes while in the table (its call's values)

    @property
    def rtt_ms(self) -> float | None:
        return None if self.t_first is None else (self.t_first - self.t_sent) * 1000.0


class Call(Timed):
    __slots__ = (
        "call_id", "trace_id", "span_id", "parent_span_id", "sampled", "t_start", "t_setup",
        "t_answer", "t_final", "t_end", "status", "outcome", "cancelled", "finished",
        "transactions", "retrans", "from_uri", "to_uri", "ruri", "is_call", "rtp",
        "ended_by", "invite_cseq", "timer", "holders", "group", "leg", "joined_by", "gap_span_id",
        "gap_start", "gap_parent", "corr_keys", "corr_shared", "trace_hex", "nbytes",
    )

    def __init__(self, call_id, trace_id, span_id, parent_span_id, sampled, now, deadline,
                 is_call, from_uri=b"", to_uri=b"", ruri=b""):
        self.call_id = call_id
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.sampled = sampled
        self.t_start = now
        self.t_setup = None  # first 18x or final to the initial INVITE
        self.t_answer = None  # 2xx to the initial INVITE
        self.t_final = None  # final response to the initial INVITE
        self.t_end = None
        self.status = 0
        self.outcome = -1
        self.cancelled = False
        self.finished = False
        self.transactions: list[Transaction] = []
        self.retrans = 0
        self.from_uri = from_uri
        self.to_uri = to_uri
        self.ruri = ruri
        self.q_prev = None  # (Timed: not waiting on a timer yet)
        self.q_next = None
        self.deadline = deadline
        self.is_call = is_call  # False: a non-dialog request's own small trace
        self.rtp = None  # passive capture: the call's RTP figures for its span, once known
        self.ended_by: str | None = None  # one of ENDED_BY once finished
        self.invite_cseq = None  # CSeq number of the (latest) initial INVITE
        self.timer = -1  # which of its tracker's timer queues it waits in (CALL_SHORT/...), -1: none
        # Who still needs ``transactions`` (each transaction points back at its call, a cycle),
        # one bit each, with ``Tracker.release`` on: TABLE, the tracker (until an INVITE dialog
        # finishes, or the entry leaves its table), and for INVITE dialogs RECORD, the consumer of
        # the call record (the call summary). The last to let go empties the list, so a call is
        # freed by reference counting, and a finished call lingering in the table holds none of
        # its transactions once its record is consumed. 0: kept (capture analysis reads them at
        # the end).
        self.holders = 0
        # B2BUA legs (see LegGroup): the group this call is a leg of (None: a call on its own), its
        # 1-based place in it, the header that joined it, and for a joined leg the span of the
        # B2BUA's own latency (the named leg's INVITE at ``gap_start`` until this leg's INVITE)
        self.group: LegGroup | None = None
        self.leg = 0
        self.joined_by: str | None = None
        self.gap_span_id = 0
        self.gap_start = 0.0
        self.gap_parent = 0  # the named leg's call span: parent of this leg's call and B2BUA spans
        self.corr_keys: list[bytes] | None = None  # correlation index keys that name this call
        # of those, the ones another dialog outside its legs carried too: they join nothing
        self.corr_shared: list[bytes] | None = None
        # (trace id, the trace header line up to the span id and its dash) for the core's stamping
        self.trace_hex: tuple[int, bytes] | None = None
        self.nbytes = 0  # what it adds to Tracker.call_bytes while in the table

    def let_go(self, holder: int = RECORD) -> None:
        """``holder`` (RECORD: the consumer of the call record) is done with the call's
        transactions (see ``holders``); again, nothing happens."""
        h = self.holders
        if h & holder:
            h &= ~holder
            self.holders = h
            if h == 0:
                self.transactions = []


class LegGroup:
    """The legs of one call through a B2BUA: the first leg's Call-ID and every leg's, in the order
    they joined (at most ``MAX_LEGS``). Shared by the legs' Call objects; holds only bytes, so it
    adds no reference cycle."""

    __slots__ = ("call_ids",)

    def __init__(self, first: bytes):
        self.call_ids: list[bytes] = [first]


_T = TypeVar("_T", bound=Timed)


class DeadlineQueue(Generic[_T]):
    """The objects waiting on one kind of timer, the next to expire first: a doubly linked
    list through the objects (:class:`Timed`), ``deadline`` each.

    Each kind has one constant delay, so adding at the back keeps the queue in deadline order.
    An object is in one queue at most once and leaves it in O(1) when it is rescheduled, moves to
    another timer or leaves the tracker's table: nothing stale stays behind to be skipped at
    expiry or swept. (Deques of ``(deadline, object, token)`` entries, which came first, left 6
    of an answered call's 9 entries stale, and their sweep looked at each about twice: ~2.5 % of
    the sidecar's CPU at 4000 calls/s, perf.) ``discard`` and ``move_back`` take an object of
    this queue (the tracker knows which by ``timer``) or, for ``discard``, one in no queue."""

    __slots__ = ("head", "tail", "n", "first")

    def __init__(self) -> None:
        self.head: Timed | None = None
        self.tail: Timed | None = None
        self.n = 0
        # never later than the head's deadline (inf when empty; exact after a look at the head
        # found it not due): a tracker sees that nothing is due from one float compare per queue
        self.first = _NEVER

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.head is not None

    def add(self, obj: _T, deadline: float) -> None:
        """``obj``, in no queue, waits until ``deadline``, at the back."""
        o: Timed = obj
        o.deadline = deadline
        tail = self.tail
        o.q_prev = tail
        o.q_next = None
        if tail is None:
            self.head = o
            self.first = deadline
        else:
            tail.q_next = o
            if deadline < self.first:
                self.first = deadline
        self.tail = o
        self.n += 1

    def _unlink(self, o: Timed) -> None:
        prev, nxt = o.q_prev, o.q_next
        if prev is None:
            self.head = nxt
        else:
            prev.q_next = nxt
        if nxt is None:
            self.tail = prev
        else:
            nxt.q_prev = prev
        o.q_prev = None
        o.q_next = None
        self.n -= 1

    def move_back(self, obj: _T, deadline: float) -> None:
        """``obj``, queued here, waits until ``deadline`` instead, at the back (``first`` stays a
        lower bound: the head's deadline can only have grown)."""
        o: Timed = obj
        if self.tail is not o:
            self._unlink(o)
            self.add(obj, deadline)
        else:
            o.deadline = deadline

    def discard(self, obj: _T) -> None:
        """``obj`` no longer waits here (queued here, or in no queue: then nothing happens;
        ``first`` stays a lower bound)."""
        o: Timed = obj
        if o.q_prev is not None or self.head is o:
            self._unlink(o)

    def pop_due(self, now: float) -> _T | None:
        """The head, taken out, if its deadline is ``now`` or earlier; else None."""
        o = self.head
        if o is None:
            self.first = _NEVER
            return None
        if o.deadline <= now:
            self._unlink(o)
            return o  # type: ignore[return-value]  # (only _T are added)
        self.first = o.deadline
        return None

    def peek(self) -> tuple[_T, float] | None:
        """(the head, its deadline), or None when empty."""
        o = self.head
        return None if o is None else (o, o.deadline)  # type: ignore[return-value]

    def pop_head(self) -> _T | None:
        """The head, taken out whatever its deadline (to make room), or None when empty."""
        o = self.head
        if o is None:
            return None
        self._unlink(o)
        return o  # type: ignore[return-value]


def _move(queues: list[DeadlineQueue], obj: Timed, old: int, which: int, deadline: float) -> None:
    """``obj`` leaves timer queue ``queues[old]`` for ``queues[which]`` (-1: none), due at
    ``deadline``; staying in the same queue moves it to the back."""
    if old == which:
        if which >= 0:
            queues[which].move_back(obj, deadline)
        return
    if old >= 0:
        queues[old].discard(obj)
    if which >= 0:
        queues[which].add(obj, deadline)


class Tracker:
    """In-flight transactions and calls, fed by request/response events with timestamps.

    Finished calls and completed transactions are appended to ``finished`` (bounded), which the
    exporters drain off the hot path: ``("tx", Transaction)`` and ``("call", Call)``.
    """

    def __init__(self, stats: Stats, timer_b: float = 32.0, max_transactions: int = 200_000,
                 max_calls: int = 100_000, max_call_duration: float = 4 * 3600.0,
                 finished_max: int = 100_000, *, timer_c: float = 180.0):
        self.stats = stats
        self.timer_b = timer_b
        self.timer_c = timer_c
        self.max_transactions = max_transactions
        self.max_tx_bytes = max_transactions * CALL_BYTES_EACH
        self.tx_bytes = 0  # the nbytes of the transactions in the table
        self.max_calls = max_calls
        self.max_call_bytes = max_calls * CALL_BYTES_EACH
        self.call_bytes = 0  # the nbytes of the calls in the table
        self.max_call_duration = max_call_duration
        self.transactions: dict[tuple, Transaction] = {}  # (branch, method); the observer keys per hop
        # insertion order = least recently active first (moved to the end on activity)
        self.calls: OrderedDict[bytes, Call] = OrderedDict()
        # the objects waiting on each kind of timer, each kind with a constant delay
        self._tx_b: DeadlineQueue[Transaction] = DeadlineQueue()  # pending, Timer B/F: t_sent + timer_b
        self._tx_c: DeadlineQueue[Transaction] = DeadlineQueue()  # pending INVITE after a 1xx, Timer C: last 1xx + timer_c
        self._tx_linger: DeadlineQueue[Transaction] = DeadlineQueue()  # completed: t_final + timer_b
        self._call_short: DeadlineQueue[Call] = DeadlineQueue()  # non-call entries, auth challenges: + timer_b
        self._call_long: DeadlineQueue[Call] = DeadlineQueue()  # INVITE dialogs: start/answer + max_call_duration
        self._call_linger: DeadlineQueue[Call] = DeadlineQueue()  # finished calls: t_end + timer_b
        self._txq = [self._tx_b, self._tx_c, self._tx_linger]  # by TX_B, TX_C, TX_LINGER
        self._callq = [self._call_short, self._call_long, self._call_linger]  # by CALL_SHORT, ...
        self.finished: deque = deque()
        self.finished_max = finished_max
        # the proxy: a call's transactions are let go once it left the table and its record was
        # consumed (Call.holders), so nothing here needs the cyclic garbage collector
        self.release = False
        # B2BUA correlation: Session-ID pair / icid keys -> the call whose initial INVITE carried
        # them first; at most one key per kind per call, at most max_calls keys, each removed when
        # its call leaves the table (X-CID needs no index: it names a Call-ID of ``calls``)
        self.corr_index: dict[bytes, Call] = {}
        # due entries handled per expire() call, 0 for all of them (capture analysis, tests);
        # expire_left: the last call stopped at that bound with entries still due
        self.expire_budget = 0
        self.expire_left = False

    def _schedule_tx(self, tx: Transaction, which: int, deadline: float) -> None:
        """``tx`` waits on timer ``which`` (TX_B, ...) until ``deadline``, and no longer where it
        waited before."""
        _move(self._txq, tx, tx.timer, which, deadline)
        tx.timer = which

    def _schedule_call(self, call: Call, which: int, deadline: float) -> None:
        """``call`` waits on timer ``which`` (CALL_SHORT, ...) until ``deadline``, and no longer
        where it waited before."""
        _move(self._callq, call, call.timer, which, deadline)
        call.timer = which

    # -- calls -------------------------------------------------------------------------
    def find_call(self, call_id: bytes) -> Call | None:
        return self.calls.get(call_id)

    def lookup_call(self, call_id: bytes, initial_invite: bool, cseq: int | None = None) -> Call | None:
        """The call entry a request with this Call-ID belongs to, or None: then the caller
        creates one with :meth:`new_call` (which replaces the old entry cleanly).

        An initial INVITE (no To-tag) does not join an entry of a non-dialog request
        (REGISTER/OPTIONS with the same Call-ID) nor an INVITE dialog that has ended; with
        ``cseq`` given, the same initial INVITE seen again (a retransmission, or the next hop
        of it in a capture) still finds its call, and a new initial INVITE with another CSeq
        does not join a call that was rejected (an auth retry is the next call) nor one that was
        answered and has ended. An answered call still open is not replaced: any party that saw
        its Call-ID could otherwise end its record ("replaced") and have its later requests
        recorded in a trace of the sender's choosing; the INVITE is a transaction of that call,
        as a re-INVITE would be. A non-dialog request
        (``cseq`` given) does not join an ended non-dialog entry holding no request with its
        CSeq number (a re-REGISTER with the same Call-ID gets its own entry).
        """
        call = self.calls.get(call_id)
        if call is None:
            return None
        if initial_invite:
            if not call.is_call:
                return None
            if cseq is not None and call.invite_cseq == cseq:
                return call
            if call.finished or (cseq is not None and call.outcome >= 0 and call.outcome != ANSWERED):
                return None
            return call
        if cseq is not None and call.finished and not call.is_call:
            for tx in call.transactions:
                if tx.cseq == cseq:
                    return call
            return None
        return call

    def new_call(self, call_id, trace_id, span_id, parent_span_id, sampled, now, is_call,
                 from_uri=b"", to_uri=b"", ruri=b"") -> Call:
        calls = self.calls
        old = calls.pop(call_id, None)
        if old is not None:
            if not old.finished:
                # its record is emitted once, here; outcome counters are left as they are
                self._finish_call(old, now, "replaced")
            self._left(old)
        nbytes = len(call_id) + len(from_uri) + len(to_uri) + len(ruri)
        while calls and (len(calls) >= self.max_calls or self.call_bytes + nbytes > self.max_call_bytes):
            self._evict_call(now)  # (each takes one call out of the table)
        if is_call:
            deadline = now + self.max_call_duration
            call = Call(call_id, trace_id, span_id, parent_span_id, sampled, now, deadline,
                        is_call, from_uri, to_uri, ruri)
            self._schedule_call(call, CALL_LONG, deadline)
        else:
            deadline = now + self.timer_b
            call = Call(call_id, trace_id, span_id, parent_span_id, sampled, now, deadline,
                        is_call, from_uri, to_uri, ruri)
            self._schedule_call(call, CALL_SHORT, deadline)
        if self.release:
            call.holders = TABLE | RECORD if is_call else TABLE
        calls[call_id] = call
        call.nbytes = nbytes
        self.call_bytes += nbytes
        return call

    def _evict_call(self, now: float) -> None:
        """Make room: a finished call whose linger is not over (oldest first), else the least
        recently active live call."""
        calls, q = self.calls, self._call_linger
        while q:
            call = q.pop_head()
            if call is None:
                break
            call.timer = -1
            if calls.get(call.call_id) is call:
                del calls[call.call_id]
                self._left(call)
                return
        if not calls:
            return
        _, call = calls.popitem(last=False)
        self.stats.evicted_calls += 1
        self._finish_call(call, now, "evicted")
        self._left(call)

    # -- B2BUA legs ----------------------------------------------------------------------
    def correlate(self, kinds: tuple[int, ...], msg, names: list[bytes], call_id: bytes, src: tuple[str, int],
                  keys: list[bytes]) -> tuple[Call | None, str]:
        """The call a new dialog's correlation headers (``kinds``, sipwatch.correlation) name and
        may join, and by which header (the first configured one that names one wins); ``keys``
        gets the Session-ID / icid keys to index for the new call (:meth:`index_call`). Each
        header present is counted by result in ``stats.correlation``. Only ``in names`` tests
        for a message without them."""
        counts = self.stats.correlation
        named: Call | None = None
        by = ""
        long_id = len(call_id) > MAX_LEG_CALL_ID
        for kind in kinds:
            hname = CORRELATION_HEADERS[kind]
            if hname not in names:
                continue
            key = key_of(kind, msg.value_at(names.index(hname)))
            if key == MALFORMED:
                counts[kind * 4 + CORR_MALFORMED] += 1
                continue
            if kind != XCID:
                keys.append(key)
            found = self.correlated_call(key, kind == XCID)
            if found is None or (kind == XCID and key == call_id):
                counts[kind * 4 + CORR_UNMATCHED] += 1
            elif found.corr_shared is not None and key in found.corr_shared:
                counts[kind * 4 + CORR_REFUSED] += 1
            elif named is not None:  # (an earlier header joined: this one agrees with it or not)
                counts[kind * 4 + (CORR_JOINED if found is named else CORR_REFUSED)] += 1
            elif long_id or len(found.call_id) > MAX_LEG_CALL_ID or not self.may_join(found, src):
                counts[kind * 4 + CORR_REFUSED] += 1
            else:
                counts[kind * 4 + CORR_JOINED] += 1
                named, by = found, CORRELATION_KINDS[kind]
        return named, by

    def correlated_call(self, key: bytes, by_call_id: bool) -> Call | None:
        """The call a correlation key names: a Call-ID (X-CID) in the call table, else an index key."""
        if by_call_id:
            return self.calls.get(key)
        return self.corr_index.get(key)

    def may_join(self, named: Call, src: tuple[str, int]) -> bool:
        """Whether a new leg sent from ``src`` may join ``named``: an INVITE dialog still open,
        whose group has room, whose initial INVITE was sent *to* that party (a B2BUA places leg B
        from where it received leg A; anyone else naming the call starts a trace of its own).
        The proxy knows the address it sent to and compares address and port; a capture compares
        the host (a B2BUA over TCP sends from another port than it listens on)."""
        if not named.is_call or named.finished:
            return False
        group = named.group
        if group is not None and len(group.call_ids) >= MAX_LEGS:
            return False
        for tx in named.transactions:
            if tx.initial_invite:
                peer = tx.peer
                # the proxy records the next hop (ip, port); a capture (sender, receiver[, transport])
                if isinstance(peer[0], tuple):
                    if peer[1][0] == src[0]:
                        return True
                elif peer[0] == src[0] and peer[1] == src[1]:
                    return True
        return False

    def join_leg(self, call: Call, named: Call, by: str, gap_span_id: int) -> None:
        """``call`` (a new dialog) is a further leg of ``named``'s call."""
        group = named.group
        if group is None:
            group = LegGroup(named.call_id)
            named.group = group
            named.leg = 1
        group.call_ids.append(call.call_id)
        call.group = group
        call.leg = len(group.call_ids)
        call.joined_by = by
        call.gap_span_id = gap_span_id
        call.gap_start = named.t_start
        call.gap_parent = named.span_id

    def index_call(self, call: Call, key: bytes) -> None:
        """Remember that ``call``'s initial INVITE carried ``key`` (the first call to carry a key
        keeps it; a full index takes no more). Call it after :meth:`join_leg`: a new dialog that
        carries a key held by a call it is not a leg of makes that key name nobody from then on
        (``corr_shared``). Session-ID and icid values are the endpoints' own, seen by every
        party to the call: one that passed the key on to a call of its own would otherwise have
        the B2BUA's next leg of that call join the first one (its source is the B2BUA's)."""
        index = self.corr_index
        holder = index.get(key)
        if holder is not None:
            if holder is not call and (holder.group is None or holder.group is not call.group):
                shared = holder.corr_shared
                if shared is None:
                    holder.corr_shared = [key]
                elif key not in shared:
                    shared.append(key)
            return
        if len(index) >= self.max_calls:
            return
        index[key] = call
        if self.calls.get(call.call_id) is call:
            call.nbytes += len(key)
            self.call_bytes += len(key)
        if call.corr_keys is None:
            call.corr_keys = [key]
        else:
            call.corr_keys.append(key)

    # -- transactions ------------------------------------------------------------------
    def request(self, key, midx, method, cseq, call: Call, now, span_id, parent_span_id,
                direction, peer, initial_invite) -> Transaction:
        """Record the first copy of a forwarded request (look it up first for retransmissions)."""
        deadline = now + self.timer_b
        tx = Transaction(key, midx, method, cseq, call, now, span_id, call.trace_id,
                         parent_span_id, call.sampled, deadline, direction, peer, initial_invite)
        txs = self.transactions
        if len(txs) >= self.max_transactions and key not in txs:
            self._evict_tx()
        nbytes = call.nbytes
        while txs and self.tx_bytes + nbytes > self.max_tx_bytes and self._evict_tx():
            pass
        old = txs.setdefault(key, tx)  # (one lookup when the key is new, as it nearly always is)
        if old is not tx:  # a request reusing a branch: the old one leaves with its timer
            self._unschedule_tx(old)
            self._drop_tx(old)
            txs[key] = tx
        tx.nbytes = nbytes
        self.tx_bytes += nbytes
        tx.timer = TX_B
        self._tx_b.add(tx, deadline)
        self._add_to_call(call, tx)
        if midx == CANCEL:
            call.cancelled = True
        elif initial_invite:
            if call.outcome < 0 and call.status and cseq != call.invite_cseq and call.is_call \
                    and not call.finished:
                # the retry of a challenged INVITE (401/407, then credentials): the call is
                # decided by this one again, not by the challenge's Timer B (a retry that rang
                # past it was counted as rejected with the challenge's status, its 200 ignored)
                call.status = 0
                call.t_final = None
                if self.calls.get(call.call_id) is call:
                    self._schedule_call(call, CALL_LONG, now + self.max_call_duration)
            call.invite_cseq = cseq
        if not call.is_call and not call.finished and call.deadline != deadline:
            # a non-dialog entry lives as long as its newest request's Timer F
            self._schedule_call(call, CALL_SHORT, deadline)
        calls, cid = self.calls, call.call_id
        if calls.get(cid) is call:
            calls.move_to_end(cid)  # activity: requests (responses follow their request)
        return tx

    def _add_to_call(self, call: Call, tx: Transaction) -> None:
        """``tx`` joins its call's list (up to MAX_TX_PER_CALL), unless nobody holds that list any
        more (``Call.holders``): there it would only be a cycle nobody reads."""
        if len(call.transactions) < MAX_TX_PER_CALL and (call.holders or not self.release):
            call.transactions.append(tx)

    def retransmission(self, tx: Transaction) -> None:
        tx.retrans += 1
        tx.call.retrans += 1
        self.stats.request_retransmissions += 1

    def ack(self, midx, method, cseq, call: Call, now, span_id, direction, peer) -> Transaction:
        """ACK has no response: a zero-length transaction recorded as complete at once."""
        parent = call.span_id if call.is_call else call.parent_span_id
        tx = Transaction(None, midx, method, cseq, call, now, span_id, call.trace_id,
                         parent, call.sampled, now, direction, peer, False)
        tx.t_final = now
        self._add_to_call(call, tx)
        calls, cid = self.calls, call.call_id
        if calls.get(cid) is call:
            calls.move_to_end(cid)
        self._emit("tx", tx)
        return tx

    def _drop_tx(self, tx: Transaction) -> bool:
        """``tx`` leaves the table with its bytes, if it is the one held under its key (False
        when not: it left before)."""
        txs = self.transactions
        if txs.get(tx.key) is not tx:
            return False
        del txs[tx.key]
        self.tx_bytes -= tx.nbytes
        tx.nbytes = 0
        return True

    def _evict_tx(self) -> bool:
        """Make room: a completed transaction still lingering (oldest first), else the pending
        one least recently active (oldest request under Timer B, or oldest 1xx under Timer C).
        False when no queue held one."""
        tx = self._tx_linger.pop_head()
        if tx is None:
            b, c = self._tx_b.peek(), self._tx_c.peek()
            if b is not None and (c is None or b[1] - self.timer_b <= c[1] - self.timer_c):
                tx = self._tx_b.pop_head()
            else:
                tx = self._tx_c.pop_head()
            if tx is None:
                return False
            self.stats.evicted_transactions += 1
        tx.timer = -1
        self._drop_tx(tx)
        return True

    def _unschedule_tx(self, tx: Transaction) -> None:
        _move(self._txq, tx, tx.timer, -1, 0.0)
        tx.timer = -1

    def response(self, key, status: int, now: float, to_tag: bytes | None = None) -> Transaction | None:
        """Record a response. Returns its transaction (None if unknown).

        ``to_tag``: the response's To-tag (needed for 2xx to INVITE only): a 2xx with another
        To-tag than the first 2xx is a fork (``stats.forks``), not a retransmission.
        """
        tx = self.transactions.get(key)
        if tx is None:
            return None
        return self.response_to(tx, status, now, to_tag)

    def response_to(self, tx: Transaction, status: int, now: float, to_tag: bytes | None = None) -> Transaction:
        """:meth:`response` for a transaction the caller already looked up by its key."""
        stats = self.stats
        if now < tx.t_sent:  # never before its request: a capture's merged clocks, a wall-clock step
            now = tx.t_sent  # under the proxy's arrival stamps (no negative RTT, setup, duration)
        if tx.t_first is None:
            tx.t_first = now
            if tx.direction == FROM_GATEWAY:  # (sent to sip-signaling: its answer, its RTT)
                stats.ring.add(tx.midx, (now - tx.t_sent) * 1000.0, tx.trace_id)
        elif tx.t_final is not None:
            tags = tx.tags
            if to_tag is not None and tags is not None and 200 <= status < 300:
                tag_hash = hash(to_tag)
                if tag_hash not in tags:
                    stats.forks += 1  # another branch answered too (RFC 3261 §16.7 step 5)
                    if len(tags) < MAX_FORK_TAGS:
                        tags.append(tag_hash)
                    return tx
            tx.retrans += 1
            tx.call.retrans += 1
            stats.response_retransmissions += 1
            return tx
        elif any(s == status for s, _ in tx.events):
            tx.retrans += 1
            tx.call.retrans += 1
            stats.response_retransmissions += 1
            if tx.midx == INVITE:
                self._timer_c(tx, now)  # a repeated 180 still keeps the INVITE alive
            return tx
        tx.events = tx.events + ((status, now),)
        call = tx.call
        if status >= 200:
            tx.t_final = now
            tx.status = status
            if status < 300 and to_tag is not None and tx.midx == INVITE:
                tx.tags = [hash(to_tag)]
            self._schedule_tx(tx, TX_LINGER, now + self.timer_b)
            self._emit("tx", tx)
            self._call_progress(call, tx, status, now)
        else:
            if tx.midx == INVITE:
                self._timer_c(tx, now)
            if tx.initial_invite and status > 100 and call.t_setup is None:
                call.t_setup = now
        return tx

    def _timer_c(self, tx: Transaction, now: float) -> None:
        self._schedule_tx(tx, TX_C, now + self.timer_c)

    def _call_progress(self, call: Call, tx: Transaction, status: int, now: float) -> None:
        if tx.initial_invite:
            if status in (401, 407) and call.outcome < 0:
                # auth challenge: the caller usually retries with credentials in the same
                # Call-ID; the call is decided by the retry, or rejected if none comes
                call.status = status
                call.t_final = now
                if not call.finished and self.calls.get(call.call_id) is call:
                    self._schedule_call(call, CALL_SHORT, now + self.timer_b)
            elif call.outcome < 0:
                if call.t_setup is None:  # (a challenge is no setup: the retry's answer is)
                    call.t_setup = now
                call.t_final = now
                call.status = status
                call.outcome = outcome_of(status, call.cancelled)
                if call.outcome == ANSWERED:
                    call.t_answer = now
                    if not call.finished:
                        self.stats.active_calls += 1
                        if self.calls.get(call.call_id) is call:
                            self._schedule_call(call, CALL_LONG, now + self.max_call_duration)
                self.stats.calls[call.outcome] += 1
                if call.outcome != ANSWERED:
                    self._finish_call(call, now,
                                      "cancel" if call.outcome == CANCELLED else "final")
        elif not call.is_call:
            self._finish_call(call, now, "final")
        elif tx.midx == BYE and status != 401 and status != 407:
            # RFC 3261 §15.1.1: the session ends with the BYE, whatever its answer, but for a
            # challenge (401/407), which the UA answers with the BYE again, credentials added
            # (it ended the call, and the call ran on outside its record)
            self._finish_call(call, now, "bye")

    def _finish_call(self, call: Call, now: float, ended_by: str) -> None:
        if call.finished:
            return
        call.finished = True
        call.t_end = now
        call.ended_by = ended_by
        call.trace_hex = None  # (the core's memo for stamping requests: few come after the end)
        if call.is_call and call.outcome == ANSWERED:
            self.stats.active_calls -= 1
        if self.calls.get(call.call_id) is call:
            # keep the entry until late ACKs/retransmissions have passed, then expire() drops it
            self._schedule_call(call, CALL_LINGER, now + self.timer_b)
        self._emit("call", call)
        if self.release and call.is_call:
            # the table needs a dialog's transactions only while it is open (may_join): the
            # ones still lingering are in the transaction table; the rest go with the record
            call.let_go(TABLE)

    def _emit(self, kind: str, obj) -> None:
        if len(self.finished) >= self.finished_max:
            self.stats.records_dropped += 1
            if kind == "call" and obj.is_call:
                obj.let_go()  # nobody will consume this record
            return
        self.finished.append((kind, obj))

    def _left(self, call: Call) -> None:
        """``call`` is no longer in the table: nor in a timer queue."""
        self.call_bytes -= call.nbytes
        call.nbytes = 0
        _move(self._callq, call, call.timer, -1, 0.0)
        call.timer = -1
        keys = call.corr_keys
        if keys is not None:
            index = self.corr_index
            for k in keys:
                if index.get(k) is call:
                    del index[k]
            call.corr_keys = None
        if self.release:
            call.let_go(TABLE)

    def finish_open_calls(self, now: float, ended_by: str = "shutdown") -> None:
        """End every call still open (answered, no BYE seen): a capture ended, time stopped."""
        for call in list(self.calls.values()):
            self._finish_call(call, now, ended_by)

    def pending_transactions(self) -> list[Transaction]:
        """Transactions still waiting for a final response."""
        return [tx for tx in self.transactions.values() if tx.t_final is None]

    def cut_pending(self, now: float, ended_by: str = "eof") -> list[Transaction]:
        """Time stopped (end of a capture): every transaction still waiting is closed at
        ``now`` without a timeout (emitted, ``timed_out`` False), and a call whose initial INVITE
        was still waiting, or a non-dialog entry, is finished with ``ended_by`` and no outcome.
        Returns the transactions cut."""
        cut = self.pending_transactions()
        for tx in cut:
            tx.t_final = now
            self._emit("tx", tx)
            call = tx.call
            if not call.is_call or (tx.initial_invite and call.outcome < 0):
                if call.is_call and not call.finished:
                    call.t_final = now
                self._finish_call(call, now, ended_by)
        return cut

    # -- timers ------------------------------------------------------------------------
    def expire(self, now: float) -> None:
        """Time out unanswered transactions (Timer B/F/C) and drop state whose linger ended.

        Cheap when nothing is due (the common case): one float compare per timer queue."""
        if now < self._tx_b.first and now < self._tx_c.first and now < self._tx_linger.first \
                and now < self._call_short.first and now < self._call_long.first \
                and now < self._call_linger.first:
            self.expire_left = False
            return
        stats = self.stats
        budget = self.expire_budget if self.expire_budget > 0 else -1  # -1: unbounded
        self.expire_left = False
        for q in (self._tx_b, self._tx_c):
            while q.first <= now:  # (inf when empty)
                if budget == 0:
                    self.expire_left = True
                    return
                tx = q.pop_due(now)  # (taken out first: an object of the wrong kind still leaves)
                if tx is None:
                    break
                budget -= 1
                tx.timer = -1
                if not self._drop_tx(tx):
                    continue  # (what leaves the table leaves its queue: not expected)
                if tx.t_final is not None:
                    continue  # cut at the end of a capture
                tx.timed_out = True
                tx.t_final = now
                if tx.direction == FROM_GATEWAY:  # sip-signaling's silence; else the gateway side's
                    stats.timeouts[tx.midx] += 1
                else:
                    stats.gateway_timeouts[tx.midx] += 1
                self._emit("tx", tx)
                call = tx.call
                if tx.initial_invite and call.outcome < 0:
                    call.outcome = TIMEOUT
                    call.t_final = now
                    stats.calls[TIMEOUT] += 1
                    self._finish_call(call, now, "timeout")
                elif not call.is_call:
                    self._finish_call(call, now, "timeout")
                elif tx.midx == BYE and not call.finished:
                    self._finish_call(call, now, "bye")
                    call.t_end = tx.t_sent  # the call ended when its BYE was sent, not Timer F later
        q = self._tx_linger
        while q.first <= now:
            if budget == 0:
                self.expire_left = True
                return
            tx = q.pop_due(now)
            if tx is None:
                break
            budget -= 1
            tx.timer = -1
            self._drop_tx(tx)
        calls = self.calls
        for cq in (self._call_short, self._call_long, self._call_linger):
            while cq.first <= now:
                if budget == 0:
                    self.expire_left = True
                    return
                call = cq.pop_due(now)
                if call is None:
                    break
                budget -= 1
                call.timer = -1
                cid = call.call_id
                if calls.get(cid) is not call:
                    continue
                del calls[cid]
                self._left(call)
                if call.finished:
                    continue
                if call.is_call and call.outcome < 0 and call.status:
                    call.outcome = outcome_of(call.status, call.cancelled)  # unanswered challenge
                    if call.t_setup is None:  # (its challenge was the final answer after all)
                        call.t_setup = call.t_final
                    stats.calls[call.outcome] += 1
                    self._finish_call(call, now, "final")
                elif call.is_call:
                    self._finish_call(call, now, "max_duration")  # e.g. answered, never a BYE
                else:
                    self._finish_call(call, now, "timeout")

    def queued(self) -> int:
        """Objects waiting on a timer (each at most once), for tests and memory accounting."""
        return sum(len(q) for q in (self._tx_b, self._tx_c, self._tx_linger, self._call_short,
                                    self._call_long, self._call_linger))


def memory_per_call(n: int = 5000) -> dict:
    """Bytes held per answered call (tracemalloc): ``n`` calls INVITE/200/ACK held open, then
    the same once their transactions' linger is over."""
    import tracemalloc

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tr = Tracker(Stats(ring_size=16), finished_max=0)
    t = 1000.0
    for i in range(n):
        cid = b"%08d-a3f1c2d4e5b6@10.20.30.40" % i
        call = tr.new_call(cid, i + 1, i + 2, None, True, t, True,
                           b'"Alice" <sip:+4930123456%02d@10.0.0.1>;tag=%08d' % (i % 100, i),
                           b"<sip:+4940987654%02d@10.0.0.2>" % (i % 100),
                           b"sip:+4940987654%02d@10.0.0.2:5060" % (i % 100))
        key = (b"z9hG4bKsw0123456789ab.%012d" % i, b"INVITE")
        tr.request(key, INVITE, b"INVITE", 1, call, t, i + 3, call.span_id, 0,
                   ("10.0.0.2", 5060), True)
        tr.response(key, 100, t + 0.01)
        tr.response(key, 200, t + 0.05, b"%08x" % i)
        tr.ack(1, b"ACK", 1, call, t + 0.06, i + 4, 0, ("10.0.0.2", 5060))
    with_tx = (tracemalloc.get_traced_memory()[0] - base) / n
    tr.expire(t + tr.timer_b + 1.0)
    calls_only = (tracemalloc.get_traced_memory()[0] - base) / n
    assert len(tr.calls) == n and not tr.transactions
    tracemalloc.stop()
    return {"calls": n, "bytes_per_call_with_transactions": round(with_tx),
            "bytes_per_call": round(calls_only)}


if __name__ == "__main__":
    print(memory_per_call())
