"""What a finished call's summary says: the fields of its ``call_summary`` log line, shared by the
proxy's log, the HEP LOG copy and ``sipwatch analyze``'s report.

Kept apart from :mod:`sipwatch.logs` (which writes lines with orjson) so that the capture side can
build summaries without loading the log writer."""
from __future__ import annotations

from math import copysign, floor
from typing import Final

from .masking import mask_uri
from .state import Call
from .stats import METHODS, OUTCOMES


def round3(x):  # (unannotated: an int stays an int under mypyc too)
    """``round(x, 3)``, the same float, at less than half its cost.

    ``round(x, 3)`` rounds the exact binary value of ``x`` to the nearest multiple of 1/1000
    (ties to even, by way of a decimal string) and returns the float nearest to that decimal.
    Here ``x * 1000`` is off the exact product by at most half an ulp (below 1e-7 under 1e9), so
    when it lies further than 1e-6 from a half the product rounds to the same integer ``n`` the
    exact value does, and ``n / 1000`` (two exact operands, one correctly rounded division) is
    the float nearest to that decimal. Near a half, for large values, NaN and infinities:
    ``round`` itself."""
    if type(x) is not float:
        return round(x, 3)  # an int stays an int
    return _round3f(x)


def _round3f(x: float) -> float:
    """:func:`round3` of a float, in machine doubles under mypyc (no float object in between):
    ``n``, the floor of ``x * 1000``, is an exact double below 1e9."""
    y = x * 1000.0
    if -1e9 < y < 1e9:
        n = float(floor(y))
        d = y - n
        if d < 0.499999 or d > 0.500001:
            if d > 0.5:
                n += 1.0
            return n / 1000.0 if n != 0.0 else copysign(0.0, x)
    return round(x, 3)


def _ms(a, b):
    """Milliseconds from ``a`` to ``b`` as :func:`round3` rounds them; None if either is None."""
    if type(a) is float and type(b) is float:
        return _ms_f(a, b)
    return None if a is None or b is None else round3((b - a) * 1000.0)


def _ms_f(a: float, b: float) -> float:
    return _round3f((b - a) * 1000.0)


def _seconds(a, b):
    """Seconds from ``a`` to ``b`` as :func:`round3` rounds them; None if either is None."""
    if type(a) is float and type(b) is float:
        return _seconds_f(a, b)
    return None if a is None or b is None else round3(b - a)


def _seconds_f(a: float, b: float) -> float:
    return _round3f(b - a)


# method names as logged, for the methods counted by name (others are decoded each time)
_METHOD_TEXT: Final = {m: m.decode("ascii") for m in METHODS}


def call_summary_fields(call, mask_mode: str = "partial", rtp: list[dict] | None = None,
                        call_id_mask=None) -> dict:
    """``rtp``, if given, is added as is: per stream ssrc, codec, packets, lost, jitter, MOS.

    ``ended_by`` says what ended a call other than its own signalling (``shutdown``: the
    sidecar stopped while the call was open), null otherwise."""
    out = {"call_sid": call_sid_of(call, call_id_mask), "trace_id": "%032x" % call.trace_id,
           "when": call.t_end}
    return add_summary_fields(out, call, mask_mode, rtp, call_id_mask)


def call_sid_of(call, call_id_mask=None) -> str:
    """The call's Call-ID as summaries show it."""
    return call_id_mask(call.call_id) if call_id_mask is not None else call.call_id.decode("utf-8", "replace")


def add_summary_fields(out: dict, call, mask_mode: str = "partial", rtp: list[dict] | None = None,
                       call_id_mask=None) -> dict:
    """The summary's fields from ``outcome`` on, added to ``out`` (in their order) and returned:
    the log line builds its record in place, with no second dict to copy them from. The same
    fields as :func:`summary_fields_of` makes of :func:`summary_tuple`, which is how they are
    made here: one path for the proxy's log, its span worker and the capture."""
    summary_fields_of(out, summary_tuple(call), mask_mode, call_id_mask)
    if rtp is not None:
        out["rtp"] = rtp
    return out


# A finished call's summary as plain values (what the proxy hands its span worker, which writes
# the line there): the fields below in this order, ``txs`` a list of (method, cseq, status,
# t_sent, t_first, t_final, retransmissions, timed_out, transport), ``legs`` None or (the
# group's Call-IDs as known now, leg, joined_by, gap_start).
S_CALL_ID, S_TRACE_ID, S_END = 0, 1, 2


def summary_tuple(call) -> tuple:
    """The summary of ``call`` as plain values (marshal can carry them; see above).

    A :class:`~sipwatch.state.Call` (the proxy's, the capture's) is read field by field from
    its struct under mypyc; any other object with the same attributes through ``getattr``."""
    if isinstance(call, Call):
        txs = [(tx.method, tx.cseq, tx.status, tx.t_sent, tx.t_first, tx.t_final, tx.retrans, tx.timed_out,
                _transport(tx.peer)) for tx in call.transactions]
        group = call.group
        legs = None if group is None else (list(group.call_ids), call.leg, call.joined_by, call.gap_start)
        return (call.call_id, call.trace_id, call.t_end, call.outcome, call.status, call.t_start, call.t_setup,
                call.t_answer, call.retrans, call.from_uri, call.to_uri, call.ruri, call.ended_by, txs, legs)
    txs = [(tx.method, tx.cseq, tx.status, tx.t_sent, tx.t_first, tx.t_final, tx.retrans, tx.timed_out,
            _transport(getattr(tx, "peer", None))) for tx in call.transactions]
    group = getattr(call, "group", None)
    legs = None if group is None else (list(group.call_ids), call.leg, call.joined_by, call.gap_start)
    return (call.call_id, call.trace_id, call.t_end, call.outcome, call.status, call.t_start, call.t_setup,
            call.t_answer, call.retrans, call.from_uri, call.to_uri, call.ruri, getattr(call, "ended_by", None),
            txs, legs)


