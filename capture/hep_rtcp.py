"""RTCP reports that arrive as HEP payload type 5 (RTCP as JSON, what rtpengine, captagent and
FreeSWITCH send), kept per call (the HEP correlation id is the Call-ID) until the call's summary
is written, where they join its ``rtp`` list.

Why: behind a media relay the capture sees no RTP, but the relay reports per-stream loss and
jitter; with them the call summary and the call span still carry RTP quality. A report block is
about one source SSRC: cumulative packets lost, fraction lost (of 256) and interarrival jitter
in RTP timestamp units. The JSON does not say the codec, so jitter is turned into milliseconds
at 8000 Hz (G.711, G.729: what telephony calls use) and the entry says so (``jitter_clock_hz``);
no MOS is made up for it.

Bounded: at most ``max_calls`` calls (the oldest is forgotten first), ``MAX_SSRC`` sources per
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
        """One HEP type-5 payload; True if it carried at least one report block."""
        if not call_id or len(payload) > MAX_JSON:
            self.malformed += 1
            return False
        try:
            doc = orjson.loads(payload)
            blocks = doc.get("report_blocks") or []
            if not isinstance(blocks, list):
                raise ValueError("report_blocks")
            sender = doc.get("sender_information") or {}
            sender_ssrc = doc.get("ssrc")
            taken = 0
            calls = self.by_call
            per_call = calls.get(call_id)
            if per_call is None:
                if len(calls) >= self.max_calls:
                    calls.popitem(last=False)
                per_call = calls[call_id] = {}
            if isinstance(sender, dict) and isinstance(sender_ssrc, int) and \
                    isinstance(sender.get("packets"), int) and sender_ssrc in per_call:
                per_call[sender_ssrc]["packets"] = max(per_call[sender_ssrc]["packets"],
                                                       min(max(sender["packets"], 0), U32))
            for b in blocks[:MAX_SSRC]:
                ssrc, lost = b.get("source_ssrc"), b.get("packets_lost", 0)
                fraction, jitter = b.get("fraction_lost", 0), b.get("ia_jitter", 0)
                if not all(isinstance(v, int) and not isinstance(v, bool)
                           for v in (ssrc, lost, fraction, jitter)) or not 0 <= ssrc <= U32:
                    continue
                entry = per_call.get(ssrc)
                if entry is None:
                    if len(per_call) >= MAX_SSRC:
                        continue
                    entry = per_call[ssrc] = {"lost": 0, "fraction": 0, "jitter": 0, "packets": 0,
                                              "reports": 0}
                entry["lost"] = max(entry["lost"], min(lost, LOST_MAX))
                entry["fraction"] = max(entry["fraction"], min(max(fraction, 0), 255))
                entry["jitter"] = max(entry["jitter"], min(max(jitter, 0), U32))
                entry["reports"] += 1
                taken += 1
            self.reports += taken
            if not per_call:
                calls.pop(call_id, None)
            return taken > 0
        except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError, OverflowError):
            self.malformed += 1
            return False

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
