"""End to end on loopback: SIPp calls through real sidecars, a real Prometheus scraping them with
deploy/prometheus's rules, a real Alertmanager with deploy/alertmanager's routing and inhibition.

Two sidecars carry calls at the same time: behind "slow" the callee delays its first response by
300 ms (SIPp ``-d 300`` before 100 Trying in uas_call.xml), behind "fast" it answers at once.
Only the ``for:`` durations (fast_rules) and Alertmanager's grouping timers (fast_alertmanager)
are shortened; expressions, labels, routes and inhibition rules are the shipped ones.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness import HAVE_SIPP, Sidecar, Sipp, free_port
from promstack import (
    ALERT_RULES, ALERTMANAGER_CONFIG, RECORDING_RULES, Alertmanager, Prometheus, WebhookReceiver,
    fast_alertmanager, fast_rules, render_alertmanager_config, require_binaries, scrape_config, wait_until,
)

missing = require_binaries()
pytestmark = [pytest.mark.prometheus, pytest.mark.sipp,
              pytest.mark.skipif(missing is not None, reason=missing or ""),
              pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp (Debian sip-tester)")]

FOR = "3s"
CALL_RATE = 10  # calls/s per sidecar: the rules' traffic guard wants more than 0.05/s
LABELS = {"node": "lab-node-1", "service": "sip-signaling"}


class Leg:
    """One sidecar with a SIPp callee behind it and a SIPp caller in front, calling until stopped."""

    def __init__(self, workdir: Path, name: str, uas_delay_ms: int):
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir()
        self.uas_port = free_port()
        self.sidecar = Sidecar(self.dir, self.uas_port)
        self.uas_delay_ms = uas_delay_ms
        self.uas = self.uac = None

    def start(self):
        try:
            self.sidecar.__enter__()
            self.uas = Sipp(self.dir, "uas_call", self.uas_port, None, 100000, None,
                            "-d", str(self.uas_delay_ms)).start()
            time.sleep(0.2)
            self.uac = Sipp(self.dir, "uac_call", free_port(), self.sidecar.port, 100000, CALL_RATE).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop_sidecar(self):
        self.sidecar.stop()

    def stop(self):
        for s in (self.uac, self.uas):
            if s is not None:
                s.kill()
        self.sidecar.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    wd = tmp_path_factory.mktemp("alert-e2e")
    legs = {}
    with WebhookReceiver() as hooks:
        am_cfg = fast_alertmanager(render_alertmanager_config(
            ALERTMANAGER_CONFIG.read_text(), hooks.url + "/critical", hooks.url + "/warning"))
        try:
            legs["slow"] = Leg(wd, "slow", 300).start()
            legs["fast"] = Leg(wd, "fast", 0).start()
            scrapes = [
                scrape_config("sipwatch-gateway", {f"127.0.0.1:{l.sidecar.gw_metrics}": n for n, l in legs.items()},
                              **LABELS),
                scrape_config("sipwatch-signaling", {f"127.0.0.1:{l.sidecar.sig_metrics}": n for n, l in legs.items()},
                              **LABELS),
            ]
            rules = {"recording_rules.yml": RECORDING_RULES.read_text(),
                     "alert_rules.yml": fast_rules(ALERT_RULES.read_text(), FOR)}
            with Alertmanager(wd / "am", am_cfg) as am, \
                    Prometheus(wd / "prom", scrapes, rules, alertmanager=am.address) as prom:
                wait_until(lambda: len(prom.targets_up()) == 4, 20, what="4 scrape targets up")
                yield {"prom": prom, "am": am, "hooks": hooks, "legs": legs}
        finally:
            for leg in legs.values():
                leg.stop()


def rtt_alerts(alerts: list[dict], instance: str) -> list[dict]:
    return [a for a in alerts if a["labels"].get("instance") == instance]


def wait_slow_firing(stack) -> list[dict]:
    prom = stack["prom"]
    return wait_until(lambda: rtt_alerts(prom.alerts("SignalerRTTHigh", state="firing"), "slow"), 45,
                      what="SignalerRTTHigh firing for the slow sidecar in Prometheus")


def test_slow_signaling_fires_signaler_rtt_high_into_alertmanager(stack):
    prom, am, hooks = stack["prom"], stack["am"], stack["hooks"]
    firing = wait_slow_firing(stack)
    assert {a["labels"]["method"] for a in firing} == {"INVITE"}  # BYE is answered at once
    alert = firing[0]
    assert alert["labels"]["severity"] == "warning" and alert["labels"]["node"] == "lab-node-1"
    p95 = float(alert["value"])
    assert 200 < p95 < 1000, p95  # 300 ms answers: the 200-300 or 300-500 ms bucket, 500-1000 if the box is loaded
    assert alert["annotations"]["summary"].startswith("sip-signaling p95 round trip for INVITE on slow is ")
    # the ALERTS series the silent-case test looks for exists when an alert is active
    assert prom.query('count_over_time(ALERTS{alertname="SignalerRTTHigh", instance="slow"}[5m])')
    # Alertmanager has it, active, and routes it by severity to the warning receiver
    in_am = wait_until(lambda: rtt_alerts(am.alerts("SignalerRTTHigh"), "slow"), 20,
                       what="SignalerRTTHigh in Alertmanager's /api/v2/alerts")
    assert in_am[0]["status"]["state"] == "active"
    assert [r["name"] for r in in_am[0]["receivers"]] == ["warning-chat"]
    delivered = wait_until(lambda: rtt_alerts(hooks.alerts("/warning"), "slow"), 20,
                           what="SignalerRTTHigh delivered to the warning webhook")
    assert delivered[0]["labels"]["alertname"] == "SignalerRTTHigh"
    assert not [a for a in hooks.alerts("/critical") if a["labels"]["alertname"] == "SignalerRTTHigh"]


def test_fast_signaling_stays_silent(stack):
    prom, am = stack["prom"], stack["am"]
    guard = 'instance_method:signaler_rtt_milliseconds_count:rate1m{instance="fast", method="INVITE"} > 0.05'
    # Wait, on Prometheus' own data, until the rule has had traffic for well over its `for:` (3 s)
    wait_until(lambda: prom.query(f"count_over_time(({guard})[1m:1s]) >= 10"), 45,
               what="10 s of fast traffic above the rule's traffic guard")
    p95 = prom.query('instance_method:signaler_rtt_milliseconds:p95_rate1m{instance="fast", method="INVITE"}')
    assert p95 and float(p95[0]["value"][1]) < 200, p95
    # never pending nor firing over that whole window, in Prometheus or in Alertmanager
    assert not prom.query('count_over_time(ALERTS{alertname="SignalerRTTHigh", instance="fast"}[5m])')
    assert not rtt_alerts(prom.alerts("SignalerRTTHigh"), "fast")
    assert not rtt_alerts(am.alerts("SignalerRTTHigh"), "fast")


def test_sidecar_down_fires_and_inhibits_the_rest_for_that_instance(stack):
    prom, am = stack["prom"], stack["am"]
    wait_slow_firing(stack)
    wait_until(lambda: rtt_alerts(am.alerts("SignalerRTTHigh"), "slow"), 20, what="SignalerRTTHigh in Alertmanager")
    stack["legs"]["slow"].stop_sidecar()
    down = wait_until(lambda: rtt_alerts(prom.alerts("SidecarDown", state="firing"), "slow"), 30,
                      what="SidecarDown firing for the stopped sidecar")
    assert {a["labels"]["job"] for a in down} <= {"sipwatch-gateway", "sipwatch-signaling"}
    assert down[0]["labels"]["severity"] == "critical"

    def inhibited():
        return [a for a in rtt_alerts(am.alerts("SignalerRTTHigh"), "slow")
                if a["status"]["state"] == "suppressed" and a["status"]["inhibitedBy"]]
    wait_until(inhibited, 20, what="SignalerRTTHigh for the stopped sidecar inhibited by SidecarDown")
    sd = rtt_alerts(am.alerts("SidecarDown"), "slow")
    assert sd and sd[0]["status"]["state"] == "active" and [r["name"] for r in sd[0]["receivers"]] == ["critical-pager"]
    # the other sidecar is not down and nothing of it is inhibited
    assert not rtt_alerts(prom.alerts("SidecarDown"), "fast")
    assert all(a["status"]["state"] != "suppressed" for a in rtt_alerts(am.alerts(), "fast"))
