"""``sipwatch analyze FILE``: calls, per-hop transactions, RTTs and RTP quality from a capture.

The capture drives :class:`sipwatch.observer.Observer` (the proxy's own parser and Tracker) and
:class:`sipwatch.rtp.RtpAnalyzer`, so the figures are computed by the same code as the live
metrics. Totals are laid out like tshark's ``-z sip,stat`` and ``-z rtp,streams`` so they can
be checked against it.

With ``--spans-file`` / ``--otlp-endpoint`` (or the OTEL_* variables, as for the proxy) the
finished calls and transactions are exported as the proxy's spans (:mod:`sipwatch.tracing`,
resource role ``analyze``), timed by the capture's packet timestamps, with the call's RTP figures
as ``rtp.*`` call-span attributes; everything is exported once the file has been read.
"""
from __future__ import annotations

import argparse
import gc
import os
from operator import attrgetter
import sys
import time

from sipwatch.correlation import DEFAULT as DEFAULT_CORRELATION, add_correlation_argument
from sipwatch.summary import call_summary_fields, terminal_safe
from sipwatch.masking import MODES, add_call_id_mask_arguments, mask_uri
from sipwatch.observer import Observer
from sipwatch.rtp import RtpAnalyzer
from sipwatch.stats import OUTCOMES, Stats
from sipwatch.otlp_options import add_otlp_arguments

from .pcapfile import (KEEPALIVE_MAX, MAX_FRAG_BYTES, MAX_FRAG_PARTS, MAX_FRAG_SETS, MAX_SIP_MESSAGE,
                       MAX_TCP_FLOWS, MAX_TCP_HELD, is_sip_keepalive)

SIP_PORTS = (5060, 5061)
ANALYZE_EXPORT_TIMEOUT = 300.0  # seconds to export a file's spans before dropping the rest
GC_EVERY = 1 << 16  # packets between collections of the young generation while reading
SDP_BACKLOG_BYTES = 16 << 20  # SDP bodies held unparsed until a UDP payload may be RTP
# a packet stamped this much earlier than one before it is counted (a merge of clocks that
# disagree, a clock stepped back while capturing): a multi-interface capture interleaves within µs
BACKWARDS_TOLERANCE = 0.001


class SdpBacklog:
    """SDP offers/answers waiting for the RTP analyzer, in capture order.

    SDP only ties RTP streams to calls, so bodies are parsed when the next UDP payload that may
    be RTP arrives (or when the backlog holds ``SDP_BACKLOG_BYTES``): the analyzer sees exactly
    the SDP it would have seen before that packet, and a capture of signalling alone never
    parses its SDP at all (a fifth of the work on an all-SIP capture)."""

    __slots__ = ("add_sdp", "held", "size")

    def __init__(self, add_sdp):
        self.add_sdp = add_sdp
        self.held: list = []
        self.size = 0

    def add(self, call_id: bytes, body: bytes, src, dst, ts) -> None:
        self.held.append((call_id, body, src, dst, ts))
        self.size += len(body)
        if self.size >= SDP_BACKLOG_BYTES:
            self.flush()

    def flush(self) -> None:
        held, add = self.held, self.add_sdp
        self.held, self.size = [], 0
        for call_id, body, src, dst, ts in held:
            add(call_id, body, src, dst, ts)


def looks_like_sip(payload: bytes) -> bool:
    """A SIP start line: ``SIP/2.0 NNN`` or ``METHOD uri SIP/2.0`` (the heuristic tshark uses)."""
    if payload[:8] == b"SIP/2.0 ":
        return True
    end = payload.find(b"\n", 0, 2048)
    if end <= 0:
        return False
    while end and payload[end - 1] == 13:  # the line without its CRs, as rstrip(b"\r") gives it
        end -= 1
    return end >= 8 and payload[end - 8:end] == b" SIP/2.0"  # (endswith(.., 0, end), cheaper)


