"""Every recorded fixture replayed through a live sidecar: the sidecar's metrics must match what
tshark reads from the capture (the hop between the gateway and its peer).

Counts must be exact. RTT sums are compared per method with a band per transaction of
[-0.2 ms, +25 ms] around tshark's recorded RTT divided by the replay speed: the replay sends each
response the scaled recorded delay after the request really arrived, so the sidecar cannot see it
sooner (the -0.2 ms covers rounding to 3 decimals and the two processes' clocks). It sees it later
by the replay's receive/parse/rewrite/send in Python and the scheduler wake-up: 0.3-1 ms on an
idle machine, 10+ ms seen on a loaded one. The upper bound only catches gross errors (timing from
the wrong copy or transaction is off by the recorded gaps); per-transaction precision is checked
against tshark without timers in the analysis tests.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from capture.replay import load
from capture.tshark_facts import have_tshark, sip_stat
from harness import ROOT, Sidecar, free_port, metric

pytestmark = [pytest.mark.tshark, pytest.mark.skipif(not have_tshark(), reason="needs tshark")]

PCAPS = ROOT / "pcaps"
FIXTURES = sorted(p.stem for p in PCAPS.glob("*.pcap"))
OUTCOME = {"cancel_487": "cancelled", "reject_486": "rejected_4xx", "reject_503": "rejected_5xx"}
RTT_LOW_MS, RTT_HIGH_MS = -0.2, 25.0
MAX_REPLAY_S = 2.0  # faster than real time for the fixtures whose calls are held longer


def replay(pcap: Path, sidecar: Sidecar, upstream: int, speed: float, *extra: str):
    p = subprocess.run([sys.executable, "-m", "sipwatch", "replay", str(pcap), "--to", f"127.0.0.1:{sidecar.port}",
                        "--bind", f"127.0.0.1:{upstream}", "--speed", str(speed), "--json", *extra],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    return p.returncode, (json.loads(p.stdout) if p.stdout.startswith("{") else {}), p.stderr


def hop_filter(gateway: str) -> str:
    port = gateway.rsplit(":", 1)[1]
    return f"udp.port=={port} or tcp.port=={port}"


@pytest.mark.parametrize("name", FIXTURES)
def test_replayed_fixture_matches_tshark(tmp_path, name):
    pcap = PCAPS / f"{name}.pcap"
    facts = json.loads((PCAPS / f"{name}.facts.json").read_text())
    gw = facts["fixture"]["gateway"]
    gw_port = gw.rsplit(":", 1)[1]
    # ground truth for the gateway's hop, from tshark only
    _, methods, codes = sip_stat(str(pcap), hop_filter(gw))
    _, methods_from_gw, _ = sip_stat(str(pcap), f"udp.srcport=={gw_port} or tcp.srcport=={gw_port}")
    hop_txs = [t for t in facts["transactions_list"] if gw in (t["src"], t["dst"])]
    assert hop_txs and all(t["rtt_ms"] is not None for t in hop_txs)

    recs = load(str(pcap), gw).recs
    speed = max(1.0, round((recs[-1].ts - recs[0].ts) / MAX_REPLAY_S, 1))
    upstream = free_port()
    with Sidecar(tmp_path, upstream) as sc:
        rc, summary, err = replay(pcap, sc, upstream, speed)
        assert rc == 0, (err, summary.get("missing"))
        gw_m = sc.gateway()
        sig_m = sc.signaling()

    assert summary["unexpected"] == {"gateway": 0, "signaling": 0}
    for m, n in methods.items():
        assert metric(gw_m, "sip_requests_total", method=m) == n, m
        assert metric(gw_m, "sip_requests_total", method=m, direction="from_gateway") == methods_from_gw.get(m, 0), m
    assert metric(gw_m, "sip_requests_total") == sum(methods.values())
    by_class = Counter()
    for code, n in codes.items():
        by_class[f"{code[0]}xx"] += n
    for cls in ("1xx", "2xx", "3xx", "4xx", "5xx", "6xx"):
        assert metric(gw_m, "sip_responses_total", status_class=cls) == by_class[cls], cls
    assert metric(gw_m, "sip_retransmissions_total", kind="request") == facts["txn"]["retransmitted_requests"]
    assert metric(gw_m, "sip_parse_errors_total") == 0

    n_calls = len({t["call_id"] for t in hop_txs if t["method"] == "INVITE"})
    assert n_calls == facts["invite_calls"]
    assert metric(gw_m, "sip_calls_processed_total") == n_calls
    assert metric(gw_m, "sip_calls_processed_total", outcome=OUTCOME.get(name, "answered")) == n_calls

    per_method = defaultdict(list)
    for t in hop_txs:
        per_method[t["method"]].append(t["rtt_ms"])
    for m, rtts in per_method.items():
        n = len(rtts)
        assert metric(sig_m, "signaler_rtt_milliseconds_count", method=m) == n, m
        want = sum(rtts) / speed
        got = metric(sig_m, "signaler_rtt_milliseconds_sum", method=m)
        assert want + RTT_LOW_MS * n <= got <= want + RTT_HIGH_MS * n, (m, got, want, speed)
    assert metric(sig_m, "signaler_rtt_milliseconds_count") == len(hop_txs)


def test_replay_fails_when_the_sidecar_does_not_route_to_it(tmp_path):
    """Negative control: with the sidecar's upstream elsewhere, no response can come back."""
    pcap = PCAPS / "options_keepalive.pcap"
    with Sidecar(tmp_path, free_port()) as sc:
        rc, summary, _ = replay(pcap, sc, free_port(), 5.0, "--grace", "0.5")
    assert rc == 1
    assert len(summary["missing"]) == 10  # 5 OPTIONS never reached us, 5 200 OK never sent back
    assert summary["sent"] == {"gateway": 5, "signaling": 0}
