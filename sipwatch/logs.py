"""JSON lines on stdout (orjson): one object per event, one call summary per finished call.

Fields every record has: ``timestamp`` (RFC 3339 UTC), ``log_level``, ``service_name``,
``call_sid`` (the SIP Call-ID, or null), ``trace_id`` (32 hex, or null), ``message``, ``event``.
Nothing here runs per datagram: call summaries are written from drained finished-call records.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime, timezone

import orjson

from .masking import mask_uri
from .stats import METHODS, OUTCOMES

LEVELS = ("debug", "info", "warning", "error")


class JsonLog:
    def __init__(self, service_name: str = "sipwatch", stream=None, mask_mode: str = "partial",
                 level: str = "info", clock=time.time):
        if level not in LEVELS:
            raise ValueError(f"unknown log level {level!r} (expected one of {', '.join(LEVELS)})")
        self.service_name = service_name
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.mask_mode = mask_mode
        self.min_level = LEVELS.index(level)
        self.clock = clock

    def emit(self, level: str, message: str, event: str, call_sid=None, trace_id=None,
             when: float | None = None, **fields) -> None:
        if LEVELS.index(level) < self.min_level:
            return
        ts = datetime.fromtimestamp(self.clock() if when is None else when, timezone.utc)
        rec = {
            "timestamp": ts.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "log_level": level,
            "service_name": self.service_name,
            "call_sid": call_sid,
            "trace_id": trace_id,
            "message": message,
            "event": event,
        }
        rec.update(fields)
        try:
            self.stream.write(orjson.dumps(rec) + b"\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            pass  # stdout gone (pipe closed at shutdown): never take the proxy down for a log line

    def info(self, message: str, event: str, **fields) -> None:
        self.emit("info", message, event, **fields)

    def warning(self, message: str, event: str, **fields) -> None:
        self.emit("warning", message, event, **fields)

    def error(self, message: str, event: str, **fields) -> None:
        self.emit("error", message, event, **fields)

    def call_summary(self, call, rtp: list[dict] | None = None) -> None:
        """The one record per finished call: setup, outcome, duration, retransmissions, RTTs
        (and, where media was seen, one entry per RTP stream)."""
        self.emit("info", "call finished", "call_summary",
                  **call_summary_fields(call, self.mask_mode, rtp))


def _ms(a, b):
    return None if a is None or b is None else round((b - a) * 1000.0, 3)


def call_summary_fields(call, mask_mode: str = "partial", rtp: list[dict] | None = None) -> dict:
    """``rtp``, if given, is added as is: per stream ssrc, codec, packets, lost, jitter, MOS."""
    txs = []
    for tx in call.transactions:
        txs.append({
            "method": tx.method.decode("ascii", "replace"),
            "cseq": tx.cseq,
            "status": tx.status or None,
            "rtt_ms": _ms(tx.t_sent, tx.t_first),
            "final_ms": _ms(tx.t_sent, tx.t_final) if tx.t_first is not None else None,
            "retransmissions": tx.retrans,
            "timed_out": tx.timed_out,
        })
    out = {
        "call_sid": call.call_id.decode("utf-8", "replace"),
        "trace_id": "%032x" % call.trace_id,
        "when": call.t_end,
        "outcome": OUTCOMES[call.outcome] if call.outcome >= 0 else None,
        "final_status": call.status or None,
        "setup_ms": _ms(call.t_start, call.t_setup),
        "answer_ms": _ms(call.t_start, call.t_answer),
        "duration_s": None if call.t_answer is None or call.t_end is None
        else round(call.t_end - call.t_answer, 3),
        "retransmissions": call.retrans,
        "from": mask_uri(call.from_uri, mask_mode),
        "to": mask_uri(call.to_uri, mask_mode),
        "request_uri": mask_uri(call.ruri, mask_mode),
        "transactions": txs,
    }
    if rtp is not None:
        out["rtp"] = rtp
    return out


__all__ = ["JsonLog", "call_summary_fields", "METHODS"]