def _source(path: str, engine: str, counters: dict, max_sip_message: int = MAX_SIP_MESSAGE):
    if engine == "pyshark":
        from .pyshark_source import read_packets as rp
        return rp(path, counters)
    from .pcapfile import read_packets as rp
    return rp(path, counters, max_sip_message)


def analyse(path: str, engine: str = "fast", mask: str = "partial", progress=None,
            spans=None, max_sip_message: int = MAX_SIP_MESSAGE, correlation: str = DEFAULT_CORRELATION,
            transactions: bool = True, call_id_mask=None) -> dict:
    """Analyse one capture; returns the JSON-ready report (see ``--json``). ``spans``: a
    :class:`sipwatch.tracing.SpanPipeline` that gets every finished record at the end.
    ``call_id_mask``: a :class:`~sipwatch.masking.CallIdMasker` for the report's Call-IDs (the
    command line's ``--mask-call-id``); None shows them as captured.
    ``transactions=False``: the report's ``transactions`` list is left empty (its totals are
    still counted), for the text view, which does not show it."""
    # What the analysis builds (calls, transactions) is kept to the end and reading makes no
    # reference cycles, so the automatic collector would only scan live objects over and over
    # (about 5% of a run): it is off while the capture is read and reported (as the proxy turns it
    # off between its own collections), and the young generation is collected every GC_EVERY
    # packets, so whatever cycles a packet does leave behind stay bounded.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _analyse(path, engine, mask, progress, spans, max_sip_message, correlation, transactions,
                        call_id_mask)
    finally:
        if enabled:
            gc.enable()


def _analyse(path, engine, mask, progress, spans, max_sip_message, correlation=DEFAULT_CORRELATION,
             transactions=True, call_id_mask=None) -> dict:
    rtp = RtpAnalyzer()
    sdp = SdpBacklog(rtp.add_sdp)
    # no metrics are scraped here: the RTTs come from the transactions, so no RTT ring (nor numpy)
    obs = Observer(stats=Stats(ring_size=0), on_sdp=sdp.add, correlation=correlation)
    if spans is not None:
        obs.sample_ratio = spans.sample_ratio
    counters: dict = {}
    calls, txs, records = [], [], []
    n = 0
    t_start = last_report = time.monotonic()

    def drain():
        for rec in obs.drain_finished():
            kind, obj = rec
            if spans is not None:
                records.append(rec)
            if kind == "call":
                if obj.is_call:
                    calls.append(obj)
            elif obj.key is not None:  # ACK has no response, so no transaction
                txs.append(obj)

    feed, stats = obs.feed, obs.stats
    t_end = None  # the capture's last packet time (open calls end there)
    back, back_max = 0, 0.0  # packets stamped before one already read, and by how much at most
    for ts, src, dst, transport, payload in _source(path, engine, counters, max_sip_message):
        n += 1
        if t_end is None or ts > t_end:
            t_end = ts
        elif ts < t_end - BACKWARDS_TOLERANCE:
            back += 1
            if t_end - ts > back_max:
                back_max = t_end - ts
        try:
            if dst[1] in SIP_PORTS or src[1] in SIP_PORTS or transport == "tcp" \
                    or looks_like_sip(payload):
                if len(payload) <= KEEPALIVE_MAX and is_sip_keepalive(payload):
                    stats.keepalives += 1  # "hello", "jaK", CRLF, STUN: not a parse error
                else:
                    feed(payload, src, dst, ts, transport)
            else:
                if sdp.held:
                    sdp.flush()
                rtp.feed(payload, src, dst, ts)
        except Exception as exc:  # noqa: BLE001 - a bug one packet reaches must not lose the report
            counters["internal_errors"] = counters.get("internal_errors", 0) + 1
            counters.setdefault("internal_error_first", f"{type(exc).__name__}: {exc}"[:200])
        if not n & 0x3FFF:
            drain()
            if not n & (GC_EVERY - 1):
                gc.collect(0)
            now = time.monotonic()
            if progress is not None and now - last_report >= 1.0:
                last_report = now
                progress(f"analyze: {n} packets, {obs.sip_messages} SIP messages, "
                         f"{n / (now - t_start):.0f} packets/s")
    obs.finish(t_end)
    drain()
    counters["time_backwards"], counters["time_backwards_max_s"] = back, back_max
    if rtp.ssrc_churn:  # (said with what the reader could not see)
        counters["rtp_ssrc_churn"] = rtp.ssrc_churn
    rep = _report(path, engine, mask, obs, rtp, counters, calls, txs, n,
                  time.monotonic() - t_start, transactions, call_id_mask)
    if spans is not None:
        from sipwatch.otlp_encode import rtp_figures
        for call in calls:
            got = call.rtp  # the call's streams, which _report left there
            if got or call.t_answer is not None:
                call.rtp = rtp_figures((s["pkts"], s["lost_rfc3550"], s["max_jitter_ms"], s["mos"])
                                       for s in got or ())
        spans.submit(records)
    else:
        # each transaction points at its call and each call lists its transactions: with the
        # lists emptied (the report is built), all of it is freed by reference counting when
        # this returns instead of waiting for a collection that walks every object of the run
        for call in calls:
            call.transactions = []
        for tx in txs:
            tx.call.transactions = []
    return rep


