"""Issue 8 item 6, with real SIPp peers: a sidecar killed and restarted on the same address still
carries the calls set up through the one before it.

The callee (behind the sidecar, on the signaling side) hangs up after the restart. Its BYE follows
the Record-Route the first sidecar wrote, towards a gateway the new sidecar has never heard from:
only the signed Record-Route lets it through, so the same run with another secret must fail.
"""
from __future__ import annotations

import signal
import time

import pytest

from harness import HAVE_SIPP, Sidecar, Sipp, free_port, metric

pytestmark = [pytest.mark.sipp, pytest.mark.skipif(not HAVE_SIPP, reason="SIPp not installed")]

CALLS = 10
HOLD_MS = 5000


def _sidecar_on(tmp_path, port: int, uas_port: int, secret: str) -> Sidecar:
    sc = Sidecar(tmp_path, uas_port, env={"SIPWATCH_SECRET": secret})
    sc.port = port
    sc.args[sc.args.index("--listen") + 1] = f"127.0.0.1:{port}"
    return sc


def _calls_then_restart(tmp_path, second_secret: str, refused: bool = False):
    """With ``refused``, the callee gives its refused BYE up after one retransmission (not
    SIPp's seven, ~20 s) and the caller, whose BYE never comes, is not waited for."""
    uas_port = free_port()
    first = _sidecar_on(tmp_path / "a", free_port(), uas_port, "restart-test-key")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    retrans = ("-max_non_invite_retrans", "1") if refused else ()
    callee = Sipp(tmp_path, "uas_hangup_later", uas_port, None, CALLS, None, "-d", str(HOLD_MS), *retrans).start()
    time.sleep(0.3)
    with first:
        caller = Sipp(tmp_path, "uac_answer_bye", free_port(), first.port, CALLS, 20).start()
        answered = first.wait_for(
            lambda s: metric(s, "sip_calls_processed_total", outcome="answered") >= CALLS, timeout=20)
        assert metric(answered, "sip_calls_processed_total", outcome="answered") == CALLS
        first.proc.send_signal(signal.SIGKILL)  # a crash: no drain, nothing flushed
        first.proc.wait()
    second = _sidecar_on(tmp_path / "b", first.port, uas_port, second_secret)
    with second:
        try:
            if refused:
                uas_rc = callee.wait(HOLD_MS / 1000 + 30)
                uac_rc = None
            else:
                uac_rc = caller.wait(HOLD_MS / 1000 + 30)
                uas_rc = callee.wait(15)
        finally:
            caller.kill()
            callee.kill()
        samples = second.gateway()
    return uac_rc, uas_rc, caller, callee, samples


def test_calls_survive_a_restart_with_the_same_secret(tmp_path):
    uac_rc, uas_rc, caller, callee, samples = _calls_then_restart(tmp_path, "restart-test-key")
    assert (uac_rc, uas_rc) == (0, 0), callee.errors() + caller.errors()
    assert int(callee.stat()["SuccessfulCall(C)"]) == CALLS
    assert int(caller.stat()["SuccessfulCall(C)"]) == CALLS
    # every BYE went through the new sidecar, from the signaling side, and none was refused
    assert metric(samples, "sip_requests_total", method="BYE", direction="from_signaling") == CALLS
    assert metric(samples, "sip_dropped_total", reason="next_hop_denied") == 0


def test_without_the_secret_the_same_bye_is_refused(tmp_path):
    uac_rc, uas_rc, caller, callee, samples = _calls_then_restart(tmp_path, "another-key", refused=True)
    assert metric(samples, "sip_dropped_total", reason="next_hop_denied") >= CALLS
    assert uas_rc != 0 and int(callee.stat().get("FailedCall(C)", 0)) >= 1
