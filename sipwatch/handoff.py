"""What a slice of finished records hands on: the span worker's tuples, the call histograms'
figures, and the release of each call's transactions.

The housekeeping tick runs these once per finished record. Written out in interpreted Python
(the span pipeline, the metrics module, the proxy's app) each record's twenty-odd fields were
read through the compiled classes' generic attribute lookup: the span tuples alone cost ~7 µs a
call in process, and the slices' interpreted frames were a third of the tick's samples live.
Here, compiled with mypyc next to :mod:`sipwatch.state`, a record of the proxy's own types
(:class:`~sipwatch.state.Transaction`, :class:`~sipwatch.state.Call`) is read field by field from
its struct; any other object (a capture's record, a test's stand-in) takes the generic path,
with the same result.

The tuples are the ones :func:`sipwatch.otlp_encode.tx_tuple` / ``call_tuple`` define (the
worker's frame format), value for value and type for type, so their ``marshal`` bytes are the
same."""
from __future__ import annotations

from .otlp_encode import call_tuple, tx_tuple
from .state import Call, Transaction
from .summary import summary_tuple


def native_tx_tuple(tx: Transaction) -> tuple:
    """:func:`~sipwatch.otlp_encode.tx_tuple` of a proxy transaction."""
    call = tx.call
    if not isinstance(call, Call):
        return tx_tuple(tx)
    return (0, tx.trace_id, tx.span_id, tx.parent_span_id, tx.method, tx.cseq, tx.direction, tx.peer,
            tx.status, tx.t_sent, tx.t_first, tx.t_final, tx.retrans, tx.timed_out, tx.events,
            call.span_id, call.is_call, call.call_id, call.from_uri, call.to_uri)


def native_call_tuple(call: Call) -> tuple:
    """:func:`~sipwatch.otlp_encode.call_tuple` of a proxy call."""
    txs = call.transactions
    group = call.group
    legs = (list(group.call_ids), call.leg, call.joined_by, call.gap_span_id, call.gap_start, call.gap_parent) \
        if group is not None else None
    first = txs[0].peer if txs else None
    return (1, call.trace_id, call.span_id, call.parent_span_id, call.call_id, call.from_uri, call.to_uri,
            call.ruri, call.outcome, call.status, call.t_start, call.t_setup, call.t_answer, call.t_end,
            call.retrans, call.rtp, first, call.is_call, legs)


def take_slice(backlog, everything: bool, max_calls: int, max_records: int, report) -> tuple[list, list]:
    """(records, INVITE dialogs among them) taken from the front of ``backlog``: at most
    ``max_records`` records and ``max_calls`` dialogs unless ``everything``. A record of the wrong
    shape is taken and reported to ``report("tick", exc)``."""
    chunk: list = []
    calls: list = []
    while backlog and (everything or (len(calls) < max_calls and len(chunk) < max_records)):
        rec = backlog.popleft()
        chunk.append(rec)
        try:
            kind, obj = rec
            if isinstance(obj, Call):  # (the same test, read from the struct under mypyc)
                is_call = kind == "call" and obj.is_call
            else:
                is_call = kind == "call" and obj.is_call
        except Exception as exc:  # noqa: BLE001
            report("tick", exc)
            continue
        if is_call:
            calls.append(obj)
    return chunk, calls


def summarize_all(calls: list, summarize, failed) -> None:
    """``summarize(call)`` of each call; a failure goes to ``failed(call, exc)`` and the rest go on."""
    for obj in calls:
        try:
            summarize(obj)
        except Exception as exc:  # noqa: BLE001
            failed(obj, exc)


def summary_tuples(calls: list, failed) -> list:
    """:func:`~sipwatch.summary.summary_tuple` of each call, in order; a failure goes to
    ``failed(call, exc)`` and the rest go on."""
    out: list = []
    for obj in calls:
        try:
            out.append(summary_tuple(obj))
        except Exception as exc:  # noqa: BLE001
            failed(obj, exc)
    return out


