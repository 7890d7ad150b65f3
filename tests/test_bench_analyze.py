"""The analyze-vs-tshark benchmark's code path, run tiny: structure only, never timing thresholds."""
from __future__ import annotations

import io
import shutil
from contextlib import redirect_stdout

import pytest

import bench_analyze


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_side_by_side_runs_both_tools_on_the_built_capture(tmp_path):
    path = tmp_path / "all_sip.pcap"
    frames = bench_analyze.build_capture(path, calls=30)
    out = io.StringIO()
    with redirect_stdout(out):
        res = bench_analyze.run(path, runs=1)
    assert res["file_frames"] == frames > 150
    assert set(res["tools"]) == {"sipwatch analyze", "tshark -q -z sip,stat"}
    for t in res["tools"].values():
        assert t["cpu_s_median"] > 0 and t["wall_s_median"] > 0
    sw, ts = res["tools"]["sipwatch analyze"], res["tools"]["tshark -q -z sip,stat"]
    assert res["cpu_ratio"] == pytest.approx(sw["cpu_s_median"] / ts["cpu_s_median"])
    assert res["machine"]["cpus"] >= 1
    assert "sipwatch / tshark CPU" in out.getvalue()


def test_a_failing_tool_is_reported_not_timed(tmp_path):
    bad = tmp_path / "not_a_capture.pcap"
    bad.write_bytes(b"not a capture at all")
    with pytest.raises(RuntimeError, match="sipwatch analyze exited 2"):
        bench_analyze.run(bad, runs=1)
