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


def test_free_ports_are_outside_the_ephemeral_range_and_not_repeated():
    """A port from bind(0) may become a later connect()'s source port: a harness polling a
    metrics port nobody listens on yet then connected to itself and read its own request back
    as the reply (a CI failure: BadStatusLine 'GET /metrics HTTP/1.1')."""
    from sipwatch.demo import free_port
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo, hi = (int(x) for x in f.read().split())
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(not lo <= p <= hi for p in ports), (lo, hi, ports)


def test_free_ports_are_ones_tshark_reads_as_sip():
    """A CI run drew a port tshark decodes as another protocol (Quake 3 on 27950 is one): SIP
    through it was invisible to tshark, and the test found 0 calls on its wire. The harness
    walks the whole range below the ephemeral ports and must skip every such port."""
    import shutil

    from harness import free_port, tshark_claimed_ports
    if not shutil.which("tshark"):
        pytest.skip("needs tshark")
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo, _ = (int(x) for x in f.read().split())
    claimed = tshark_claimed_ports()
    assert 27950 in claimed and 5060 in claimed
    span = lo - 10000
    seen = {free_port() for _ in range(span)}
    assert len(seen) > span // 2  # the walk covered the range (ports in use are skipped)
    assert not seen & claimed


def test_make_keeps_an_existing_venvs_interpreter(tmp_path):
    """``make`` rebuilds the venv's install when a C file changed; it ran ``$(PYTHON) -m venv``
    over the existing venv too, which re-pointed a venv made by another python at the first
    ``python3`` on the PATH (its own binary then loaded that python's library and failed to
    import ssl). A venv that exists is kept; only its install runs again."""
    import shutil
    if shutil.which("make") is None:
        pytest.skip("needs make")
    for name in ("Makefile", "pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "sipwatch").mkdir()
    for c in ("_sipscan.c", "_otlpenc.c", "_udppump.c", "_hepenc.c"):
        (tmp_path / "sipwatch" / c).write_text("")
    log = tmp_path / "calls"
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {log}\n")
    fake.chmod(0o755)
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    for tool in ("python", "pip"):
        (bin_ / tool).write_text(f"#!/bin/sh\necho \"{tool} $*\" >> {log}\n")
        (bin_ / tool).chmod(0o755)
    r = subprocess.run(["make", "venv", f"PYTHON={fake}"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = log.read_text().splitlines()
    assert calls and all(c.startswith("pip ") for c in calls), calls  # the venv kept, its install run
    shutil.rmtree(tmp_path / ".venv")
    (tmp_path / "calls").unlink()
    subprocess.run(["make", "venv", f"PYTHON={fake}"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert log.read_text().splitlines()[0] == f"{fake} -m venv .venv"  # no venv: made with PYTHON
