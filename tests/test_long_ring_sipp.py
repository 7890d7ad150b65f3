"""Live: a call that rings 40 s through a real sidecar is answered, not a timeout (takes ~45 s).

A SIPp callee answers 100 and 180 at once and 200 OK 40 s later, past Timer B (32 s); the proxy
must run Timer C after the provisional (RFC 3261 §16.6 step 11). Ground truth: SIPp's own call
counts and the INVITE/200 times the callee's SIPp logged; the sidecar's metrics and call summary
must agree. Before Timer C the sidecar counted this call as a timeout at 32 s and its 200 OK as
a response to nothing.
"""
from __future__ import annotations

import time

import pytest

from harness import HAVE_SIPP, Sidecar, free_port, metric, run_call_pair

RING_MS = 40_000

pytestmark = [pytest.mark.sipp, pytest.mark.long, pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp")]


def test_call_ringing_40s_is_answered_in_the_sidecars_metrics_takes_45s(tmp_path):
    uas_port = free_port()
    with Sidecar(tmp_path, uas_port) as sc:
        uac_rc, uas_rc, caller, callee = run_call_pair(
            tmp_path, "uac_call", "uas_long_ring", sc.port, uas_port, calls=1, rate=1,
            uac_extra=("-d", "300", "-mp", str(free_port())),
            uas_extra=("-d", str(RING_MS), "-mp", str(free_port()),
                       "-set", "rtp_port", str(free_port())),
            timeout=90)
        assert (uac_rc, uas_rc) == (0, 0), caller.errors() + callee.errors()
        st = caller.stat()
        assert st.get("SuccessfulCall(C)") == "1" and st.get("FailedCall(C)") == "0", st
        gw = sc.wait_for(lambda s: metric(s, "sip_calls_processed_total") >= 1
                         and metric(s, "sip_active_calls") == 0, timeout=15)
        sig = sc.signaling()
        summaries: list = []
        for _ in range(100):  # the summary is written by the housekeeping tick, off the hot path
            summaries = [r for r in sc.logs() if r.get("event") == "call_summary"]
            if summaries:
                break
            time.sleep(0.1)
    assert metric(gw, "sip_calls_processed_total", outcome="answered") == 1
    assert metric(gw, "sip_calls_processed_total", outcome="timeout") == 0
    assert metric(gw, "sip_calls_processed_total") == 1
    assert metric(sig, "sip_transaction_timeouts_total") == 0
    # the 200 OK matched its INVITE: not a stray and not a retransmission of anything
    assert metric(gw, "sip_retransmissions_total", kind="response") == 0
    assert len(summaries) == 1
    s = summaries[0]
    assert s["outcome"] == "answered" and s["final_status"] == 200
    # answered about RING_MS after the INVITE (SIPp's pause; the loaded machine only adds)
    assert RING_MS - 5 <= s["answer_ms"] < RING_MS + 10_000  # SIPp times its pause on a coarse ms clock
    assert s["setup_ms"] < RING_MS  # the 180 came first
