"""Issue 8 item 6 with real SIPp peers: SIGTERM drains instead of dropping the calls on the node.

Ground truth is what the peers saw: SIPp's own call counters (a BYE that found no sidecar fails
the caller's call) and the bytes a plain UDP socket got back for a new INVITE.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from harness import HAVE_SIPP, Sidecar, Sipp, free_port, metric

pytestmark = [pytest.mark.sipp, pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp (Debian sip-tester)")]

CALLS = 10


def _invite(port: int, call_id: str, sidecar_port: int) -> bytes:
    return (f"INVITE sip:service@127.0.0.1:{sidecar_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-drain-{call_id}\r\n"
            f"From: <sip:+4930555000@127.0.0.1:{port}>;tag=t-{call_id}\r\n"
            f"To: <sip:service@127.0.0.1:{sidecar_port}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
            f"Contact: <sip:x@127.0.0.1:{port}>\r\nContent-Length: 0\r\n\r\n").encode()


def _new_invite_answer(sidecar_port: int, call_id: str) -> bytes:
    """Send one new INVITE from a plain socket; return the first final response (or b'')."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.5)
        port = s.getsockname()[1]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # retransmit like a UAC would (bounded)
            s.sendto(_invite(port, call_id, sidecar_port), ("127.0.0.1", sidecar_port))
            try:
                while True:
                    data, _ = s.recvfrom(65535)
                    if not data.startswith(b"SIP/2.0 1"):
                        return data
            except (TimeoutError, socket.timeout):
                continue
    return b""


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _held_calls(tmp_path, sc: Sidecar, uas_port: int, hold_ms: int):
    callee = Sipp(tmp_path, "uas_call", uas_port, None, CALLS, None).start()
    time.sleep(0.3)
    caller = Sipp(tmp_path, "uac_call", free_port(), sc.port, CALLS, 20, "-d", str(hold_ms)).start()
    gw = sc.wait_for(lambda s: metric(s, "sip_active_calls") >= CALLS, timeout=20)
    assert metric(gw, "sip_active_calls") == CALLS, caller.errors()
    return caller, callee


def _http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_sigterm_drains_held_calls_and_rejects_new_ones_with_503(tmp_path):
    uas_port = free_port()
    sc = Sidecar(tmp_path, uas_port, env={"SIPWATCH_DRAIN_TIMEOUT": "30"})
    with sc:
        caller, callee = _held_calls(tmp_path, sc, uas_port, hold_ms=6000)
        try:
            sc.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert sc.proc.poll() is None, "the sidecar exited at SIGTERM with calls in progress"
            # a new call during the drain is turned away so that the gateway fails over
            answer = _new_invite_answer(sc.port, "new-during-drain@test")
            rejected = sc.gateway()
            # readiness says draining (out of rotation), liveness stays green (no restart)
            ready = _http_status(sc.sig_metrics, "/readyz")
            alive = _http_status(sc.sig_metrics, "/healthz")
            uac_rc, uas_rc = caller.wait(60), callee.wait(20)
        finally:
            caller.kill()
            callee.kill()
        rc = _wait_exit(sc.proc, 30)
        logs = sc.logs()
    # every held call completed normally through the draining sidecar
    assert (uac_rc, uas_rc) == (0, 0), caller.errors() + callee.errors()
    assert int(caller.stat()["SuccessfulCall(C)"]) == CALLS
    assert int(caller.stat()["FailedCall(C)"]) == 0
    # ... then the sidecar left by itself, cleanly, and wrote every call's summary
    assert rc == 0
    summaries = [r for r in logs if r.get("event") == "call_summary"]
    assert len(summaries) == CALLS and all(r["outcome"] == "answered" for r in summaries)
    assert all(r.get("ended_by") in (None, "bye") for r in summaries)
    events = [r.get("event") for r in logs]
    assert "drain_started" in events and "drain_finished" in events
    finished = next(r for r in logs if r.get("event") == "drain_finished")
    assert finished["reason"] == "drained" and finished["open_calls"] == 0
    # the new INVITE got 503 with Retry-After (needs the core's drain answer)
    assert answer.startswith(b"SIP/2.0 503 "), answer[:80]
    assert b"\r\nRetry-After: " in answer
    assert metric(rejected, "sip_drain_rejected_total") >= 1
    assert (ready, alive) == (503, 200)


def test_drain_timeout_writes_open_calls_as_ended_by_shutdown(tmp_path):
    uas_port = free_port()
    sc = Sidecar(tmp_path, uas_port, env={"SIPWATCH_DRAIN_TIMEOUT": "1"})
    with sc:
        caller, callee = _held_calls(tmp_path, sc, uas_port, hold_ms=60000)
        try:
            sc.proc.send_signal(signal.SIGTERM)
            rc = _wait_exit(sc.proc, 20)
        finally:
            caller.kill()
            callee.kill()
        logs = sc.logs()
    assert rc == 0
    summaries = [r for r in logs if r.get("event") == "call_summary"]
    assert len(summaries) == CALLS
    assert all(r["ended_by"] == "shutdown" and r["outcome"] == "answered" for r in summaries)
    finished = next(r for r in logs if r.get("event") == "drain_finished")
    assert finished["reason"] == "drain_timeout" and finished["open_calls"] == CALLS


def test_second_sigterm_stops_at_once(tmp_path):
    uas_port = free_port()
    sc = Sidecar(tmp_path, uas_port, env={"SIPWATCH_DRAIN_TIMEOUT": "600"})
    with sc:
        caller, callee = _held_calls(tmp_path, sc, uas_port, hold_ms=60000)
        try:
            sc.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert sc.proc.poll() is None  # draining: 600 s to go
            sc.proc.send_signal(signal.SIGTERM)
            rc = _wait_exit(sc.proc, 30)  # far below the drain timeout
        finally:
            caller.kill()
            callee.kill()
        logs = sc.logs()
    assert rc == 0
    summaries = [r for r in logs if r.get("event") == "call_summary"]
    assert len(summaries) == CALLS and all(r["ended_by"] == "shutdown" for r in summaries)
    assert any(r.get("event") == "drain_aborted" for r in logs)
