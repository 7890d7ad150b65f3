"""``sipwatch capture`` and ``analyze`` show Call-IDs in their logs and spans as the sidecar does
(``--mask-call-id``, default digits): a Call-ID carrying a phone number (a gateway that builds
them from the caller's number) was written as is by both, beside From/To masked.

Ground truth for the masked form: ``sipwatch mask-call-id`` with the same key, the tool an
operator uses to find a known Call-ID in the sidecar's logs."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pcapbuild as pb
from harness import ROOT, free_port, stop_process
from sipwatch.hep import encode_hep3

CALL_ID = "4915112345678-call@10.0.0.1"
NUMBER = "4915112345678"
KEY = "test-key-for-call-ids"


def one_call() -> list[tuple[float, bytes, tuple, tuple]]:
    """(time, SIP, src, dst) of a call: INVITE, 200, ACK, BYE, 200."""
    a, b = ("10.0.0.1", 5060), ("10.0.0.2", 5060)
    inv = pb.sip_invite(CALL_ID, "z9hG4bK-1")
    ack = inv.replace(b"INVITE sip:", b"ACK sip:", 1).replace(b"CSeq: 1 INVITE", b"CSeq: 1 ACK") \
        .replace(b"branch=z9hG4bK-1", b"branch=z9hG4bK-2").replace(b"To: <sip:+4940987654@10.0.0.2>",
                                                                   b"To: <sip:+4940987654@10.0.0.2>;tag=b1")
    bye = ack.replace(b"ACK sip:", b"BYE sip:", 1).replace(b"CSeq: 1 ACK", b"CSeq: 2 BYE") \
        .replace(b"branch=z9hG4bK-2", b"branch=z9hG4bK-3")
    return [(0.0, inv, a, b), (0.1, pb.sip_response(inv, 200, "OK"), b, a), (0.2, ack, a, b),
            (1.0, bye, a, b), (1.1, pb.sip_response(bye, 200, "OK", to_tag="b1"), b, a)]


def masked(mode: str) -> str:
    out = subprocess.run([sys.executable, "-m", "sipwatch", "mask-call-id", "--mode", mode, CALL_ID],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "SIPWATCH_SECRET": KEY},
                         check=True).stdout.split()
    return out[-1]


def analyze_call_ids(tmp_path, *flags: str) -> set:
    frames = [(1_700_000_000.0 + t, pb.eth(pb.ipv4(s[0], d[0], 17, pb.udp(s[1], d[1], m))))
              for t, m, s, d in one_call()]
    path = tmp_path / "call.pcap"
    path.write_bytes(pb.pcap(1, frames))
    spans = tmp_path / f"spans{'-'.join(flags)}.jsonl"  # (a spans file is appended to)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["SIPWATCH_SECRET"] = KEY
    p = subprocess.run([sys.executable, "-m", "sipwatch", "analyze", str(path), "--spans-file", str(spans),
                        *flags], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    text = spans.read_text()
    ids = set()
    for line in text.splitlines():
        for rs in json.loads(line).get("resourceSpans", []):
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    for kv in span["attributes"]:
                        if kv["key"] == "sip.call_id":
                            ids.add(kv["value"]["stringValue"])
    assert ids, text[:500]
    return ids


def test_analyze_spans_mask_call_ids_as_the_sidecar_does(tmp_path):
    assert analyze_call_ids(tmp_path) == {masked("digits")} and NUMBER not in masked("digits")
    assert analyze_call_ids(tmp_path, "--mask-call-id", "hash") == {masked("hash")}
    assert analyze_call_ids(tmp_path, "--mask-call-id", "none") == {CALL_ID}


def test_capture_logs_mask_call_ids_as_the_sidecar_does(tmp_path):
    """``sipwatch capture --hep-listen``: the call's summary line."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["SIPWATCH_SECRET"] = KEY
    proc = subprocess.Popen([sys.executable, "-m", "sipwatch", "capture", "--hep-listen", f"udp:127.0.0.1:{port}",
                             "--gateway-metrics", "off", "--signaling-metrics", "off", "--timer-b", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        line = proc.stdout.readline()  # "capture started": the listener is up
        assert b"capture" in line, (line, proc.stderr.read() if proc.poll() is not None else b"")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        now = time.time()
        for t, m, s, d in one_call():
            sock.sendto(encode_hep3(m, s, d, now + t), ("127.0.0.1", port))
        summaries = []
        while not summaries and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            rec = json.loads(line)
            if rec.get("event") == "call_summary":
                summaries.append(rec)
    finally:
        stop_process(proc, signal.SIGTERM)
    assert [s["call_sid"] for s in summaries] == [masked("digits")]
    assert NUMBER not in json.dumps(summaries)


def call_with_rtp() -> list[tuple[float, bytes, tuple, tuple]]:
    """``one_call`` with an offer and answer, and 50 RTP packets each way while it is up."""
    a, b = ("10.0.0.1", 5060), ("10.0.0.2", 5060)
    inv = pb.sip_invite(CALL_ID, "z9hG4bK-1", body=pb.sdp("10.0.0.1", 40000))
    ok = pb.sip_response(inv, 200, "OK", body=pb.sdp("10.0.0.2", 50000))
    rest = one_call()[2:]
    media = []
    for i in range(50):
        t = 0.3 + i * 0.02
        media.append((t, pb.rtp(i, i * 160, 0x1111), ("10.0.0.1", 40000), ("10.0.0.2", 50000)))
        media.append((t + 0.001, pb.rtp(i, i * 160, 0x2222), ("10.0.0.2", 50000), ("10.0.0.1", 40000)))
    return [(0.0, inv, a, b), (0.1, ok, b, a), rest[0], *media, *rest[1:]]


def analyze_report(tmp_path, *flags: str) -> tuple[dict, str]:
    """``sipwatch analyze --json`` and its text view of :func:`call_with_rtp`."""
    frames = [(1_700_000_000.0 + t, pb.eth(pb.ipv4(s[0], d[0], 17, pb.udp(s[1], d[1], m))))
              for t, m, s, d in call_with_rtp()]
    path = tmp_path / "call-rtp.pcap"
    path.write_bytes(pb.pcap(1, frames))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["SIPWATCH_SECRET"] = KEY
    out = []
    for extra in (["--json"], []):
        p = subprocess.run([sys.executable, "-m", "sipwatch", "analyze", str(path), *extra, *flags],
                           capture_output=True, text=True, cwd=ROOT, env=env)
        assert p.returncode == 0, p.stderr
        out.append(p.stdout)
    return json.loads(out[0]), out[1]


def test_analyze_report_shows_call_ids_as_the_sidecar_does(tmp_path):
    """The report itself (every call, transaction and RTP stream, JSON and text), not only the
    spans: it is what gets pasted into a ticket. It showed the capture's Call-IDs as they were."""
    for flags, want in (((), masked("digits")), (("--mask-call-id", "hash"), masked("hash")),
                        (("--mask-call-id", "none"), CALL_ID), (("--mask-numbers", "none"), CALL_ID)):
        rep, text = analyze_report(tmp_path, *flags)
        assert [c["call_sid"] for c in rep["calls"]] == [want], flags
        assert {t["call_id"] for t in rep["transactions"]} == {want}, flags
        streams = rep["calls"][0]["rtp_streams"]
        assert len(streams) == 2 and {s["call_id"] for s in streams} == {want}, (flags, streams)
        assert {s["call_id"] for s in rep["rtp_streams"]} == {want}, flags
        assert f"Call {want}" in text, (flags, text[:400])
        if want != CALL_ID:
            assert NUMBER not in json.dumps(rep) and NUMBER not in text, flags
