"""Configuration errors, the RTT ring's folding, trace context rules, masking and JSON logs."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import orjson
import pytest
from hypothesis import given, settings, strategies as st

from sipwatch.config import ConfigError, settings_from
from sipwatch.logs import JsonLog
from sipwatch.masking import mask_uri
from sipwatch.stats import METHOD_INDEX, RTT_BUCKETS_MS, RttRing
from sipwatch.tracecontext import format_traceparent, parse_traceparent, sampled_by_ratio

from harness import ROOT


# -- configuration ---------------------------------------------------------------------
@pytest.mark.parametrize("argv,env,needle", [
    (["--upstream", "127.0.0.1:99999"], {}, "'99999'"),
    (["--upstream", "127.0.0.1:5080", "--listen", "0.0.0.0"], {}, "'0.0.0.0'"),
    ([], {}, "--upstream"),
    (["--upstream", "127.0.0.1:5080", "--mask-numbers", "some"], {}, "'some'"),
    (["--upstream", "127.0.0.1:5080"], {"SIPWATCH_TIMER_B": "soon"}, "SIPWATCH_TIMER_B: 'soon'"),
    (["--upstream", "127.0.0.1:5080"], {"SIPWATCH_NO_RECORD_ROUTE": "maybe"}, "'maybe'"),
    (["--upstream", "127.0.0.1:5080", "--sample-ratio", "1.5"], {}, "'1.5'"),
    (["--upstream", "127.0.0.1:5080", "--trace-header", "bad header"], {}, "'bad header'"),
    (["--upstream", "127.0.0.1:5080", "--gateway-metrics", "127.0.0.1:9",
      "--signaling-metrics", "127.0.0.1:9"], {}, "127.0.0.1:9"),
    (["--upstream", "no-such-host.invalid:5060"], {}, "'no-such-host.invalid'"),
])
def test_bad_config_names_the_value(argv, env, needle):
    with pytest.raises(ConfigError) as err:
        settings_from(argv, env)
    assert needle in str(err.value)


def test_environment_and_flags():
    s = settings_from(["--upstream", "127.0.0.1:5080", "--timer-b", "5"],
                      {"SIPWATCH_LISTEN": "127.0.0.1:6060", "SIPWATCH_TIMER_B": "9",
                       "SIPWATCH_NO_RECORD_ROUTE": "true", "SIPWATCH_GATEWAY_METRICS": "off"})
    assert s.listen == ("127.0.0.1", 6060) and s.advertise == ("127.0.0.1", 6060)
    assert s.timer_b == 5.0  # the flag wins over the environment
    assert s.record_route is False and s.gateway_metrics is None
    assert s.signaling_metrics == ("0.0.0.0", 13022)


def test_cli_exits_2_with_one_clear_line():
    r = subprocess.run([sys.executable, "-m", "sipwatch", "proxy", "--upstream", "127.0.0.1:0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "sipwatch proxy: error: --upstream: port '0' in '127.0.0.1:0' is not 1-65535"]


# -- RTT ring --------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 2, 5]), st.floats(0.0, 40000.0)), max_size=300),
       st.integers(4, 64))
def test_ring_fold_matches_an_independent_histogram(samples, size):
    ring = RttRing(size=size)
    for i, (m, v) in enumerate(samples):
        ring.add(m, v, i + 1)  # folds by itself whenever the ring fills
    ring.fold(1.0)
    edges = list(RTT_BUCKETS_MS)
    for m in (0, 2, 5):
        values = [v for mm, v in samples if mm == m]
        # Prometheus buckets are "less than or equal": count per (prev, le]
        want = [sum(1 for v in values if (i == 0 or v > edges[i - 1]) and v <= e)
                for i, e in enumerate(edges)] + [sum(1 for v in values if v > edges[-1])]
        assert ring.counts[m].tolist() == want
        assert ring.sums[m] == pytest.approx(sum(values))
    # each (method, bucket)'s exemplar is its newest sample, across folds
    newest = {}
    for i, (m, v) in enumerate(samples):
        b = next((j for j, e in enumerate(edges) if v <= e), len(edges))
        newest[(m, b)] = (i + 1, v)
    assert {k: e[:2] for k, e in ring.exemplars.items()} == newest


def test_ring_exemplar_is_the_newest_sample_of_its_bucket():
    ring = RttRing(size=8)
    inv = METHOD_INDEX[b"INVITE"]
    for i, v in enumerate([3.0, 4.0, 250.0, 4.5]):
        ring.add(inv, v, 100 + i)
    ring.fold(5.0)
    def bucket(v):  # index of the first bound >= v ("le")
        return next(i for i, b in enumerate(RTT_BUCKETS_MS) if v <= b)
    assert ring.exemplars[(inv, bucket(4.5))][:2] == (103, 4.5)
    assert ring.exemplars[(inv, bucket(250.0))][:2] == (102, 250.0)
    assert int(np.sum(ring.counts)) == 4


# -- trace context ---------------------------------------------------------------------
@pytest.mark.parametrize("value,ok", [
    (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
    (b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", False),  # uppercase
    (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),  # zero trace id
    (b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),  # zero span id
    (b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),  # version ff
    (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", False),
    (b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", True),  # future version
    (b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", False),
])
def test_traceparent_rules(value, ok):
    assert (parse_traceparent(value) is not None) is ok


@given(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.booleans())
def test_traceparent_round_trip(trace_id, span_id, sampled):
    assert parse_traceparent(format_traceparent(trace_id, span_id, sampled)) == \
        (trace_id, span_id, int(sampled))


def test_ratio_sampling_is_close_to_the_ratio_and_deterministic():
    import random
    rng = random.Random(7)
    ids = [rng.getrandbits(128) for _ in range(20000)]
    share = sum(sampled_by_ratio(t, 0.25) for t in ids) / len(ids)
    assert 0.23 < share < 0.27
    assert [sampled_by_ratio(t, 0.25) for t in ids[:50]] == [sampled_by_ratio(t, 0.25) for t in ids[:50]]


# -- masking and logs ------------------------------------------------------------------
def test_masking_modes():
    v = b'"+1 555 765 4321" <sip:+15557654321@gw.example.com;user=phone>;tag=x'
    partial = mask_uri(v, "partial")
    assert "+15557654321" not in partial and "4321@gw.example.com" in partial
    assert "765" not in partial
    full = mask_uri(v, "full")
    assert "4321" not in full and "sip:***@gw.example.com" in full
    assert mask_uri(v, "none") == v.decode()
    assert mask_uri("tel:+4930123456", "partial") == "tel:+******3456"


def test_json_log_record_shape():
    buf = io.BytesIO()
    log = JsonLog("svc", stream=buf)
    log.info("hello", "test_event", call_sid="abc", trace_id="0" * 31 + "1", extra=3)
    rec = orjson.loads(buf.getvalue().splitlines()[0])
    assert {"timestamp", "log_level", "service_name", "call_sid", "trace_id", "message",
            "event"} <= rec.keys()
    assert rec["service_name"] == "svc" and rec["log_level"] == "info" and rec["extra"] == 3


def test_masking_leaves_hosts_and_tags_alone():
    v = '"Caller" <sip:+493012345001@127.0.0.1:49630>;tag=5509SIPpTag001234567'
    assert mask_uri(v, "partial") == '"Caller" <sip:+********5001@127.0.0.1:49630>;tag=5509SIPpTag001234567'
    assert mask_uri("sip:service@10.1.2.3:5060", "full") == "sip:***@10.1.2.3:5060"


@given(st.text(alphabet="0123456789+-. ()abc@;", max_size=40))
def test_partial_masking_keeps_exactly_the_last_four_digits(s):
    from sipwatch.masking import _mask_digits
    out = _mask_digits(s)
    assert len(out) == len(s)
    assert all(a == b for a, b in zip(s, out) if not a.isdigit())
    digits = [c for c in s if c.isdigit()]
    kept = [c for c in out if c.isdigit()]
    if len(digits) < 3:
        assert out == s
    elif len(digits) <= 4:
        assert kept == []
    else:
        assert kept == digits[-4:] and out.count("*") - s.count("*") == len(digits) - 4


def test_overload_after_is_read_as_seconds_and_bounded():
    from sipwatch.config import ConfigError, settings_from
    base = ["--upstream", "127.0.0.1:5080"]
    assert settings_from(base, env={}).overload_after == 0.05
    assert settings_from(base + ["--overload-after", "0.2"], env={}).overload_after == 0.2
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(ConfigError):
            settings_from(base + ["--overload-after", bad], env={})


def test_the_epoch_clock_keeps_no_pause_taken_between_its_two_reads(monkeypatch):
    """A process preempted right after reading the wall clock at start (a loaded machine) must
    not carry that pause in every timestamp it exports: a hop's spans would then start before
    those of the hop that sent it the message."""
    import time as real_time

    from sipwatch import transport
    wall, calls = real_time.time, [0]

    def preempted_after_first_read() -> float:
        t = wall()
        calls[0] += 1
        if calls[0] == 1:
            real_time.sleep(0.02)  # the scheduler took the CPU between the two reads
        return t
    monkeypatch.setattr(transport.time, "time", preempted_after_first_read)
    clock = transport.epoch_clock()
    monkeypatch.undo()
    assert abs(clock() - real_time.time()) < 0.005
    assert abs(clock.offset + real_time.monotonic() - clock()) < 1e-3  # (what the C pump adds)
