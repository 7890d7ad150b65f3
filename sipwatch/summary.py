"""What a finished call's summary says: the fields of its ``call_summary`` log line, shared by the
proxy's log, the HEP LOG copy and ``sipwatch analyze``'s report.

Kept apart from :mod:`sipwatch.logs` (which writes lines with orjson) so that the capture side can
build summaries without loading the log writer."""
from __future__ import annotations

from .masking import mask_uri
from .stats import METHODS, OUTCOMES


def _ms(a, b):
    return None if a is None or b is None else round((b - a) * 1000.0, 3)


# method names as logged, for the methods counted by name (others are decoded each time)
_METHOD_TEXT = {m: m.decode("ascii") for m in METHODS}


def call_summary_fields(call, mask_mode: str = "partial", rtp: list[dict] | None = None,
                        call_id_mask=None) -> dict:
    """``rtp``, if given, is added as is: per stream ssrc, codec, packets, lost, jitter, MOS.

    ``ended_by`` says what ended a call other than its own signalling (``shutdown``: the
    sidecar stopped while the call was open), null otherwise."""
    txs = []
    for tx in call.transactions:
        method = tx.method
        name = _METHOD_TEXT.get(method) if type(method) is bytes else None
        sent = tx.t_sent
        first = tx.t_first
        peer = getattr(tx, "peer", None)
        txs.append({
            "method": name if name is not None else method.decode("ascii", "replace"),
            "cseq": tx.cseq,
            "status": tx.status or None,
            "rtt_ms": None if sent is None or first is None else round((first - sent) * 1000.0, 3),
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
    out = {
        "call_sid": call_id_mask(call.call_id) if call_id_mask is not None
        else call.call_id.decode("utf-8", "replace"),
        "trace_id": "%032x" % call.trace_id,
        "when": end,
        "outcome": OUTCOMES[outcome] if outcome >= 0 else None,
        "final_status": call.status or None,
        "setup_ms": _ms(start, call.t_setup),
        "answer_ms": None if start is None or answer is None else round((answer - start) * 1000.0, 3),
        "duration_s": None if answer is None or end is None else round(end - answer, 3),
        "retransmissions": call.retrans,
        "from": mask_uri(call.from_uri, mask_mode),
        "to": mask_uri(call.to_uri, mask_mode),
        "request_uri": mask_uri(call.ruri, mask_mode),
        "ended_by": getattr(call, "ended_by", None),
        "transactions": txs,
    }
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


__all__ = ["call_summary_fields", "leg_fields"]
