"""What a finished call's summary says: the fields of its ``call_summary`` log line, shared by the
proxy's log, the HEP LOG copy and ``sipwatch analyze``'s report.

Kept apart from :mod:`sipwatch.logs` (which writes lines with orjson) so that the capture side can
build summaries without loading the log writer."""
from __future__ import annotations

from math import copysign, floor

from .masking import mask_uri
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
    y = x * 1000.0
    if -1e9 < y < 1e9:
        n = floor(y)
        d = y - n
        if d < 0.499999 or d > 0.500001:
            if d > 0.5:
                n += 1
            return n / 1000.0 if n else copysign(0.0, x)
    return round(x, 3)


def _ms(a, b):
    return None if a is None or b is None else round3((b - a) * 1000.0)


# method names as logged, for the methods counted by name (others are decoded each time)
_METHOD_TEXT = {m: m.decode("ascii") for m in METHODS}


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
    the log line builds its record in place, with no second dict to copy them from."""
    txs: list[dict] = []
    append = txs.append
    method_text = _METHOD_TEXT
    for tx in call.transactions:
        method = tx.method
        name = method_text.get(method) if type(method) is bytes else None
        sent = tx.t_sent
        first = tx.t_first
        peer = getattr(tx, "peer", None)
        append({
            "method": name if name is not None else method.decode("ascii", "replace"),
            "cseq": tx.cseq,
            "status": tx.status or None,
            "rtt_ms": None if sent is None or first is None else round3((first - sent) * 1000.0),
            "final_ms": _ms(sent, tx.t_final) if first is not None else None,
            "retransmissions": tx.retrans,
            "timed_out": tx.timed_out,
            # network.transport of the hop: "tcp" is recorded in its peer, UDP else
            "transport": peer[2] if isinstance(peer, tuple) and len(peer) > 2 else "udp",
        })
    start = call.t_start
    answer = call.t_answer
    end = call.t_end
    outcome = call.outcome
    out["outcome"] = OUTCOMES[outcome] if outcome >= 0 else None
    out["final_status"] = call.status or None
    out["setup_ms"] = _ms(start, call.t_setup)
    out["answer_ms"] = None if start is None or answer is None else round3((answer - start) * 1000.0)
    out["duration_s"] = None if answer is None or end is None else round3(end - answer)
    out["retransmissions"] = call.retrans
    out["from"] = mask_uri(call.from_uri, mask_mode)
    out["to"] = mask_uri(call.to_uri, mask_mode)
    out["request_uri"] = mask_uri(call.ruri, mask_mode)
    out["ended_by"] = getattr(call, "ended_by", None)
    out["transactions"] = txs
    group = getattr(call, "group", None)
    if group is not None:
        out.update(leg_fields(call, group, call_id_mask))
    if rtp is not None:
        out["rtp"] = rtp
    return out


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
