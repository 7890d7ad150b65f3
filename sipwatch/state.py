"""Transaction and call state with injected time: RTT, retransmissions, timeouts, call outcomes.

Shared by the inline proxy (:mod:`sipwatch.core`) and passive capture (:mod:`sipwatch.observer`),
so both compute figures with the same code. Nothing here reads a clock or touches a socket.

* A transaction is keyed by whatever identifies one hop's request (the proxy uses its own
  outgoing branch and the CSeq method). RTT = first copy forwarded → first response back.
* A call is an INVITE dialog, keyed by Call-ID. It is counted once, when the initial INVITE gets
  its final response or times out, and finishes at the final response to BYE (answered calls),
  at the final response (failed calls) or at timeout.
* Both tables are capped; the oldest entries are evicted (and counted) first. Expiry walks a
  deque ordered by deadline, so it costs O(expired) per sweep, not O(table).
"""
from __future__ import annotations

from collections import deque

from .stats import ANSWERED, BYE, CANCEL, TIMEOUT, Stats, outcome_of

MAX_TX_PER_CALL = 64


class Transaction:
    __slots__ = (
        "key", "midx", "method", "cseq", "call", "t_sent", "t_first", "t_final", "status",
        "events", "retrans", "span_id", "trace_id", "parent_span_id", "sampled", "deadline",
        "direction", "peer", "initial_invite", "timed_out",
    )

    def __init__(self, key, midx, method, cseq, call, now, span_id, trace_id, parent_span_id,
                 sampled, deadline, direction, peer, initial_invite):
        self.key = key
        self.midx = midx
        self.method = method
        self.cseq = cseq
        self.call = call
        self.t_sent = now
        self.t_first = None
        self.t_final = None
        self.status = 0
        self.events: list[tuple[int, float]] = []  # (status, time) of every distinct response
        self.retrans = 0
        self.span_id = span_id
        self.trace_id = trace_id
        self.parent_span_id = parent_span_id
        self.sampled = sampled
        self.deadline = deadline
        self.direction = direction
        self.peer = peer
        self.initial_invite = initial_invite
        self.timed_out = False

    @property
    def rtt_ms(self) -> float | None:
        return None if self.t_first is None else (self.t_first - self.t_sent) * 1000.0


