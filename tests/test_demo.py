"""The README's first command: the demo places real calls and reports what the sidecar counted."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from harness import HAVE_SIPP, ROOT


@pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp (Debian sip-tester)")
def test_demo_counts_every_call_it_placed():
    r = subprocess.run([sys.executable, "-m", "sipwatch.demo", "--seconds", "2", "--rate", "5",
                        "--hold-ms", "300", "--answer-delay-ms", "120"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "calls placed by SIPp: 10 (SIPp exit code 0); counted by sipwatch: 10 (answered 10)" in r.stdout
    inv = re.search(r"^\s+INVITE\s+(\d+)\s+([\d.]+)", r.stdout, re.M)
    assert inv and int(inv.group(1)) == 10
    # the callee waits 120 ms before answering: the RTT cannot be shorter (nor off by a unit)
    assert 120 - 5 <= float(inv.group(2)) < 2000  # (5 ms: SIPp times its pauses on a coarse ms clock)
    assert '"event":"call_summary"' in r.stdout
