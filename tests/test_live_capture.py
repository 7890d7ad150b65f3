"""Live capture on loopback while SIPp calls run through the sidecar: the capture, watching the
sidecar's signaling hop (sidecar <-> callee), must count what the proxy counts and measure the
same RTTs.

RTT band per transaction, from cause and effect rather than from how busy the machine is. The
proxy's clock starts after the gateway's request reached it and before the forwarded copy left;
it stops after the response reached it and before the relayed copy left. So its RTT lies between
the RTT on the wire of the hop behind it (what the capture measures) and the RTT on the wire of
the hop in front of it (gateway <-> sidecar, read by tshark from a parallel dumpcap). 0.5 ms per
transaction allows for the two clocks (the proxy's is monotonic-based, the wire's wall time).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import orjson
import pytest

from capture.record_fixtures import Dumpcap
from capture.tshark_facts import facts
from harness import HAVE_SIPP, ROOT, Sidecar, free_port, metric, run_call_pair, scrape, stop_process

pytestmark = [pytest.mark.sipp, pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp"),
              pytest.mark.skipif(shutil.which("dumpcap") is None or shutil.which("tshark") is None,
                                 reason="needs dumpcap and tshark")]

N = 12
CLOCKS_MS = 0.5


class Capture:
    def __init__(self, workdir, bpf: str, signaling: str):
        self.gw, self.sig = free_port(), free_port()
        self.log = workdir / "capture.log"
        self.args = [sys.executable, "-m", "sipwatch", "capture", "--interface", "lo", "--bpf", bpf,
                     "--signaling", signaling, "--gateway-metrics", f"127.0.0.1:{self.gw}",
                     "--signaling-metrics", f"127.0.0.1:{self.sig}"]

    def __enter__(self):
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 15
        while b'"capturing"' not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"capture did not start: {self.log.read_text()}")
            time.sleep(0.05)
        return self

    def stop(self) -> int:
        rc = stop_process(self.proc, signal.SIGINT)
        self._out.close()
        return rc

    def __exit__(self, *exc):
        self.stop()

    def events(self) -> list[dict]:
        return [orjson.loads(l) for l in self.log.read_bytes().splitlines() if l.startswith(b"{")]


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_capture_and_proxy_agree_on_the_signaling_hop(tmp_path):
    uas_port = free_port()
    front = tmp_path / "gateway_hop.pcap"
    with Sidecar(tmp_path, uas_port) as sc, \
            Capture(tmp_path, f"udp port {uas_port}", f"127.0.0.1:{uas_port}") as cap, \
            Dumpcap(front, f"udp port {sc.port} and not udp port {uas_port}"):
        uac_rc, uas_rc, uac, uas = run_call_pair(tmp_path, "uac_call", "uas_call", sc.port, uas_port, N,
                                                 rate=20, uas_extra=("-d", "15"))
        assert (uac_rc, uas_rc) == (0, 0), uac.errors() + uas.errors()
        _wait(lambda: metric(scrape(cap.gw), "sip_call_duration_seconds_count") >= N
              and metric(sc.gateway(), "sip_call_duration_seconds_count") >= N)
        p_gw, p_sig = sc.gateway(), sc.signaling()
        c_gw, c_sig = scrape(cap.gw), scrape(cap.sig)
        assert cap.stop() == 0
    front_txs = facts(str(front))["transactions_list"]  # tshark: the gateway <-> sidecar hop
    # what the proxy saw is what the capture saw on the hop behind it
    for m in ("INVITE", "ACK", "BYE"):
        n = metric(p_gw, "sip_requests_total", method=m, direction="from_gateway")
        assert n == N
        assert metric(c_gw, "sip_requests_total", method=m, direction="from_gateway") == n, m
        assert metric(c_gw, "sip_requests_total", method=m, direction="from_signaling") == 0, m
    for cls in ("1xx", "2xx", "4xx", "5xx"):
        assert metric(c_gw, "sip_responses_total", status_class=cls, direction="from_signaling") == \
            metric(p_gw, "sip_responses_total", status_class=cls, direction="from_signaling"), cls
    assert metric(c_gw, "sip_responses_total", status_class="2xx", direction="from_signaling") == 2 * N
    assert metric(c_gw, "sip_calls_processed_total", outcome="answered") == \
        metric(p_gw, "sip_calls_processed_total", outcome="answered") == N
    assert metric(c_gw, "sip_call_duration_seconds_count") == N
    for m in ("INVITE", "BYE"):
        n = metric(p_sig, "signaler_rtt_milliseconds_count", method=m)
        assert n == N
        assert metric(c_sig, "signaler_rtt_milliseconds_count", method=m) == n
        proxy = metric(p_sig, "signaler_rtt_milliseconds_sum", method=m)
        capture = metric(c_sig, "signaler_rtt_milliseconds_sum", method=m)
        in_front = [t["rtt_ms"] for t in front_txs if t["method"] == m]
        assert len(in_front) == n and None not in in_front, m
        assert capture - CLOCKS_MS * n <= proxy <= sum(in_front) + CLOCKS_MS * n, \
            (m, capture, proxy, sum(in_front))
    # the callee waited 15 ms before answering each INVITE: both clocks must see it
    assert metric(c_sig, "signaler_rtt_milliseconds_sum", method="INVITE") >= (15 - 5) * N  # SIPp: ms clock
    assert metric(c_sig, "signaler_rtt_milliseconds_bucket", method="INVITE", le="10.0") == 0
    stopped = [e for e in cap.events() if e.get("event") == "stopped"]
    assert stopped and stopped[0]["sip"] == 7 * N


def test_capture_sees_both_hops_without_a_filter_on_one(tmp_path):
    """Unfiltered, loopback shows gateway->sidecar and sidecar->callee: every request twice."""
    uas_port = free_port()
    with Sidecar(tmp_path, uas_port) as sc:
        with Capture(tmp_path, f"udp port {uas_port} or udp port {sc.port}", f"127.0.0.1:{uas_port}") as cap:
            uac_rc, uas_rc, uac, uas = run_call_pair(tmp_path, "uac_options", "uas_options", sc.port, uas_port, 5, rate=20)
            assert (uac_rc, uas_rc) == (0, 0), uac.errors() + uas.errors()
            _wait(lambda: metric(scrape(cap.sig), "signaler_rtt_milliseconds_count", method="OPTIONS") >= 10)
            c_gw, c_sig = scrape(cap.gw), scrape(cap.sig)
    assert metric(c_gw, "sip_requests_total", method="OPTIONS") == 10
    assert metric(c_gw, "sip_responses_total", status_class="2xx", direction="from_signaling") == 5
    assert metric(c_gw, "sip_responses_total", status_class="2xx", direction="from_gateway") == 5
    assert metric(c_sig, "signaler_rtt_milliseconds_count", method="OPTIONS") == 10