def _hp(addr) -> str:
    ip, port = addr
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _report(path, engine, mask, obs: Observer, rtp: RtpAnalyzer, counters, calls, txs, n,
            elapsed, transactions=True, call_id_mask=None) -> dict:
    stats = obs.stats
    listing, rtts, states = [], [], []
    # a capture has few addresses, methods and URIs and many transactions: each text is made once
    hp: dict = {}  # address → "ip:port"
    decoded: dict = {}  # Call-ID or method bytes → str

    def text(addr) -> str:
        t = hp.get(addr)
        if t is None:
            t = hp[addr] = _hp(addr)
        return t

    tx_state, hp_get = obs.tx_state, hp.get
    if not transactions:  # the totals only
        for tx in txs:
            t_first = tx.t_first
            if t_first is not None:
                rtts.append(round((t_first - tx.t_sent) * 1000.0, 3))
            states.append(tx_state(tx))
        txs = ()
    else:
        txs.sort(key=attrgetter("t_sent"))
    for tx in txs:
        peer = tx.peer
        src, dst = peer[0], peer[1]
        t_first = tx.t_first
        rtt = None if t_first is None else round((t_first - tx.t_sent) * 1000.0, 3)
        if rtt is not None:
            rtts.append(rtt)
        cid = tx.call.call_id
        cid_text = decoded.get(cid)
        if cid_text is None:
            cid_text = decoded[cid] = cid.decode("utf-8", "replace") if call_id_mask is None \
                else call_id_mask(cid)
        method = tx.method
        m_text = decoded.get(method)
        if m_text is None:
            m_text = decoded[method] = method.decode("ascii", "replace")
        listing.append({
            "call_id": cid_text, "method": m_text, "cseq": tx.cseq,
            "src": hp_get(src) or text(src), "dst": hp_get(dst) or text(dst), "time": tx.t_sent, "rtt_ms": rtt,
            "final_status": tx.status or None, "retransmissions": tx.retrans,
            "state": tx_state(tx),
        })
    del decoded
    streams = rtp.summaries()
    by_call: dict = {}
    for s in streams:
        by_call.setdefault(s["call_id"], []).append(s)
    call_out, tied = [], set()
    masked: dict = {}  # URI → masked text (To and Request-URI repeat from call to call)

    def masked_uri(value) -> str:
        t = masked.get(value)
        if t is None:
            t = masked[value] = mask_uri(value, mask)
        return t

    for call in sorted(calls, key=attrgetter("t_start")):
        # the URIs unmasked, then masked through the memo above (the same text mask_uri gives)
        rec = call_summary_fields(call, "none", call_id_mask=call_id_mask)
        rec["from"], rec["to"], rec["request_uri"] = \
            masked_uri(call.from_uri), masked_uri(call.to_uri), masked_uri(call.ruri)
        for tx, row in zip(call.transactions, rec["transactions"]):
            peer = tx.peer  # the hop it was seen on
            row["src"], row["dst"] = hp_get(peer[0]) or text(peer[0]), hp_get(peer[1]) or text(peer[1])
        if call.outcome < 0 and call.ended_by == "eof":
            rec["outcome"] = "unanswered_at_eof"  # still waiting (ringing) when the capture ended
        rec.setdefault("ended_by", call.ended_by)
        # the streams were tied to the Call-ID as captured; shown as the call's own is
        key = call.call_id.decode("utf-8", "replace")
        got = rec["rtp_streams"] = by_call.get(key, [])
        tied.add(key)
        for s in got:
            s["call_id"] = rec["call_sid"]
        call.rtp = got  # (for the spans, which mask on their own)
        call_out.append(rec)
    if call_id_mask is not None:  # streams whose SDP was seen in a call that did not end here
        for key, got in by_call.items():
            if key is not None and key not in tied:
                for s in got:
                    s["call_id"] = call_id_mask(s["call_id"].encode("utf-8"))
    # the totals by outcome are counted from this list, so list, text view and totals agree
    by_outcome = dict.fromkeys(OUTCOMES + ("unanswered_at_eof",), 0)
    for rec in call_out:
        key = rec["outcome"] or "unknown"
        by_outcome[key] = by_outcome.get(key, 0) + 1
    if transactions:
        states = [t["state"] for t in listing]
    return {
        "file": os.path.basename(path),
        "engine": engine,
        "packets": counters.get("frames", n),  # frames read from the file, in both engines
        "decoded_packets": n,  # UDP datagrams and TCP-framed SIP messages decoded from them
        "warnings": capture_warnings(counters, n, obs.sip_messages),
        "seconds": round(elapsed, 3),
        "capture_counters": counters,
        "sip_messages": obs.sip_messages,
        "methods": dict(sorted(obs.methods.items())),
        "status_codes": dict(sorted(obs.statuses.items())),
        "invite_calls": len(obs.invite_call_ids),
        "calls_by_outcome": by_outcome,
        "txn": {
            "transactions": len(states),
            "answered": len(rtts),
            "unanswered": len(states) - len(rtts),
            "timeouts": states.count("timeout"),
            "unanswered_at_eof": states.count("unanswered_at_eof"),
            "retransmitted_requests": stats.request_retransmissions,
            "retransmitted_responses": stats.response_retransmissions,
            "rtt_first_resp_ms_min": min(rtts) if rtts else None,
            "rtt_first_resp_ms_median": round(_median(rtts), 3) if rtts else None,
            "rtt_first_resp_ms_max": max(rtts) if rtts else None,
        },
        "errors": {
            "sip_parse_errors": stats.parse_errors,
            "bad_content_length": obs.bad_content_length,
            "unmatched_responses": obs.unmatched_responses,
            "keepalives": stats.keepalives + counters.get("tcp_keepalives", 0),
            "evicted_transactions": stats.evicted_transactions,
            "not_rtp_udp": rtp.not_rtp,
            "time_backwards": counters.get("time_backwards", 0),
            "time_backwards_max_s": round(counters.get("time_backwards_max_s", 0.0), 6),
        },
        "rtcp_packets": rtp.rtcp_packets,
        "rtp_keepalives": rtp.keepalives,
        "rtp_ssrc_churn": rtp.ssrc_churn,
        "calls": call_out,
        "transactions": listing,
        "rtp_streams": streams,
    }


