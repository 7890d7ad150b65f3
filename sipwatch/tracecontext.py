"""W3C Trace Context (``traceparent``) parsing and formatting for SIP headers.

There is no IETF standard for trace context in SIP; sipwatch uses the W3C header as-is (the
same value format HTTP uses), under a configurable header name, and also reads
``X-Traceparent`` which some SIP stacks (e.g. Jitsi) already emit, and jambonz's ``X-Trace-ID``
(a bare 32-hex trace id, no span id and no sampled flag: :func:`parse_trace_id`).
"""
from __future__ import annotations

_HEX = frozenset(b"0123456789abcdef")


def parse_traceparent(value: bytes) -> tuple[int, int, int] | None:
    """(trace_id, parent_span_id, flags) of a valid traceparent value, else None.

    Follows the W3C rules: version ``ff`` is invalid, version ``00`` must be exactly 55
    characters, later versions may append fields; all-zero ids are invalid; lowercase hex only.
    """
    v = value.strip()
    if len(v) < 55 or v[2] != 45 or v[35] != 45 or v[52] != 45:  # '-'
        return None
    version = v[:2]
    if version == b"ff" or (version == b"00" and len(v) != 55) or (len(v) > 55 and v[55] != 45):
        return None
    head = v[:55].replace(b"-", b"")
    if len(head) != 52 or not _HEX.issuperset(head):
        return None
    trace_id = int(v[3:35], 16)
    span_id = int(v[36:52], 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, int(v[53:55], 16)


TRACE_ID_HEADER = b"x-trace-id"


def parse_trace_id(value: bytes) -> int | None:
    """The trace id of an ``X-Trace-ID`` value (32 hex digits, either case, not all zero), else None.
    It names a trace but no span in it: a call joining it has no parent span."""
    v = value.strip().lower()
    if len(v) != 32 or not _HEX.issuperset(v):
        return None
    return int(v, 16) or None


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> bytes:
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")


def sampled_by_ratio(trace_id: int, ratio: float) -> bool:
    """OpenTelemetry TraceIdRatioBased decision: the low 64 bits of the trace id below ratio·2^64."""
    if ratio >= 1.0:
        return True
    if ratio <= 0.0:
        return False
    return (trace_id & 0xFFFFFFFFFFFFFFFF) < int(ratio * (1 << 64))