class Call:
    __slots__ = (
        "call_id", "trace_id", "span_id", "parent_span_id", "sampled", "t_start", "t_setup",
        "t_answer", "t_final", "t_end", "status", "outcome", "cancelled", "finished",
        "transactions", "retrans", "from_uri", "to_uri", "ruri", "deadline", "is_call", "rtp",
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
        self.deadline = deadline
        self.is_call = is_call  # False: a non-dialog request's own small trace
        self.rtp = None  # passive capture: the call's RTP figures for its span, once known


class Tracker:
    """In-flight transactions and calls, fed by request/response events with timestamps.

    Finished calls and completed transactions are appended to ``finished`` (bounded), which the
    exporters drain off the hot path: ``("tx", Transaction)`` and ``("call", Call)``.
    """

    def __init__(self, stats: Stats, timer_b: float = 32.0, max_transactions: int = 200_000,
                 max_calls: int = 100_000, max_call_duration: float = 4 * 3600.0,
                 finished_max: int = 100_000):
        self.stats = stats
        self.timer_b = timer_b
        self.max_transactions = max_transactions
        self.max_calls = max_calls
        self.max_call_duration = max_call_duration
        self.transactions: dict = {}
        self.calls: dict[bytes, Call] = {}
        self._tx_order: deque = deque()  # (deadline, key, tx)
        self._call_order: deque = deque()  # (deadline, call_id, call)
        self.finished: deque = deque()
        self.finished_max = finished_max

    # -- calls -------------------------------------------------------------------------
    def find_call(self, call_id: bytes) -> Call | None:
        return self.calls.get(call_id)

    def new_call(self, call_id, trace_id, span_id, parent_span_id, sampled, now, is_call,
                 from_uri=b"", to_uri=b"", ruri=b"") -> Call:
        deadline = now + (self.max_call_duration if is_call else self.timer_b)
        call = Call(call_id, trace_id, span_id, parent_span_id, sampled, now, deadline, is_call,
                    from_uri, to_uri, ruri)
        calls = self.calls
        if len(calls) >= self.max_calls:
            self._evict_call()
        calls[call_id] = call
        self._call_order.append((deadline, call_id, call))
        return call

    def _evict_call(self) -> None:
        order, calls = self._call_order, self.calls
        while order:
            _, cid, call = order.popleft()
            if calls.get(cid) is call:
                del calls[cid]
                if not call.finished:
                    self.stats.evicted_calls += 1
                    if call.is_call and call.outcome == ANSWERED:
                        self.stats.active_calls -= 1
                return

    # -- transactions ------------------------------------------------------------------
    def request(self, key, midx, method, cseq, call: Call, now, span_id, parent_span_id,
                direction, peer, initial_invite) -> Transaction:
        """Record the first copy of a forwarded request (look it up first for retransmissions)."""
        deadline = now + self.timer_b
        tx = Transaction(key, midx, method, cseq, call, now, span_id, call.trace_id,
                         parent_span_id, call.sampled, deadline, direction, peer, initial_invite)
        if len(self.transactions) >= self.max_transactions:
            self._evict_tx()
        self.transactions[key] = tx
        self._tx_order.append((deadline, key, tx))
        if len(call.transactions) < MAX_TX_PER_CALL:
            call.transactions.append(tx)
        if midx == CANCEL:
            call.cancelled = True
        return tx

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
        if len(call.transactions) < MAX_TX_PER_CALL:
            call.transactions.append(tx)
        self._emit("tx", tx)
        return tx

    def _evict_tx(self) -> None:
        order, txs = self._tx_order, self.transactions
        while order:
            _, key, tx = order.popleft()
            if txs.get(key) is tx:
                del txs[key]
                if tx.t_final is None:
                    self.stats.evicted_transactions += 1
                return

    def response(self, key, status: int, now: float) -> Transaction | None:
        """Record a response. Returns its transaction (None if unknown)."""
        tx = self.transactions.get(key)
        if tx is None:
            return None
        stats = self.stats
        if tx.t_first is None:
            tx.t_first = now
            stats.ring.add(tx.midx, (now - tx.t_sent) * 1000.0, tx.trace_id)
        elif tx.t_final is not None or any(s == status for s, _ in tx.events):
            tx.retrans += 1
            tx.call.retrans += 1
            stats.response_retransmissions += 1
            return tx
        tx.events.append((status, now))
        call = tx.call
        if status >= 200:
            tx.t_final = now
            tx.status = status
            self._emit("tx", tx)
            self._call_progress(call, tx, status, now)
        elif tx.initial_invite and status > 100 and call.t_setup is None:
            call.t_setup = now
        return tx

    def _call_progress(self, call: Call, tx: Transaction, status: int, now: float) -> None:
        if tx.initial_invite:
            if call.t_setup is None:
                call.t_setup = now
            if status in (401, 407) and call.outcome < 0:
                # auth challenge: the caller usually retries with credentials in the same
                # Call-ID; the call is decided by the retry, or rejected if none comes
                call.status = status
                call.t_final = now
                self._reschedule_call(call, now + self.timer_b)
            elif call.outcome < 0:
                call.t_final = now
                call.status = status
                call.outcome = outcome_of(status, call.cancelled)
                if call.outcome == ANSWERED:
                    call.t_answer = now
                    self.stats.active_calls += 1
                    self._reschedule_call(call, now + self.max_call_duration)
                self.stats.calls[call.outcome] += 1
                if call.outcome != ANSWERED:
                    self._finish_call(call, now)
        elif not call.is_call:
            self._finish_call(call, now)
        elif tx.midx == BYE:
            self._finish_call(call, now)

    def _reschedule_call(self, call: Call, deadline: float) -> None:
        call.deadline = deadline
        self._call_order.append((deadline, call.call_id, call))

    def _finish_call(self, call: Call, now: float) -> None:
        if call.finished:
            return
        call.finished = True
        call.t_end = now
        if call.is_call and call.outcome == ANSWERED:
            self.stats.active_calls -= 1
        # keep the entry until late ACKs/retransmissions have passed, then expire() drops it
        self._reschedule_call(call, now + self.timer_b)
        self._emit("call", call)

    def _emit(self, kind: str, obj) -> None:
        if len(self.finished) >= self.finished_max:
            self.stats.records_dropped += 1
            return
        self.finished.append((kind, obj))

    def finish_open_calls(self, now: float) -> None:
        """End every call still open (answered, no BYE seen): a capture ended, time stopped."""
        for call in list(self.calls.values()):
            self._finish_call(call, now)

    # -- timers ------------------------------------------------------------------------
    def expire(self, now: float) -> None:
        """Time out unanswered transactions (Timer B/F) and drop lingering state."""
        order, txs, stats = self._tx_order, self.transactions, self.stats
        while order and order[0][0] <= now:
            _, key, tx = order.popleft()
            if txs.get(key) is not tx:
                continue
            del txs[key]
            if tx.t_final is None:
                tx.timed_out = True
                tx.t_final = now
                stats.timeouts[tx.midx] += 1
                self._emit("tx", tx)
                call = tx.call
                if tx.initial_invite and call.outcome < 0:
                    call.outcome = TIMEOUT
                    call.t_final = now
                    stats.calls[TIMEOUT] += 1
                    self._finish_call(call, now)
                elif not call.is_call or tx.midx == BYE:
                    self._finish_call(call, now)
        order, calls = self._call_order, self.calls
        while order and order[0][0] <= now:
            deadline, cid, call = order.popleft()
            if calls.get(cid) is not call or call.deadline != deadline:
                continue
            del calls[cid]
            if not call.finished:
                if call.is_call and call.outcome < 0 and call.status:
                    call.outcome = outcome_of(call.status, call.cancelled)  # unanswered challenge
                    stats.calls[call.outcome] += 1
                self._finish_call(call, now)  # also: answered call that never saw BYE
                calls.pop(cid, None)
