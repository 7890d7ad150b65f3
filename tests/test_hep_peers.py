"""HEP against real peers, with what went over loopback (dumpcap, read by tshark) as ground truth.

- sidecar -> sngrep: every SIP message the sidecar received or sent reaches sngrep with the
  addresses, ports and payload it had on the wire, and a microsecond timestamp that is causally
  right: not before the wire saw a message arrive, not after the wire saw it leave (0.5 ms allowed
  for the two clocks: the sidecar's is monotonic-based, the wire's wall time);
- the same HEP datagrams read by the npm decoder ``hep-js`` (and the chunk layout walked apart
  from it): total length = datagram, Kamailio's chunk order, capture id, correlation id = the
  Call-ID tshark reads;
- sidecar -> Kamailio ``sipcapture`` (db_text): the stored rows carry the capture id, the
  correlation id and the payload of every message;
- Kamailio ``siptrace`` (trace_mode 1; HEPv3 over UDP with an auth key and over TCP, HEPv2 over
  UDP) in front of SIPp -> ``sipwatch capture --hep-listen``: the calls, outcomes and
  transactions tshark reads from the same calls on the wire, with RTTs inside their causal
  bounds; with a wrong auth key every packet is refused and counted;
- ``sipwatch capture --interface lo --hep-endpoint`` -> sipcapture: what it captured, with the
  wire's addresses and its capture timestamps;
- a dead collector: calls are unaffected and every message is either sent or counted as dropped.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from decimal import Decimal

import orjson
import pytest

from capture.record_fixtures import Dumpcap
from capture.tshark_facts import facts
from harness import HAVE_SIPP, ROOT, Sidecar, free_port, metric, run_call_pair, scrape, stop_process
from hep_peers import (SNGREP, KamailioSipcapture, KamailioSiptrace, Sngrep, have_kamailio_hep,
                       hepjs_decode, hepjs_install)

HAVE_TSHARK = shutil.which("dumpcap") is not None and shutil.which("tshark") is not None
pytestmark = [pytest.mark.sipp, pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp"),
              pytest.mark.skipif(not HAVE_TSHARK, reason="needs dumpcap and tshark")]
needs_sngrep = pytest.mark.skipif(SNGREP is None, reason="needs sngrep (apt-get install sngrep)")
needs_kamailio = pytest.mark.skipif(not have_kamailio_hep(),
                                    reason="needs kamailio with siptrace, sipcapture, db_text")

N = 6
CLOCKS = Decimal("0.0005")
CLOCK_MS = 0.5
CAPTURE_ID = 2001
KAMAILIO_ORDER = [1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 17, 15]  # no auth key, no node name here


def udp_rows(pcap, display_filter: str, heuristics_first: bool = False) -> list[dict]:
    """tshark's reading of every UDP datagram matching ``display_filter``. ``heuristics_first``:
    the SIP heuristic before the dissectors registered by port number, for ports these tests did
    not choose (harness.free_port avoids the claimed ones)."""
    prefer = ["-o", "udp.try_heuristic_first:TRUE"] if heuristics_first else []
    out = subprocess.run(["tshark", "-n", *prefer, "-r", str(pcap), "-Y", display_filter, "-T", "fields",
                          "-E", "separator=\t", "-e", "frame.time_epoch", "-e", "ip.src",
                          "-e", "udp.srcport", "-e", "ip.dst", "-e", "udp.dstport",
                          "-e", "sip.Call-ID", "-e", "udp.payload"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    rows = []
    for line in out.splitlines():
        f = line.split("\t")
        if len(f) < 7 or not f[6]:
            continue
        rows.append({"time": Decimal(f[0]), "src": (f[1], int(f[2])), "dst": (f[3], int(f[4])),
                     "call_id": f[5], "payload": bytes.fromhex(f[6].replace(":", ""))})
    return rows


@pytest.fixture(scope="module")
def sngrep_run(tmp_path_factory):
    """SIPp calls through a sidecar sending HEP to sngrep, with dumpcap on loopback for the
    SIP ports and the HEP port."""
    if SNGREP is None:
        pytest.skip("needs sngrep (apt-get install sngrep)")
    work = tmp_path_factory.mktemp("hep-sngrep")
    uas_port = free_port()
    wire = work / "wire.pcap"
    with Sngrep(work) as sng:
        with Sidecar(work, uas_port, "--no-tracing", "--hep-endpoint", f"udp:127.0.0.1:{sng.port}",
                     "--hep-capture-id", str(CAPTURE_ID)) as sc:
            with Dumpcap(wire, f"udp port {sc.port} or udp port {sng.port}"):
                uac_rc, uas_rc, caller, _ = run_call_pair(work, "uac_call", "uas_call", sc.port,
                                                          uas_port, N, rate=20)
                sc.wait_for(lambda s: metric(s, "sipwatch_hep_sent_total") >= N * 14)
                gw = sc.gateway()
        sng.stop()
    return {"work": work, "wire": wire, "hep_pcap": sng.pcap, "sidecar_port": sc.port,
            "hep_port": sng.port, "uac_rc": uac_rc, "uas_rc": uas_rc, "gateway": gw}


@needs_sngrep
def test_sngrep_shows_every_message_as_on_the_wire(sngrep_run):
    r = sngrep_run
    assert r["uac_rc"] == 0 and r["uas_rc"] == 0
    port = r["sidecar_port"]
    wire = udp_rows(r["wire"], f"sip && udp.port == {port}")
    shown = udp_rows(r["hep_pcap"], "sip")
    assert len(wire) == N * 14  # 7 messages a call, each received and sent by the sidecar
    assert sorted((w["src"], w["dst"], w["payload"]) for w in wire) == \
        sorted((s["src"], s["dst"], s["payload"]) for s in shown)
    by_key = {(s["src"], s["dst"], s["payload"]): s for s in shown}
    for w in wire:
        s = by_key[(w["src"], w["dst"], w["payload"])]
        if w["dst"][1] == port:  # the sidecar received it: it cannot have stamped it earlier
            assert s["time"] >= w["time"] - CLOCKS, (w, s)
        else:  # the sidecar sent it: stamped before it left
            assert s["time"] <= w["time"] + CLOCKS, (w, s)
    # microsecond timestamps, not milliseconds
    assert any(int(s["time"] * 1_000_000) % 1000 for s in shown)
    assert r["gateway"][("sipwatch_hep_dropped_total", frozenset({("reason", "queue_full")}))] == 0


@needs_sngrep
def test_hep_js_reads_every_chunk(sngrep_run, tmp_path_factory):
    d = hepjs_install(tmp_path_factory.mktemp("hepjs"))
    if d is None:
        pytest.skip("npm cannot install hep-js here")
    r = sngrep_run
    hep = udp_rows(r["wire"], f"udp.dstport == {r['hep_port']}")
    sip = {w["payload"]: w for w in udp_rows(r["wire"], f"sip && udp.port == {r['sidecar_port']}")}
    assert len(hep) == len(sip) == N * 14
    decoded = hepjs_decode(d, [h["payload"] for h in hep])
    for h, js in zip(hep, decoded):
        assert js["total"] == js["size"] == js["end"] == len(h["payload"])
        assert [c[1] for c in js["chunks"]] == KAMAILIO_ORDER
        assert all(c[0] == 0 for c in js["chunks"])
        assert dict((c[1], c[2]) for c in js["chunks"])[12] == 10  # 4-byte capture id
        info, payload = js["decoded"]["rcinfo"], js["decoded"]["payload"].encode("latin1")
        w = sip[payload]
        assert (info["srcIp"], info["srcPort"]) == w["src"]
        assert (info["dstIp"], info["dstPort"]) == w["dst"]
        assert (info["protocolFamily"], info["protocol"], info["payloadType"]) == (2, 17, 1)
        assert info["captureId"] == CAPTURE_ID
        assert info["correlation_id"] == w["call_id"]
        assert 0 <= info["timeUseconds"] < 1_000_000


@needs_kamailio
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_kamailio_sipcapture_stores_what_the_sidecar_sends(tmp_path, transport):
    uas_port = free_port()
    wire = tmp_path / "wire.pcap"
    with KamailioSipcapture(tmp_path, tcp=transport == "tcp") as kam:
        with Sidecar(tmp_path, uas_port, "--no-tracing", "--hep-endpoint", f"{transport}:127.0.0.1:{kam.port}",
                     "--hep-capture-id", str(CAPTURE_ID), "--hep-auth-key", "secret",
                     "--hep-node-name", "sw1") as sc:
            with Dumpcap(wire, f"udp port {sc.port}"):
                uac_rc, uas_rc, _, _ = run_call_pair(tmp_path, "uac_call", "uas_call", sc.port,
                                                     uas_port, 3, rate=20)
                sc.wait_for(lambda s: metric(s, "sipwatch_hep_sent_total") >= 3 * 14)
        time.sleep(1.0)  # the last packets reach sipcapture; db_text writes its table at exit
    rows = kam.rows()
    assert uac_rc == 0 and uas_rc == 0
    wire_rows = udp_rows(wire, "sip")
    assert len(rows) == len(wire_rows) == 3 * 14
    stored = sorted((r["source_ip"], int(r["source_port"]), r["destination_ip"],
                     int(r["destination_port"]), r["callid"], r["correlation_id"], r["msg"])
                    for r in rows)
    expected = sorted((w["src"][0], w["src"][1], w["dst"][0], w["dst"][1], w["call_id"],
                       w["call_id"], w["payload"].decode()) for w in wire_rows)
    assert stored == expected
    # sipcapture writes the capture id into the node column ("capture_node:capture_id")
    assert {r["node"] for r in rows} == {f"homer01:{CAPTURE_ID}"}


@needs_kamailio
@pytest.mark.parametrize("transport, sender_key, listener_key, version", [
    ("udp", "s3cret", "s3cret", 3), ("tcp", "", "", 3), ("udp", "s3cret", "wrong", 3), ("udp", "", "", 2)])
def test_kamailio_siptrace_into_capture_matches_the_wire(tmp_path, transport, sender_key, listener_key,
                                                         version):
    hep_port, uas_port = free_port(), free_port()
    gw_m, sig_m = free_port(), free_port()
    wire = tmp_path / "wire.pcap"
    log = tmp_path / "capture.log"
    args = [sys.executable, "-m", "sipwatch", "capture", "--hep-listen", f"{transport}:127.0.0.1:{hep_port}",
            "--signaling", f"127.0.0.1:{uas_port}", "--gateway-metrics", f"127.0.0.1:{gw_m}",
            "--signaling-metrics", f"127.0.0.1:{sig_m}", "--rtp-grace", "1"]
    # (a call's summary waits out the grace: Kamailio's HEP copies of the two hops' 200 to BYE can
    # arrive apart, and with no grace a loaded machine wrote the summary between them, one hop's
    # BYE without its answer; stopping the capture writes what is still waiting)
    if listener_key:
        args += ["--hep-auth-key", listener_key]
    with open(log, "wb") as out:
        cap = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 15
            while b'"capturing"' not in log.read_bytes():
                assert cap.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            with KamailioSiptrace(tmp_path, uas_port, hep_port, hep_transport=transport,
                                  auth_key=sender_key, hep_version=version) as kam:
                with Dumpcap(wire, f"udp port {kam.port}"):
                    # a plain callee: uas_call insists on the sidecar's traceparent
                    uac_rc, uas_rc, _, _ = run_call_pair(
                        tmp_path, "uac_call", "uas_answer", kam.port, uas_port, N, rate=20,
                        uas_extra=("-set", "rtp_port", str(free_port())))
                    deadline = time.monotonic() + (15 if sender_key == listener_key else 2)
                    while time.monotonic() < deadline:
                        if metric(scrape(gw_m), "sip_calls_processed_total") >= N:
                            break
                        time.sleep(0.2)
            time.sleep(0.5)
            gw, sig = scrape(gw_m), scrape(sig_m)
        finally:
            stop_process(cap, signal.SIGINT)
    assert uac_rc == 0 and uas_rc == 0
    if sender_key != listener_key:  # every packet refused and counted, nothing fed
        assert metric(gw, "sip_calls_processed_total") == 0
        assert metric(gw, "sipwatch_hep_received_total") == 0
        wire_msgs = len(udp_rows(wire, "sip"))
        assert metric(gw, "sipwatch_hep_rejected_total", reason="auth") >= wire_msgs > 0
        return
    assert metric(gw, "sip_calls_processed_total", outcome="answered") == N
    assert metric(gw, "sip_calls_processed_total") == N
    assert metric(gw, "sipwatch_hep_rejected_total") == 0
    truth = facts(str(wire))
    assert truth["invite_calls"] == N
    # every transaction tshark sees (both hops of Kamailio), with its RTT, as the capture logs it
    summaries = [orjson.loads(ln) for ln in log.read_bytes().splitlines()
                 if ln.startswith(b"{") and b'"call_summary"' in ln]
    assert len(summaries) == N
    seen = sorted((s["call_sid"], t["method"], t["cseq"], t["rtt_ms"])
                  for s in summaries for t in s["transactions"] if t["method"] != "ACK")
    wire_txs = sorted((t["call_id"], t["method"], t["cseq"], t["rtt_ms"], t["dst"])
                      for t in truth["transactions_list"] if t["method"] != "OPTIONS")
    assert [x[:3] for x in seen] == [x[:3] for x in wire_txs]
    assert all(x[3] is not None for x in seen) and all(x[3] is not None for x in wire_txs)
    # Kamailio stamps each message while it handles it (a sent one after it left), so a hop's RTT
    # from HEP is not the wire's to the microsecond. What causality fixes: Kamailio stamps the
    # request it forwards after the caller's copy arrived, and the callee's response before it
    # forwards it, so the hop behind Kamailio (HEP's shorter RTT of the transaction) is never
    # longer than the caller's hop on the wire; and it is never longer than the caller's hop
    # from HEP. CLOCK_MS allows for the two clocks (Kamailio's and the capture's wall time).
    for i in range(0, len(seen), 2):
        inner_hep, outer_hep = seen[i][3], seen[i + 1][3]
        hops = {w[4]: w[3] for w in wire_txs[i:i + 2]}
        outer_wire = next(rtt for dst, rtt in hops.items() if dst != f"127.0.0.1:{uas_port}")
        assert seen[i][:3] == seen[i + 1][:3] and len(hops) == 2
        assert 0 <= inner_hep <= outer_hep
        assert inner_hep <= outer_wire + CLOCK_MS, (seen[i], wire_txs[i:i + 2])
    for method in ("INVITE", "BYE"):
        assert metric(sig, "signaler_rtt_milliseconds_count", method=method) == \
            sum(1 for t in wire_txs if t[1] == method)


def test_dead_collector_drops_and_counts(tmp_path):
    dead = free_port()  # nothing listens: ICMP port unreachable
    uas_port = free_port()
    with Sidecar(tmp_path, uas_port, "--no-tracing", "--hep-endpoint", f"udp:127.0.0.1:{dead}") as sc:
        uac_rc, uas_rc, caller, _ = run_call_pair(tmp_path, "uac_call", "uas_call", sc.port,
                                                  uas_port, N, rate=20)
        time.sleep(0.5)
        gw = sc.gateway()
    assert uac_rc == 0 and uas_rc == 0
    assert int(caller.stat().get("SuccessfulCall(C)", 0)) == N
    dropped = metric(gw, "sipwatch_hep_dropped_total")
    sent = metric(gw, "sipwatch_hep_sent_total")
    assert dropped > 0
    # every message the sidecar received or sent was either handed to the kernel or counted
    assert sent + dropped == N * 14


@needs_kamailio
def test_capture_forwards_what_it_captures_to_sipcapture(tmp_path):
    """``sipwatch capture --interface lo --hep-endpoint``: the messages it captured reach Kamailio
    sipcapture with their wire addresses, ports and capture timestamps."""
    uas_port = free_port()
    wire = tmp_path / "wire.pcap"
    log = tmp_path / "capture.log"
    with KamailioSipcapture(tmp_path) as kam:
        gw_m = free_port()
        args = [sys.executable, "-m", "sipwatch", "capture", "--interface", "lo",
                "--bpf", f"udp port {uas_port}", "--gateway-metrics", f"127.0.0.1:{gw_m}",
                "--signaling-metrics", "off", "--hep-endpoint", f"udp:127.0.0.1:{kam.port}",
                "--hep-capture-id", str(CAPTURE_ID)]
        with open(log, "wb") as out:
            cap = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                deadline = time.monotonic() + 15
                while b'"capturing"' not in log.read_bytes():
                    assert cap.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.05)
                with Dumpcap(wire, f"udp port {uas_port}"):
                    uac_rc, uas_rc, _, _ = run_call_pair(
                        tmp_path, "uac_call", "uas_answer", uas_port, uas_port, 3, rate=20,
                        uas_extra=("-set", "rtp_port", str(free_port())))
                    deadline = time.monotonic() + 15
                    while metric(scrape(gw_m), "sipwatch_hep_sent_total") < 3 * 7 \
                            and time.monotonic() < deadline:
                        time.sleep(0.2)
            finally:
                stop_process(cap, signal.SIGINT)
        time.sleep(1.0)
    rows = kam.rows()
    assert uac_rc == 0 and uas_rc == 0
    wire_rows = udp_rows(wire, "sip")
    assert len(wire_rows) == len(rows) == 3 * 7
    by_msg = {r["msg"]: r for r in rows}
    assert len(by_msg) == len(rows)
    for w in wire_rows:
        r = by_msg[w["payload"].decode()]
        assert (r["source_ip"], int(r["source_port"]), r["destination_ip"], int(r["destination_port"])) \
            == (*w["src"], *w["dst"])
        assert r["correlation_id"] == r["callid"] == w["call_id"]
        assert r["node"] == f"homer01:{CAPTURE_ID}"
        # the capture's own timestamp of the packet: its dumpcap and the test's each stamp the
        # packet as it reaches them (microseconds apart); db_text keeps only the low 32 bits of
        # the microsecond timestamp (it has no 64-bit integers)
        delta = (int(r["micro_ts"]) - int(w["time"] * 1_000_000)) % 2**32
        assert delta <= CLOCK_MS * 1000 or delta >= 2**32 - CLOCK_MS * 1000, (r["micro_ts"], w["time"])


@needs_sngrep
def test_demo_with_hep_shows_where_the_ladder_is():
    r = subprocess.run([sys.executable, "-m", "sipwatch.demo", "--hep", "--seconds", "2", "--rate", "5",
                        "--hold-ms", "300"], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    # 10 calls of 7 messages, each received and sent by the sidecar, plus 10 call summaries
    assert "HEP: 150 packets sent to sngrep, 0 dropped" in r.stdout, r.stdout
    pcap = r.stdout.split("sngrep -I ")[1].split()[0]
    # (the demo picks its ports itself: one was 11273, which tshark reads as Vuze DHT by number)
    assert len(udp_rows(pcap, "sip", heuristics_first=True)) == 140
