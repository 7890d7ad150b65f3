"""The cheaper paths ``sipwatch analyze`` takes must change no figure.

Each shortcut is checked against the longer path it stands for: the Ethernet record loop of the
pcap reader against the full decoder (which the encapsulation tests check against tshark), the
text view's report without the per-transaction listing against the full report, the timer
queues' cached head deadline against the head itself, ``looks_like_sip`` against its definition.
Also: analysing a capture loads no numpy (it keeps no RTT ring) and leaves no reference cycles.
"""
from __future__ import annotations

import gc
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

import pcapbuild as pb
from capture.analyze import analyse, looks_like_sip, render
from capture.pcapfile import Decoder, read_packets
from sipwatch.state import DeadlineQueue, Timed

ROOT = Path(__file__).resolve().parents[1]
ETHERNET = 1
# little-endian microsecond pcap files with Ethernet link type (the record loop's case)
CAPTURES = sorted(p for p in (ROOT / "pcaps").rglob("*.pcap")
                  if p.read_bytes()[:4] == b"\xd4\xc3\xb2\xa1" and p.read_bytes()[20:24] == b"\x01\x00\x00\x00")


def _mixed_ethernet_capture(path: Path) -> None:
    """Frames the record loop takes (plain IPv4/UDP, first-seen and repeated addresses) between
    frames it must leave to the decoder: VLAN, IPv6, a fragment, TCP, a tunnel port, ARP, runts."""
    sip = pb.sip_invite("loop-1", "z9hG4bK1")
    frames = [
        pb.eth(pb.ipv4("10.0.0.1", "10.0.0.2", 17, pb.udp(5060, 5060, sip))),
        pb.eth(pb.ipv4("10.0.0.1", "10.0.0.2", 17, pb.udp(5060, 5060, sip)), vlans=((0x8100, 100),)),
        pb.eth(pb.ipv6("fd00::1", "fd00::2", 17, pb.udp(5060, 5060, sip)), etype=0x86DD),
        *(pb.eth(f) for f in pb.ipv4_fragments("10.0.0.3", "10.0.0.2", 17, pb.udp(5060, 5060, sip * 3),
                                                mtu_payload=600)),
        pb.eth(pb.ipv4("10.0.0.1", "10.0.0.2", 6, pb.tcp(5060, 40000, 1, sip))),
        pb.eth(pb.ipv4("10.0.0.1", "10.0.0.2", 17, pb.udp(40000, 4789, b"\x08" + b"\0" * 30))),
        pb.eth(b"\0" * 28, etype=0x0806),
        pb.eth(pb.ipv4("10.0.0.4", "10.0.0.2", 17, pb.udp(40000, 5060, b"")))[:40],
        pb.eth(pb.ipv4("10.0.0.4", "10.0.0.2", 17, pb.udp(40002, 30000, b"\x80" * 172))),
        pb.eth(pb.ipv4("10.0.0.2", "10.0.0.1", 17, pb.udp(5060, 5060, sip))),
    ]
    path.write_bytes(pb.pcap(ETHERNET, [(1_700_000_000 + i / 7, f) for i, f in enumerate(frames)]))


@pytest.mark.parametrize("capture", [*CAPTURES, "mixed"], ids=lambda p: getattr(p, "name", p))
def test_ethernet_record_loop_gives_what_the_full_decoder_gives(capture, tmp_path):
    if capture == "mixed":
        capture = tmp_path / "mixed.pcap"
        _mixed_ethernet_capture(capture)
    data = capture.read_bytes()
    lt, recs = pb.read_pcap(data)
    assert lt == ETHERNET
    want_c: dict = {"frames": 0}
    dec = Decoder(want_c)
    want = []
    for sec, usec, frame in recs:  # (little-endian microsecond files only, as CAPTURES holds)
        want_c["frames"] += 1
        want.extend(dec.frame(ETHERNET, frame, (sec * 10**6 + usec) / 10**6))
    got_c: dict = {}
    got = list(read_packets(str(capture), got_c))
    assert got == want and all(type(g) is type(w) for g, w in zip(got, want))
    assert list(got_c.items()) == list(want_c.items())  # the same counters, in the same key order


def test_the_text_view_needs_no_transaction_listing():
    """The report the text view is rendered from, built without the per-transaction listing,
    renders the same text and counts the same totals."""
    for capture in CAPTURES:
        full = analyse(str(capture))
        lean = analyse(str(capture), transactions=False)
        assert lean["transactions"] == [] and len(full["transactions"]) == full["txn"]["transactions"]
        assert lean["txn"] == full["txn"] and lean["calls"] == full["calls"]
        assert render(lean) == render(full)


