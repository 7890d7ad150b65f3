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
    the log line builds its record in place, with no second dict to copy them from.

    A :class:`~sipwatch.state.Call` (the proxy's, the capture's) is read field by field from its
    struct under mypyc; any other object with the same attributes through ``getattr``."""
    if isinstance(call, Call):
        txs = [_tx_fields(tx.method, tx.cseq, tx.status, tx.t_sent, tx.t_first, tx.t_final, tx.retrans,
                          tx.timed_out, tx.peer) for tx in call.transactions]
        _call_fields(out, call.outcome, call.status, call.t_start, call.t_setup, call.t_answer, call.t_end,
                     call.retrans, call.from_uri, call.to_uri, call.ruri, call.ended_by, txs, mask_mode)
        group = call.group
    else:
        txs = [_tx_fields(tx.method, tx.cseq, tx.status, tx.t_sent, tx.t_first, tx.t_final, tx.retrans,
                          tx.timed_out, getattr(tx, "peer", None)) for tx in call.transactions]
        _call_fields(out, call.outcome, call.status, call.t_start, call.t_setup, call.t_answer, call.t_end,
                     call.retrans, call.from_uri, call.to_uri, call.ruri, getattr(call, "ended_by", None), txs,
                     mask_mode)
        group = getattr(call, "group", None)
    if group is not None:
        out.update(leg_fields(call, group, call_id_mask))
    if rtp is not None:
        out["rtp"] = rtp
    return out


def _tx_fields(method, cseq, status, sent, first, final, retrans, timed_out, peer) -> dict:
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
        # network.transport of the hop: "tcp" is recorded in its peer, UDP else
        "transport": peer[2] if isinstance(peer, tuple) and len(peer) > 2 else "udp",
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
    def show(cid: bytes):
        return call_id_mask(cid) if call_id_mask is not None else cid.decode("utf-8", "replace")

    ids = list(group.call_ids)
    out = {"correlation_id": show(ids[0]), "legs": [show(c) for c in ids], "leg": call.leg}
    if call.joined_by:
        out["correlated_by"] = call.joined_by
        out["b2bua_leg_setup_ms"] = _ms(call.gap_start, call.t_start)
    return out


__all__ = ["call_summary_fields", "add_summary_fields", "call_sid_of", "leg_fields"]
