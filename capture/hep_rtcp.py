"""RTCP reports that arrive as HEP payload type 5 (RTCP as JSON, what rtpengine, captagent and
FreeSWITCH send), kept per call (the HEP correlation id is the Call-ID) until the call's summary
is written, where they join its ``rtp`` list.

Why: behind a media relay the capture sees no RTP, but the relay reports per-stream loss and
jitter; with them the call summary and the call span still carry RTP quality. A report block is
about one source SSRC: cumulative packets lost, fraction lost (of 256) and interarrival jitter
in RTP timestamp units. The JSON does not say the codec, so jitter is turned into milliseconds
at 8000 Hz (G.711, G.729: what telephony calls use) and the entry says so (``jitter_clock_hz``);
no MOS is made up for it.

Bounded: at most ``max_calls`` calls (the one reported least recently is forgotten first), ``MAX_SSRC`` sources per
call, payloads over ``MAX_JSON`` bytes are refused, values clamped to the RTCP fields' widths;
malformed JSON is counted, never raised.
"""
from __future__ import annotations

from collections import OrderedDict

import orjson

MAX_JSON = 16384
MAX_SSRC = 16
CLOCK_HZ = 8000
# the RTCP fields' own widths (RFC 3550 §6.4.1): a JSON number past them is no report's; clamped,
# so that a forged 2^64 cannot overflow a span's counters or show a loss no stream can have
U32 = (1 << 32) - 1
LOST_MAX = (1 << 23) - 1  # cumulative packets lost: 24 bits, signed


class RtcpReports:
    def __init__(self, max_calls: int = 16000):
        self.by_call: OrderedDict[bytes, dict[int, dict]] = OrderedDict()  # (oldest first out)
        self.max_calls = max_calls
        self.reports = 0  # report blocks taken
        self.malformed = 0  # payloads that are not RTCP JSON we can read

    def add(self, call_id: bytes | None, payload: bytes) -> bool:
        """One HEP type-5 payload; True if it carried at least one report block.

        The payload is read whole before anything is kept: one that carries no block we can read
        neither makes an entry nor pushes out another call's. A call that gets reports is the
        most recent one (the least recently reported is forgotten first)."""
        if not call_id or len(payload) > MAX_JSON:
            self.malformed += 1
            return False
        try:
            doc = orjson.loads(payload)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            blocks = doc.get("report_blocks") or []
            if not isinstance(blocks, list):
                raise ValueError("report_blocks")
            sender = doc.get("sender_information") or {}
            sender_ssrc = doc.get("ssrc")
            sender_packets = sender.get("packets") if isinstance(sender, dict) else None
            found = []
            for b in blocks[:MAX_SSRC]:
                if not isinstance(b, dict):
                    continue
                ssrc, lost = b.get("source_ssrc"), b.get("packets_lost", 0)
                fraction, jitter = b.get("fraction_lost", 0), b.get("ia_jitter", 0)
                if all(isinstance(v, int) and not isinstance(v, bool)
                       for v in (ssrc, lost, fraction, jitter)) and 0 <= ssrc <= U32:
                    found.append((ssrc, min(lost, LOST_MAX), min(max(fraction, 0), 255), min(max(jitter, 0), U32)))
        except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError, OverflowError):
            self.malformed += 1
            return False
        calls = self.by_call
        per_call = calls.get(call_id)
        if per_call is not None:
            calls.move_to_end(call_id)
            if isinstance(sender_ssrc, int) and isinstance(sender_packets, int) and sender_ssrc in per_call:
                entry = per_call[sender_ssrc]
                entry["packets"] = max(entry["packets"], min(max(sender_packets, 0), U32))
        if not found:
            return False
        if per_call is None:
            if len(calls) >= self.max_calls:
                calls.popitem(last=False)
            per_call = calls[call_id] = {}
        taken = 0
        for ssrc, lost, fraction, jitter in found:
            entry = per_call.get(ssrc)
            if entry is None:
                if len(per_call) >= MAX_SSRC:
                    continue
                entry = per_call[ssrc] = {"lost": 0, "fraction": 0, "jitter": 0, "packets": 0, "reports": 0}
            entry["lost"] = max(entry["lost"], lost)
            entry["fraction"] = max(entry["fraction"], fraction)
            entry["jitter"] = max(entry["jitter"], jitter)
            entry["reports"] += 1
            taken += 1
        self.reports += taken
        return taken > 0

    def collect(self):
        from prometheus_client.core import CounterMetricFamily
        yield CounterMetricFamily("sipwatch_hep_rtcp_report_blocks", "RTCP report blocks taken from HEP "
                                  "RTCP JSON (type 5) for their calls' summaries.", value=self.reports)
        yield CounterMetricFamily("sipwatch_hep_rtcp_malformed", "HEP RTCP JSON payloads with no block "
                                  "that could be read (not JSON, no correlation id, too large, no usable "
                                  "report block).", value=self.malformed)

    def take(self, call_id: bytes) -> list[dict]:
        """The call's reports as entries of a call summary's ``rtp`` list (then forgotten)."""
        out = []
        for ssrc, e in (self.by_call.pop(call_id, None) or {}).items():
            lost_pct = round(100.0 * e["fraction"] / 256, 2)
            out.append({"ssrc": ssrc, "codec": None, "packets": e["packets"], "lost": e["lost"],
                        "lost_pct": lost_pct, "jitter_mean_ms": None,
                        "jitter_max_ms": round(1000.0 * e["jitter"] / CLOCK_HZ, 3),
                        "jitter_clock_hz": CLOCK_HZ, "mos": None,  # codec unknown
                        "ended": "rtcp_report", "reports": e["reports"]})
        return out


__all__ = ["RtcpReports"]
