"""The benchmark's code paths, run tiny: structure and sanity only, never timing thresholds."""
from __future__ import annotations

import math

import pytest

import bench
import bench_micro
import bench_net
from bench_peers import answer
from harness import HAVE_SIPP, free_port


def test_micro_benchmark_runs_a_whole_call():
    r = bench_micro.run_micro(n=40, repeats=1)
    assert list(r["stages_us"]) == list(bench_micro.STAGES)
    # every message of every call was forwarded exactly once: the synthetic call is valid SIP
    assert r["forwarded"] == {s: 40 for s in bench_micro.STAGES}
    assert all(v > 0 and math.isfinite(v) for v in r["stages_us"].values())
    assert r["per_call_us"] == pytest.approx(sum(r["stages_us"].values()))
    assert r["baseline_split_us"] > 0 and r["baseline_find_us"] > 0 and r["ring_add_us"] > 0
    assert r["call_summaries"] == 40 and r["housekeeping_per_call_us"] > 0
    assert 600 <= r["invite_bytes"] <= 750


def test_responder_answers_requests_only():
    req = bench_net.options(5000, 5001, 1, b"x")
    resp = answer(req)
    assert resp.startswith(b"SIP/2.0 200 OK\r\n")
    assert b"Call-ID: probe-1-x@127.0.0.1" in resp and b"tag=resp1" in resp
    assert answer(resp) is None


def test_latency_probe_direct_relay_and_sidecar(tmp_path):
    with bench_net.Responder(tmp_path) as resp, \
            bench_net.Relay(tmp_path, resp.port) as relay, \
            bench_net.SidecarTarget(tmp_path, resp.port, "--no-tracing") as sc:
        targets = [bench_net.Direct(tmp_path, resp.port), relay, sc]
        res = bench_net.latency_probe(targets, n=20, warmup=5, rounds=2)
    assert set(res) == {"direct", "uvloop relay", "sipwatch"}
    for name, r in res.items():
        assert (r["sent"], r["answered"], r["lost"]) == (20, 20, 0), name
        assert 0 < r["p50_us"] <= r["p90_us"] <= r["p99_us"], name


@pytest.mark.sipp
@pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp (Debian sip-tester)")
def test_sipp_load_through_relay_counts_cpu(tmp_path):
    uas_port = free_port()
    with bench_net.Relay(tmp_path, uas_port) as relay:
        r = bench_net.sipp_load(tmp_path, relay, uas_port, rate=20, duration=1, settle=0.1)
    assert (r["ok"], r["failed"], r["calls"]) == (20, 0, 20)
    assert r["cpu_s"] is not None and r["cpu_s"] >= 0 and r["rss_peak_mb"] > 0
    assert r["proxy_drops"] >= 0 and r["sipp_drops"] >= 0


def test_cli_arguments():
    a = bench.parse_args(["--quick", "--rates", "100,200", "--only", "micro,latency"])
    assert (a.quick, a.rates, a.duration, a.only, a.tracing_rate) == (True, [100, 200], 5.0, ["micro", "latency"], 100)
    assert bench.parse_args([]).duration == 20.0
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "nonsense"])


def test_repeated_runs_are_aggregated():
    def run(target, rate, cpu, ok):
        return {"target": target, "rate": rate, "duration_s": 1.0, "calls": 10, "ok": ok, "failed": 10 - ok,
                "retransmissions": 1, "proxy_drops": 0, "sipp_drops": 0, "rcvbuf_errors": 0,
                "cpu_s": cpu, "cpu_pct": cpu * 100, "cpu_us_per_msg": cpu, "rss_peak_mb": 20.0}
    rows = bench.aggregate([run("sipwatch", 100, 1.0, 10), run("uvloop relay", 100, 0.2, 10),
                            run("sipwatch", 100, 3.0, 9), run("sipwatch", 100, 2.0, 10),
                            run("uvloop relay", 100, 0.4, 10)])
    assert [r["target"] for r in rows] == ["uvloop relay", "sipwatch"]
    sw = rows[1]
    assert (sw["repeats"], sw["calls"], sw["ok"], sw["failed"], sw["retransmissions"]) == (3, 30, 29, 1, 3)
    assert sw["cpu_pct"] == 200.0 and len(sw["runs"]) == 3