def _median(values: list) -> float:
    """statistics.median's figure (the mean of the two middle values for an even count), without
    importing statistics (and its fractions/decimal) for one call."""
    v = sorted(values)
    k = len(v) // 2
    return v[k] if len(v) % 2 else (v[k - 1] + v[k]) / 2


def _size(text: str) -> int:
    """``--max-sip-message``: bytes, or with a k/M suffix (1024-based), 1 KiB to 64 MiB."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if not (1 << 10) <= n <= (64 << 20):
        raise argparse.ArgumentTypeError(f"{text!r} is not between 1 KiB and 64 MiB")
    return n


def capture_warnings(counters: dict, decoded: int, sip_messages: int) -> list[str]:
    """What the reader could not see, said loudly: frames of an encapsulation or link type it
    does not decode, SIP messages over the size cap, and a capture with frames but nothing
    decoded from them (never an empty clean result)."""
    out = []
    frames = counters.get("frames", 0)
    undecoded = counters.get("undecoded", 0)
    if undecoded:
        kinds = sorted(counters.get("undecoded_types", {}).items(), key=lambda kv: -kv[1])
        what = ", ".join(f"{k} ({v})" for k, v in kinds[:8]) + (", ..." if len(kinds) > 8 else "")
        out.append(f"warning: {undecoded} of {frames} frames not decoded (encapsulation or link type "
                   f"the fast reader does not open: {what}); SIP inside them is not counted; "
                   f"try --engine pyshark")
    if counters.get("undecodable"):
        out.append(f"warning: {counters['undecodable']} frames tshark matched could not be converted")
    bugs = counters.get("internal_errors", 0)
    if bugs:
        out.append(f"warning: {bugs} packets reached an internal error and were skipped (the first: "
                   f"{counters.get('internal_error_first')}); the rest were analysed")
    cut = counters.get("truncated", 0)
    if cut and decoded:
        out.append(f"warning: {cut} frames or records cut short (a capture length, a damaged or "
                   f"unfinished file): what they carried is not counted")
    frags, flows = counters.get("fragments_dropped", 0), counters.get("tcp_flows_dropped", 0)
    if frags or flows:
        out.append(f"warning: reassembly given up for {frags} fragmented datagrams (more than "
                   f"{MAX_FRAG_PARTS} fragments, or more than {MAX_FRAG_SETS} unfinished, or past {MAX_FRAG_BYTES >> 20} MB held) "
                   f"and {flows} TCP connections (past {MAX_TCP_HELD >> 20} MB held, or {MAX_TCP_FLOWS} "
                   f"connections open); SIP in them may be missing")
    # what was counted and not seen, one line each (the count first)
    moved = counters.get("tcp_resyncs", 0) + counters.get("tcp_stream_switches", 0)
    for n, what in (
            (counters.get("tcp_gaps", 0), "holes in TCP streams were never filled (bytes the capture "
                                          "missed); SIP messages across them are missing"),
            (moved, "times a TCP stream was found elsewhere than expected (a connection opened again "
                    "without its close captured, a forged SYN or segment, or more than a window lost); "
                    "messages around it may be missing"),
            (counters.get("rtp_ssrc_churn", 0), f"RTP packets started new SSRCs past {RtpAnalyzer.CHURN_MAX} "
                                                f"on one media flow within {RtpAnalyzer.CHURN_WINDOW:g} s: "
                                                f"counted, not analysed as streams"),
            (counters.get("sip_oversized", 0), "SIP messages over TCP larger than --max-sip-message were skipped"),
            (counters.get("time_backwards", 0),
             f"packets were stamped more than {BACKWARDS_TOLERANCE * 1000:g} ms earlier than a packet before them "
             f"(up to {counters.get('time_backwards_max_s', 0.0):.3f} s back: a capture merged from clocks that "
             f"disagree, or a clock stepped back while capturing); times across them are not to be trusted "
             f"(a response stamped before its request is taken at its request: RTT 0)")):
        if n:
            out.append(f"warning: {n} {what}")
    if frames and not decoded and not undecoded:
        kinds = sorted(counters.get("non_ip_types", {}).items(), key=lambda kv: -kv[1])
        kinds += [(k, counters[k]) for k in ("truncated", "bad_ip", "other_ip_proto") if counters.get(k)]
        what = ", ".join(f"{k} ({v})" for k, v in kinds[:8]) or "nothing decodable"
        out.append(f"warning: {frames} frames but no UDP or SIP/TCP decoded from them: {what}")
    elif frames and not sip_messages and counters.get("tcp_non_sip_flows"):
        out.append(f"warning: no SIP found; {counters['tcp_non_sip_flows']} TCP connections did not "
                   f"speak SIP (TLS?)")
    return out


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(rep: dict) -> str:
    """Readable per-call table plus totals."""
    out = [f"{rep['file']}: {rep['packets']} packets, {rep['sip_messages']} SIP messages, "
           f"{len(rep['calls'])} calls, {len(rep['rtp_streams'])} RTP streams"]
    out.extend(rep.get("warnings", ()))
    # (one string per call and per transaction line, "-" for no figure: a few thousand calls)
    for c in rep["calls"]:
        setup, answer, duration = c["setup_ms"], c["answer_ms"], c["duration_s"]
        out.append(f"\nCall {c['call_sid']}\n  from {c['from']}  to {c['to']}\n"
                   f"  outcome {c['outcome']} ({c['final_status'] or '-'})  setup "
                   f"{'-' if setup is None else f'{setup:.3f}'} ms  answer "
                   f"{'-' if answer is None else f'{answer:.3f}'} ms  duration "
                   f"{'-' if duration is None else f'{duration:.3f}'} s  retransmissions {c['retransmissions']}")
        for t in c["transactions"]:
            rtt = t["rtt_ms"]
            out.append(f"    {t['method']:<9} {t['cseq']:>5}  {t['src']} -> {t['dst']}  status "
                       f"{t['status'] or '-':<4} rtt {'-' if rtt is None else f'{rtt:.3f}':>9} ms  retrans "
                       f"{t['retransmissions']}{'  TIMEOUT' if t['timed_out'] else ''}")
        if c.get("legs"):
            out.append(f"  leg {c['leg']} of {len(c['legs'])} of call {c['correlation_id']}"
                       + (f" (joined by {c['correlated_by']}, B2BUA leg setup {_f(c['b2bua_leg_setup_ms'])} ms)"
                          if c.get("correlated_by") else ""))
        for s in c["rtp_streams"]:
            out.append(_stream_line(s, "    RTP "))
    other = [s for s in rep["rtp_streams"] if s["call_id"] is None]
    if other:
        out.append("")
        out.append("RTP streams without signalling in the capture")
        out.extend(_stream_line(s, "    RTP ") for s in other)
    t = rep["txn"]
    out.append("")
    out.append("Totals")
    out.append("  SIP requests: " + (", ".join(f"{k} {v}" for k, v in rep["methods"].items())
                                      or "none"))
    out.append("  SIP responses: " + (", ".join(f"{k} {v}" for k, v in
                                                rep["status_codes"].items()) or "none"))
    out.append(f"  Calls {len(rep['calls'])}" + "".join(
        f"{', ' if i else ': '}{k.replace('_', ' ')} {v}"
        for i, (k, v) in enumerate((k, v) for k, v in rep["calls_by_outcome"].items() if v)))
    out.append(f"  INVITE calls {rep['invite_calls']}; transactions {t['transactions']}, "
               f"answered {t['answered']}, timeouts {t['timeouts']}, unanswered at end of "
               f"capture {t['unanswered_at_eof']}, retransmitted requests "
               f"{t['retransmitted_requests']}, responses {t['retransmitted_responses']}")
    out.append(f"  RTT ms min/median/max {_f(t['rtt_first_resp_ms_min'])} / "
               f"{_f(t['rtt_first_resp_ms_median'])} / {_f(t['rtt_first_resp_ms_max'])}")
    e = rep["errors"]
    out.append(f"  SIP parse errors {e['sip_parse_errors']}, bad Content-Length "
               f"{e['bad_content_length']}, unmatched responses {e['unmatched_responses']}, "
               f"RTCP packets {rep['rtcp_packets']}, RTP keep-alives {rep['rtp_keepalives']}")
    # Call-IDs, display names and codec names come from the capture: no terminal controls
    return terminal_safe("\n".join(out) + "\n")


def _stream_line(s: dict, prefix: str) -> str:
    return (f"{prefix}{s['ssrc']} {s['src']} -> {s['dst']} {s['payload']}  pkts {s['pkts']} "
            f"lost {s['lost']} ({s['lost_pct']}%)  max delta {s['max_delta_ms']} ms  jitter "
            f"mean/max {s['mean_jitter_ms']}/{s['max_jitter_ms']} ms  MOS {_f(s['mos'], '{}')}")


def exports_spans(args, env) -> bool:
    """Whether spans go anywhere: a spans file or an OTLP endpoint from a flag or OTEL_* (the
    cases in which :meth:`sipwatch.tracing.SpanPipeline.for_capture` builds a pipeline)."""
    return bool(args.spans_file or args.otlp_endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sipwatch analyze", description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    ap.add_argument("--engine", choices=("fast", "pyshark"), default="fast",
                    help="fast: built-in pcap/pcapng reader (default); pyshark: tshark dissectors")
    ap.add_argument("--mask-numbers", choices=MODES, default="partial")
    ap.add_argument("--max-sip-message", type=_size, default=MAX_SIP_MESSAGE, metavar="BYTES",
                    help="largest SIP message framed over TCP (default 1 MiB); larger ones are "
                         "skipped and counted (sip_oversized)")
    add_call_id_mask_arguments(ap)
    add_correlation_argument(ap)
    add_otlp_arguments(ap)
    args = ap.parse_args(argv)
    if not os.path.isfile(args.file) or not os.access(args.file, os.R_OK):
        sys.stderr.write(f"sipwatch analyze: cannot read {args.file!r}\n")
        return 2

    def progress(line: str) -> None:
        sys.stderr.write(line + "\n")

    from .pcapfile import PcapError
    from sipwatch.config import ConfigError, call_id_masker
    try:  # the report shows Call-IDs as the spans (and the sidecar's logs) do
        call_id_mask = call_id_masker(args)
    except ConfigError as exc:
        sys.stderr.write(f"sipwatch analyze: error: {exc}\n")
        return 2
    stats = Stats(ring_size=0)  # the span pipeline's counters
    spans = None
    if exports_spans(args, os.environ):  # the exporters (OpenTelemetry SDK) only when needed
        from sipwatch.tracing import SpanPipeline

        # every record is held until the end anyway: no queue limit, and time to export them all
        spans = SpanPipeline.for_capture("analyze", stats, args.otlp_endpoint, args.otlp_protocol,
                                         args.spans_file, args.mask_numbers, queue_max=1 << 62,
                                         call_id_mask=call_id_mask)
    # what the imports built lives as long as this process: kept out of every collection
    gc.freeze()
    try:
        rep = analyse(args.file, args.engine, args.mask_numbers, progress, spans,
                      args.max_sip_message, args.correlation_headers, transactions=args.json,
                      call_id_mask=None if call_id_mask.mode == "none" else call_id_mask)
    except (PcapError, OSError) as exc:
        sys.stderr.write(f"sipwatch analyze: {args.file}: {exc}\n")
        return 2
    except RuntimeError as exc:  # the pyshark worker failed (tshark missing, unreadable file)
        sys.stderr.write(f"sipwatch analyze: {args.engine} engine: {exc}\n")
        return 1
    finally:
        if spans is not None:
            spans.shutdown(ANALYZE_EXPORT_TIMEOUT)
    if spans is not None:
        sys.stderr.write(f"analyze: spans exported {stats.spans_exported}, dropped "
                         f"{stats.spans_dropped}\n")
    if args.json:
        import orjson

        # orjson: a quarter of the run time went into json.dumps on an all-SIP capture
        sys.stdout.buffer.write(orjson.dumps(rep, default=str, option=orjson.OPT_INDENT_2
                                             | orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE))
        sys.stdout.flush()
    else:
        sys.stdout.write(render(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
