"""Record the pcap fixtures from real SIPp calls on loopback, with dumpcap capturing.

``python -m capture.record_fixtures OUTDIR [NAME ...]`` writes ``OUTDIR/<name>.pcap`` and
``OUTDIR/<name>.facts.json`` (facts from tshark, see :mod:`capture.tshark_facts`). Needs root
(or capture rights on ``lo``), SIPp, dumpcap and tshark. Every fixture uses its own block of
100 ports, so the capture filter keeps out anything else on the machine, and the calls of one
fixture are few and short so the files stay small.

The caller is always the "gateway" side (port ``base+61``, also the TCP client's port) and the
callee the "signaling" side (``base+60``). RTP comes from :mod:`capture.rtpsend`, started by the
caller's SIPp right after the ACK, sending both directions between the two SDP ports.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from capture.tshark_facts import facts

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "sipwatch" / "scenarios"
RTPSEND = Path(__file__).resolve().with_name("rtpsend.py")
FIRST_BASE = 35100  # 35100-36299: no port here has a Wireshark dissector of its own
HOST = "127.0.0.1"


@dataclass
class Fixture:
    name: str
    about: str
    uac: str
    uas: str
    calls: int
    rate: float = 10.0
    uac_args: tuple = ()
    uas_args: tuple = ()
    transport: str = "u1"
    rtp: dict | None = None  # rtpsend options: count, drop_every, delay_every, delay_ms
    sidecar: bool = False
    extra: dict = field(default_factory=dict)  # facts to record beside tshark's (known inputs)


FIXTURES = [
    Fixture("basic_call_rtp", "3 answered calls, G.711 PCMU RTP both ways (75 x 20 ms each), caller hangs up",
            "uac_call_rtp", "uas_answer", 3, uac_args=("-d", "1800", "-l", "1"), uas_args=("-d", "30"),
            rtp={"count": 75}),
    Fixture("rtp_loss_jitter", "2 answered calls; caller->callee RTP drops every 10th packet and sends "
            "every 7th 12 ms late (101 packets per call); callee->caller RTP clean",
            "uac_call_rtp", "uas_answer", 2, uac_args=("-d", "2400", "-l", "1"), uas_args=("-d", "10"),
            rtp={"count": 101, "drop_every": 10, "delay_every": 7, "delay_ms": 12}),
    Fixture("cancel_487", "3 calls cancelled while ringing: INVITE/100/180, CANCEL/200, 487/ACK",
            "uac_cancel", "uas_cancel", 3),
    Fixture("register_401", "3 registrations: REGISTER/401 digest challenge, REGISTER with credentials/200",
            "uac_register", "uas_register", 3),
    Fixture("options_keepalive", "5 OPTIONS keep-alive probes answered 200", "uac_options", "uas_options", 5,
            rate=5),
    Fixture("invite_retransmit", "2 answered calls; the callee waits 1.2 s before 100 Trying so the caller "
            "retransmits each INVITE once (T1 = 500 ms)",
            "uac_call", "uas_answer", 2, uac_args=("-d", "300"), uas_args=("-d", "1200")),
    Fixture("reject_486", "3 calls refused 486 Busy Here after 100 Trying (80 ms later)",
            "uac_rejected", "uas_reject", 3, uas_args=("-d", "80", "-set", "status", "486")),
    Fixture("reject_503", "3 calls refused 503 Service Unavailable after 100 Trying (40 ms later)",
            "uac_rejected", "uas_reject", 3,
            uas_args=("-d", "40", "-set", "status", "503")),
    Fixture("reinvite", "2 answered calls with a re-INVITE (CSeq 2) in the dialog, then BYE (CSeq 3)",
            "uac_reinvite", "uas_reinvite", 2, uac_args=("-d", "300"), uas_args=("-d", "50")),
    Fixture("callee_bye", "3 answered calls ended by the callee's BYE", "uac_answer_bye", "uas_hangup", 3),
    Fixture("tcp_call", "3 answered calls over SIP/TCP (one connection), callee answers after 20 ms",
            "uac_call", "uas_answer", 3, uac_args=("-d", "300"), uas_args=("-d", "20"), transport="t1"),
    Fixture("sidecar_call", "2 answered calls through the sipwatch sidecar (caller -> sidecar :base+62 -> "
            "callee): both hops visible, the callee checks the traceparent the sidecar adds",
            "uac_call", "uas_call", 2, uac_args=("-d", "300"), uas_args=("-d", "25"), sidecar=True),
]


def ports(index: int) -> dict:
    base = FIRST_BASE + 100 * index
    return {"base": base, "uas": base + 60, "uac": base + 61, "sidecar": base + 62,
            "uas_media": base + 20, "uac_media": base + 30, "rtp_a": base + 40, "rtp_b": base + 50}


class Dumpcap:
    """dumpcap on ``lo`` writing classic pcap, started and confirmed ready before the calls."""

    def __init__(self, path: Path, bpf: str):
        self.args = ["dumpcap", "-q", "-P", "-i", "lo", "-f", bpf, "-w", str(path)]

    def __enter__(self):
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()  # "Capturing on 'Loopback: lo'" once the filter is set
        if "Capturing on" not in line:
            self.proc.kill()
            raise RuntimeError(f"dumpcap did not start: {line}{self.proc.stderr.read()}")
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        time.sleep(0.5)  # let the last datagrams reach the capture
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _sipp(workdir: Path, scenario: str, port: int, media: int, calls: int, transport: str,
          args: tuple, remote: str | None = None, rate: float | None = None) -> list[str]:
    cmd = ["sipp", "-sf", str(SCENARIOS / f"{scenario}.xml"), "-i", HOST, "-p", str(port),
           "-mp", str(media), "-m", str(calls), "-t", transport, "-nostdin", "-timeout", "40s",
           "-trace_err", *args]
    if rate is not None:
        cmd += ["-r", str(rate)]
    if remote:
        cmd.append(remote)
    return cmd


def record(fx: Fixture, index: int, outdir: Path) -> dict:
    p = ports(index)
    pcap = outdir / f"{fx.name}.pcap"
    proto = "tcp" if fx.transport.startswith("t") else "udp"
    bpf = f"udp portrange {p['base']}-{p['base'] + 99}"
    if proto == "tcp":
        bpf = f"tcp portrange {p['base']}-{p['base'] + 99} or " + bpf
    uas_args, uac_args = list(fx.uas_args), list(fx.uac_args)
    if fx.uas in ("uas_answer",):
        uas_args += ["-set", "rtp_port", str(p["rtp_b"] if fx.rtp else p["uas_media"])]
    if fx.rtp:
        r = fx.rtp
        cmd = [sys.executable, str(RTPSEND), f"{HOST}:{p['rtp_a']}", f"{HOST}:{p['rtp_b']}", str(r["count"])]
        for k in ("drop_every", "delay_every", "delay_ms"):
            if k in r:
                cmd += [f"--{k.replace('_', '-')}", str(r[k])]
        uac_args += ["-set", "rtp_port", str(p["rtp_a"]), "-set", "rtp_cmd", " ".join(cmd)]
    target = p["sidecar"] if fx.sidecar else p["uas"]
    with tempfile.TemporaryDirectory(prefix=f"rec-{fx.name}-") as tmp:
        work = Path(tmp)
        sidecar = None
        with Dumpcap(pcap, bpf):
            if fx.sidecar:
                sidecar = _start_sidecar(work, p)
            try:
                uas = subprocess.Popen(_sipp(work, fx.uas, p["uas"], p["uas_media"], fx.calls,
                                             fx.transport, tuple(uas_args)),
                                       cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                time.sleep(0.4)
                uac = subprocess.run(_sipp(work, fx.uac, p["uac"], p["uac_media"], fx.calls, fx.transport,
                                           tuple(uac_args), f"{HOST}:{target}", fx.rate),
                                     cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     timeout=60)
                try:
                    uas_rc = uas.wait(15)
                except subprocess.TimeoutExpired:
                    uas.kill()
                    uas_rc = uas.wait()
                time.sleep(0.2)
            finally:
                if sidecar is not None:
                    sidecar.send_signal(signal.SIGTERM)
                    sidecar.wait(10)
        if uac.returncode != 0 or uas_rc != 0:
            errs = "".join(f.read_text(errors="replace") for f in work.glob("*_errors.log"))
            raise RuntimeError(f"{fx.name}: SIPp failed (uac {uac.returncode}, uas {uas_rc}): {errs}")
    pcap.chmod(0o644)
    f = facts(str(pcap))
    f["fixture"] = {
        "about": fx.about, "calls": fx.calls, "transport": proto.upper(),
        "gateway": f"{HOST}:{p['uac']}",
        "signaling": f"{HOST}:{p['uas']}",
        **({"sidecar": f"{HOST}:{p['sidecar']}"} if fx.sidecar else {}),
        **({"rtp": _rtp_expectation(fx, p)} if fx.rtp else {}),
        **fx.extra,
    }
    (outdir / f"{fx.name}.facts.json").write_text(json.dumps(f, indent=1) + "\n")
    return f


def _rtp_expectation(fx: Fixture, p: dict) -> dict:
    """What the sender was told to do, per call: the ground truth tshark's loss must match.

    A dropped packet only counts as lost if a later one was sent (nothing marks a missing tail).
    """
    r = fx.rtp
    n, drop = r["count"], r.get("drop_every", 0)
    dropped = [i for i in range(n) if drop and i % drop == drop - 1]
    sent = [i for i in range(n) if i not in dropped]
    return {
        "sender": "capture/rtpsend.py", "ptime_ms": 20, "payload_type": 0,
        "a": f"{HOST}:{p['rtp_a']}", "b": f"{HOST}:{p['rtp_b']}",
        "packets_per_call_b_to_a": n,
        "packets_per_call_a_to_b": len(sent),
        "lost_per_call_a_to_b": sum(1 for i in dropped if i < sent[-1]),
        "delay_every": r.get("delay_every", 0), "delay_ms": r.get("delay_ms", 0),
    }


def _start_sidecar(work: Path, p: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    gw, sig = p["base"] + 97 + 1000, p["base"] + 98 + 1000  # metrics outside the captured range
    proc = subprocess.Popen([sys.executable, "-m", "sipwatch", "proxy",
                             "--listen", f"{HOST}:{p['sidecar']}", "--upstream", f"{HOST}:{p['uas']}",
                             "--gateway-metrics", f"{HOST}:{gw}", "--signaling-metrics", f"{HOST}:{sig}"],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import urllib.request
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://{HOST}:{gw}/healthz", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("sidecar did not start")


def main(argv: list[str] | None = None, fixtures=FIXTURES, first_index: int = 0,
         prog: str = "record_fixtures") -> int:
    """``python -m capture.PROG OUTDIR [NAME ...]``: record ``fixtures``, the i-th in port block
    ``first_index + i`` (another module's fixtures take the blocks after these)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        names = ", ".join(f.name for f in fixtures)
        sys.stdout.write(f"usage: python -m capture.{prog} OUTDIR [NAME ...]\nfixtures: {names}\n")
        return 0 if argv else 2
    for tool in ("sipp", "dumpcap", "tshark", "capinfos"):
        if shutil.which(tool) is None:
            sys.stderr.write(f"{prog}: {tool} not found\n")
            return 2
    outdir = Path(argv[0])
    outdir.mkdir(parents=True, exist_ok=True)
    wanted = set(argv[1:])
    for i, fx in enumerate(fixtures):
        if wanted and fx.name not in wanted:
            continue
        f = record(fx, first_index + i, outdir)
        t = f["txn"]
        sys.stdout.write(f"{fx.name}: {f['packets']} packets, {f['sip_messages']} SIP, "
                         f"{t['transactions']} transactions, rtt median {t['rtt_first_resp_ms_median']} ms, "
                         f"{len(f['rtp_sdp_streams'])} RTP streams\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