def span_tuples(records, own_decision: bool, ratio, by_ratio) -> list:
    """The tuples of the sampled records, in order: a call's when it is an INVITE dialog (a
    non-dialog request's trace is its transaction spans), a transaction's always; sampled as the
    call decided (``own_decision`` False) or by ``by_ratio(trace_id, ratio)``. A record of the
    wrong shape raises, as unpacking it would."""
    held: list = []
    for rec in records:
        kind, obj = rec
        if kind == "call":
            if isinstance(obj, Call):
                if not obj.is_call:
                    continue
                if not (by_ratio(obj.trace_id, ratio) if own_decision else obj.sampled):
                    continue
                held.append(native_call_tuple(obj))
                continue
            if not obj.is_call:
                continue
            if not (by_ratio(obj.trace_id, ratio) if own_decision else obj.sampled):
                continue
            held.append(call_tuple(obj))
        elif isinstance(obj, Transaction):
            if not (by_ratio(obj.trace_id, ratio) if own_decision else obj.sampled):
                continue
            held.append(native_tx_tuple(obj))
        else:
            if not (by_ratio(obj.trace_id, ratio) if own_decision else obj.sampled):
                continue
            held.append(tx_tuple(obj))
    return held


def call_figures(calls, on_error=None) -> tuple[list, list, list]:
    """(setup seconds, durations, B2BUA leg setups) of the INVITE dialogs among ``calls``, in
    order, for the call histograms. A call whose figures cannot be read is reported to
    ``on_error("metrics", exc)`` (raised without one) and gives what it had given before."""
    setup: list = []
    duration: list = []
    legs: list = []
    for call in calls:
        try:
            if isinstance(call, Call):
                if not call.is_call:
                    continue
                t_setup = call.t_setup
                if t_setup is not None:
                    setup.append(t_setup - call.t_start)
                t_answer = call.t_answer
                t_end = call.t_end
                if t_answer is not None and t_end is not None:
                    duration.append(max(0.0, t_end - t_answer))
                if call.joined_by:
                    legs.append(max(0.0, call.t_start - call.gap_start))
                continue
            if not call.is_call:
                continue
            if call.t_setup is not None:
                setup.append(call.t_setup - call.t_start)
            if call.t_answer is not None and call.t_end is not None:
                duration.append(max(0.0, call.t_end - call.t_answer))
            if getattr(call, "joined_by", None):
                legs.append(max(0.0, call.t_start - call.gap_start))
        except Exception as exc:  # noqa: BLE001
            if on_error is None:
                raise
            on_error("metrics", exc)
    return setup, duration, legs


def let_go_all(calls, on_error) -> None:
    """``let_go()`` of every call (the summary and the span record were its last readers); a
    failure is reported to ``on_error("tick", exc)`` and the rest go on."""
    for obj in calls:
        try:
            if isinstance(obj, Call):
                obj.let_go()  # (compiled: a direct call of Call's native method)
            else:
                obj.let_go()  # (any other object with the method, through its attribute)
        except Exception as exc:  # noqa: BLE001
            on_error("tick", exc)


def forget_events(records) -> None:
    """A completed transaction drops its response events (its span's provisional responses) once
    its record was handed on: nothing reads them again, since a response after the final one is
    a retransmission or a fork whatever its status (``Tracker.response_to``). At the state caps
    they were 10 of a lingering call's ~54 objects, freed cold ``timer_b`` later; here they go
    while still in the cache. A timed-out transaction keeps them (a late final response records
    it again). A record of the wrong shape is skipped (``take_slice`` reported it)."""
    for rec in records:
        try:
            obj = rec[1]
        except Exception:  # noqa: BLE001
            continue
        if isinstance(obj, Transaction) and obj.t_final is not None:
            obj.events = ()


__all__ = ["take_slice", "forget_events", "summarize_all", "summary_tuples", "span_tuples", "call_figures", "let_go_all", "native_tx_tuple", "native_call_tuple"]