def _transport(peer) -> str:
    """network.transport of a hop: "tcp" is recorded in its peer, UDP else."""
    return peer[2] if isinstance(peer, tuple) and len(peer) > 2 else "udp"


def summary_fields_of(out: dict, t: tuple, mask_mode: str = "partial", call_id_mask=None) -> dict:
    """:func:`add_summary_fields` from a :func:`summary_tuple` (the span worker's way)."""
    txs = [_tx_fields(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8]) for x in t[13]]
    _call_fields(out, t[3], t[4], t[5], t[6], t[7], t[2], t[8], t[9], t[10], t[11], t[12], txs, mask_mode)
    legs = t[14]
    if legs is not None:
        out.update(_leg_fields(legs[0], legs[1], legs[2], legs[3], t[5], call_id_mask))
    return out


def _tx_fields(method, cseq, status, sent, first, final, retrans, timed_out, transport) -> dict:
    """One entry of a summary's ``transactions``."""
    name = _METHOD_TEXT.get(method) if type(method) is bytes else None
    return {
        "method": name if name is not None else method.decode("ascii", "replace"),
        "cseq": cseq,
        "status": status or None,
        "rtt_ms": _ms(sent, first),
        "final_ms": _ms(sent, final) if first is not None else None,
        "retransmissions": retrans,
        "timed_out": timed_out,
        "transport": transport,
    }


def _call_fields(out: dict, outcome, status, start, setup, answer, end, retrans, from_uri, to_uri, ruri,
                 ended_by, txs: list, mask_mode: str) -> None:
    """The call's own fields, in their order, onto ``out``."""
    out["outcome"] = OUTCOMES[outcome] if outcome >= 0 else None
    out["final_status"] = status or None
    out["setup_ms"] = _ms(start, setup)
    out["answer_ms"] = _ms(start, answer)
    out["duration_s"] = _seconds(answer, end)
    out["retransmissions"] = retrans
    out["from"] = mask_uri(from_uri, mask_mode)
    out["to"] = mask_uri(to_uri, mask_mode)
    out["request_uri"] = mask_uri(ruri, mask_mode)
    out["ended_by"] = ended_by
    out["transactions"] = txs


def leg_fields(call, group, call_id_mask=None) -> dict:
    """A B2BUA leg's place in its call: ``correlation_id`` (the first leg's Call-ID, masked as
    Call-IDs are, the same in every leg's summary), ``legs`` (every leg's Call-ID, first leg
    first, as known when this summary was written), ``leg`` (this one's place, 1-based); a leg
    that joined also says by which header and how long the B2BUA took to place it
    (``b2bua_leg_setup_ms``: the named leg's INVITE to this leg's INVITE)."""
    return _leg_fields(list(group.call_ids), call.leg, call.joined_by, call.gap_start, call.t_start, call_id_mask)


def _leg_fields(ids: list, leg, joined_by, gap_start, t_start, call_id_mask) -> dict:
    def show(cid: bytes):
        return call_id_mask(cid) if call_id_mask is not None else cid.decode("utf-8", "replace")

    out = {"correlation_id": show(ids[0]), "legs": [show(c) for c in ids], "leg": leg}
    if joined_by:
        out["correlated_by"] = joined_by
        out["b2bua_leg_setup_ms"] = _ms(gap_start, t_start)
    return out


# What a terminal would act on rather than show: C0 controls but LF (ESC starts cursor moves,
# title and clipboard escapes; CR and BS overwrite what was printed), DEL, the C1 controls (U+009B
# is an 8-bit CSI), line and paragraph separators and the bidi overrides/isolates (the order text
# is shown in). A capture's Call-ID, display name or SDP codec name may hold any of them.
# Those past C0 are also what a JSON log line must escape itself (a JSON encoder escapes C0 only).
UNSAFE_PAST_C0: Final = (0x7F, *range(0x80, 0xA0), 0x061C, 0x200E, 0x200F, 0x2028, 0x2029,
                         *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_TERMINAL_UNSAFE: Final = {c: ("\\x%02x" if c < 0xA0 else "\\u%04x") % c
                           for c in (*range(0x20), *UNSAFE_PAST_C0) if c != 0x0A}


def terminal_safe(text: str) -> str:
    """``text`` for a terminal: every character in _TERMINAL_UNSAFE written as its escape."""
    return text.translate(_TERMINAL_UNSAFE)


__all__ = ["terminal_safe", "call_summary_fields", "add_summary_fields", "call_sid_of", "leg_fields", "summary_tuple",
           "summary_fields_of"]