def test_timer_queue_pops_what_is_due_in_order_and_first_never_passes_the_head():
    """Random adds, re-adds (to the back), discards and expiry looks, with one delay as each
    timer kind has, against a plain list kept in the same order: the queue pops exactly what a sorted-by-insertion model says is due, and
    its ``first`` is never later than the head's deadline (the tracker's "nothing due" check)."""
    rnd = random.Random(7)
    q: DeadlineQueue = DeadlineQueue()
    model: list = []  # [obj, deadline] in queue order
    objs = [Timed(0.0) for _ in range(200)]
    now = 0.0
    for step in range(20000):
        op = rnd.random()
        if op < 0.45:
            obj = rnd.choice(objs)
            d = now + 32.0  # one kind of timer: one delay
            if any(e[0] is obj for e in model):
                q.move_back(obj, d)
            else:
                q.add(obj, d)
            model[:] = [e for e in model if e[0] is not obj] + [[obj, d]]
        elif op < 0.6 and model:
            obj = rnd.choice(model)[0]
            q.discard(obj)
            model[:] = [e for e in model if e[0] is not obj]
        elif op < 0.65:
            obj = rnd.choice(objs)  # (queued or not: when not, nothing happens)
            q.discard(obj)
            model[:] = [e for e in model if e[0] is not obj]
        else:
            now += rnd.random() * 3
            got = q.pop_due(now)
            if model and model[0][1] <= now:
                assert got is model.pop(0)[0], step
            else:
                assert got is None, step
        assert len(q) == len(model)
        if step % 97 == 0:  # the links, both ways, are the model's order
            forward, o = [], q.head
            while o is not None:
                forward.append(o)
                o = o.q_next
            backward, o = [], q.tail
            while o is not None:
                backward.append(o)
                o = o.q_prev
            assert forward == [e[0] for e in model] == backward[::-1], step
            assert all(o.q_prev is None and o.q_next is None for o in objs if o not in forward)
        if model:
            assert q.first <= model[0][1], step
            assert q.peek() == (model[0][0], model[0][1])
        else:
            assert q.peek() is None
    while q:
        assert q.pop_head() is model.pop(0)[0]
    assert q.pop_due(now + 1e9) is None and q.first == math.inf


@pytest.mark.parametrize("payload", [
    b"SIP/2.0 200 OK\r\n", b"SIP/2.0 ", b"SIP/2.0", b"INVITE sip:a@b SIP/2.0\r\n", b"INVITE sip:a@b SIP/2.0\n",
    b"INVITE sip:a@b SIP/2.0\r\r\n", b"INVITE sip:a@b SIP/2.0 \r\n", b" SIP/2.0\r\n", b"SIP/2.0\r\n",
    b"\nINVITE sip:a@b SIP/2.0\r\n", b"x" * 2030 + b" SIP/2.0\n", b"x" * 2039 + b" SIP/2.0\n",
    b"x" * 2040 + b" SIP/2.0\n", b"\r\r\r\n", b"", b"\x80\x08" * 80 + b"\n", b"  SIP/2.0\r\n",
])
def test_looks_like_sip_is_its_definition(payload):
    nl = payload.find(b"\n", 0, 2048)
    want = payload[:8] == b"SIP/2.0 " or (nl > 0 and payload[:nl].rstrip(b"\r").endswith(b" SIP/2.0"))
    assert looks_like_sip(payload) is want


def test_random_payloads_look_like_sip_exactly_when_the_definition_says():
    rnd = random.Random(11)
    parts = [b"SIP/2.0", b" ", b"\r", b"\n", b"INVITE", b"x", b"SIP/2.0 "]
    for _ in range(20000):
        p = b"".join(rnd.choice(parts) for _ in range(rnd.randint(0, 8)))
        nl = p.find(b"\n", 0, 2048)
        assert looks_like_sip(p) is (p[:8] == b"SIP/2.0 " or (nl > 0 and p[:nl].rstrip(b"\r").endswith(b" SIP/2.0")))


def test_analysing_a_capture_loads_no_numpy():
    code = ("import sys; from capture.analyze import main; "
            f"main([{str(ROOT / 'pcaps' / 'sidecar_call.pcap')!r}]); "
            "sys.stderr.write(str('numpy' in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().endswith("False")
    assert "Call " in r.stdout  # it did analyse the call


def test_an_analysis_leaves_no_reference_cycles():
    """Its calls and transactions are freed by reference counting when it returns: the
    collector (off while it reads) has nothing left to find."""
    gc.collect()
    rep = analyse(str(ROOT / "pcaps" / "register_then_call.pcap"))
    assert rep["calls"]
    assert gc.collect() == 0
