"""SIP over TCP as a capture really holds it: segments the capture missed, retransmissions cut at
other boundaries, forged SYNs, SYN floods, and pcapng blocks whose lengths lie.

Each test builds its capture with ``pcapbuild`` and checks what the reader (capture/pcapfile.py)
frames against what the test put in: the messages themselves, byte for byte and in order, and,
where tshark frames the same capture, against tshark's Call-IDs too.
"""
from __future__ import annotations

import shutil
import struct
import subprocess

import pcapbuild as pb
import pytest

from capture.analyze import capture_warnings
from capture import pcapfile
from capture.pcapfile import MAX_TCP_FLOWS, Decoder, read_packets

MAX_TCP_OOO = getattr(pcapfile, "MAX_TCP_OOO", 256)  # (the bound before it was named)

A, B = "10.0.0.1", "10.0.0.2"


def _seg(ts, seq, payload=b"", flags=0x18, sport=40000, src=A):
    return ts, pb.eth(pb.ipv4(src, B, 6, pb.tcp(sport, 5060, seq, payload, flags)))


def _invites(n: int, tag: str = "call", sdp: bool = False) -> list[bytes]:
    body = pb.sdp(A, 4000) if sdp else b""
    return [pb.sip_invite(f"{tag}{i}", f"z9hG4bK{tag}{i}", A, B, body=body, transport="TCP")
            for i in range(n)]


def _read(tmp_path, frames, name="c.pcap"):
    path = tmp_path / name
    path.write_bytes(pb.pcap(1, frames))
    counters: dict = {}
    got = [p.payload for p in read_packets(str(path), counters) if p.transport == "tcp"]
    return path, got, counters


def _tshark_invite_call_ids(path) -> set[str] | None:
    if shutil.which("tshark") is None:
        return None
    out = subprocess.run(["tshark", "-r", str(path), "-Y", 'sip.Method == "INVITE"', "-T", "fields",
                          "-e", "sip.Call-ID"], capture_output=True, text=True, timeout=120).stdout
    return {c for line in out.split() for c in line.split(",") if c}


def _call_ids(payloads) -> list[str]:
    out = []
    for p in payloads:
        for line in p.split(b"\r\n"):
            if line.startswith(b"Call-ID: "):
                out.append(line[9:].decode())
    return out


@pytest.mark.parametrize("spacing", [0.01, 0.0])  # the hole times out / the held store fills
def test_a_segment_the_capture_missed_costs_its_message_not_the_connection(tmp_path, spacing):
    """dumpcap dropped one segment (the peer got it, so it is never sent again): every later
    segment waited behind the hole until 256 were held, then the rest were thrown away uncounted
    (399 INVITEs in the capture, 1 seen). The hole is given up and counted (``tcp_gaps``)."""
    n = 400
    msgs = _invites(n)
    frames, seq = [_seg(1.0, 999, flags=0x02)], 1000
    for i, m in enumerate(msgs):
        if i != 1:
            frames.append(_seg(1.0 + i * spacing, seq, m))
        seq += len(m)
    path, got, counters = _read(tmp_path, frames)
    want = msgs[:1] + msgs[2:]
    assert got == want
    assert counters["tcp_gaps"] == 1
    assert "tcp_flows_dropped" not in counters
    assert any("1 holes in TCP streams" in w for w in capture_warnings(counters, len(got), len(got)))
    tshark = _tshark_invite_call_ids(path)
    if tshark is not None:
        assert tshark == set(_call_ids(want))


@pytest.mark.parametrize("size, lost", [(300, 3), (700, 2), (1000, 1), (173, 9), (451, 4)])
def test_after_a_hole_inside_messages_framing_resumes_at_the_next_start_line(tmp_path, size, lost):
    """The missing segment cuts two messages (segments of a fixed size, not message
    boundaries): the half before the hole is not glued to what follows it, and the first message
    starting after the hole comes out whole, even when a segment ends inside its start line."""
    msgs = _invites(60, sdp=True)
    stream = b"".join(msgs)
    frames = [_seg(1.0, 999, flags=0x02)]
    for k, o in enumerate(range(0, len(stream), size)):
        if k != lost:
            frames.append(_seg(1.0 + k * 0.001, 1000 + o, stream[o:o + size]))
    _, got, counters = _read(tmp_path, frames)
    hole = (lost * size, (lost + 1) * size)
    want, o = [], 0
    for m in msgs:  # every message with no byte in the hole
        if o + len(m) <= hole[0] or o >= hole[1]:
            want.append(m)
        o += len(m)
    assert got == want
    assert counters["tcp_gaps"] == 1


def test_a_hole_given_up_while_a_start_line_is_half_there_keeps_that_message(tmp_path):
    """The hole times out while what is held after it ends three bytes into the next start line
    (``INV``): those bytes are kept for the rest of the line, not skipped as junk."""
    msgs = _invites(6, sdp=True)
    stream = b"".join(msgs)
    starts = [sum(len(m) for m in msgs[:i]) for i in range(len(msgs))]
    a, b, c = starts[1] + 40, starts[1] + 200, starts[2] + 3  # the hole cuts message 1
    frames = [_seg(1.0, 999, flags=0x02), _seg(1.0, 1000, stream[:a]),
              _seg(1.1, 1000 + b, stream[b:c]), _seg(5.0, 1000 + c, stream[c:])]
    _, got, counters = _read(tmp_path, frames)
    assert got == [msgs[0]] + msgs[2:]
    assert counters["tcp_gaps"] == 1


@pytest.mark.parametrize("isn", [999, 0xFFFFFFFF - 3000])  # the second wraps at 2**32
def test_retransmissions_cut_at_other_boundaries_do_not_stall_the_connection(tmp_path, isn):
    """A held segment was released only when the stream reached its exact start, so one that
    overlaps what came before it (a retransmission re-segmented) stalled the connection for good
    (1 of 50 INVITEs seen). Held segments are taken lowest first, their overlap cut off."""
    msgs = _invites(50)
    stream = b"".join(msgs)
    base = (isn + 1) & 0xFFFFFFFF
    frames = [_seg(1.0, isn, flags=0x02)]
    cuts = list(range(0, len(stream), 700)) + [len(stream)]
    t = 1.0
    for k in range(len(cuts) - 1):
        a, b = cuts[k], cuts[k + 1]
        t += 0.001
        if k % 3 == 1 and k < len(cuts) - 3:  # its first send is not seen: the next goes ahead ...
            continue
        frames.append(_seg(t, base + a, stream[a:b]))
        if k % 3 == 2:  # ... then the lost one comes again, cut wider on both sides
            pa, pb_ = max(0, cuts[k - 1] - 150), min(len(stream), cuts[k] + 250)
            frames.append(_seg(t + 0.0005, base + pa, stream[pa:pb_]))
    _, got, counters = _read(tmp_path, frames)
    assert got == msgs
    assert "tcp_gaps" not in counters
    # the same overlaps with every pair of segments swapped around the wrap too
    frames2 = [frames[0]]
    body = frames[1:]
    for i in range(0, len(body) - 1, 2):
        frames2 += [body[i + 1], body[i]]
    frames2 += body[len(frames2) - 1:]
    _, got2, _ = _read(tmp_path, frames2, "swapped.pcap")
    assert got2 == msgs


@pytest.mark.parametrize("forgery", ["syn", "rst+syn"])
def test_a_forged_syn_does_not_restart_an_established_connection(tmp_path, forgery):
    """A SYN with a forged ISN on an established connection restarted reassembly there: 90 of
    100 INVITEs were lost, miscounted as retransmissions. A real endpoint ignores it (RFC 5961);
    so does the reader now (``tcp_syn_ignored``). After a forged RST (which ends the flow here),
    a SYN's ISN the data does not follow is not trusted either."""
    msgs = _invites(100)
    frames, seq = [_seg(1.0, 999, flags=0x02)], 1000
    for i, m in enumerate(msgs):
        if i == 10:
            if forgery == "rst+syn":
                frames.append(_seg(1.1, 0x12345678, flags=0x04))
            frames.append(_seg(1.1, 0x12345678, flags=0x02))
        frames.append(_seg(1.0 + i / 100, seq, m))
        seq += len(m)
    # the connection closes (FIN with the last data), the 4-tuple is opened again: a new ISN
    more = _invites(5, "again")
    frames[-1] = _seg(2.0, seq - len(msgs[-1]), msgs[-1], flags=0x19)
    frames.append(_seg(3.0, 77_000_000, flags=0x02))
    seq = 77_000_001
    for i, m in enumerate(more):
        frames.append(_seg(3.1 + i / 100, seq, m))
        seq += len(m)
    _, got, counters = _read(tmp_path, frames)
    assert got == msgs + more
    assert "tcp_retransmissions" not in counters
    if forgery == "syn":
        assert counters["tcp_syn_ignored"] == 1


def test_a_syn_flood_pushes_out_no_connection_that_carries_sip(tmp_path):
    """Half an INVITE, 12,000 SYNs from other addresses, then the rest: the least recently
    active flow went, the call was lost and nothing was counted. Connections that only saw a SYN
    go first, and a bare SYN never pushes out a connection that carried data."""
    victim, after = _invites(1, "victim")[0], _invites(1, "after")[0]
    frames = [_seg(1.0, 999, flags=0x02), _seg(1.01, 1000, victim[:100])]
    for i in range(12_000):
        frames.append(_seg(1.02, i * 7, flags=0x02, sport=1024 + i % 60000,
                           src=f"10.7.{i >> 8 & 255}.{i & 255}"))
    frames += [_seg(1.5, 1100, victim[100:]), _seg(1.6, 1000 + len(victim), after)]
    path, got, counters = _read(tmp_path, frames)
    assert got == [victim, after]
    assert "tcp_flows_dropped" not in counters
    tshark = _tshark_invite_call_ids(path)
    if tshark is not None:
        assert tshark == {"victim0", "after0"}

    # a table full of connections each holding half a message: a SYN flood pushes none out
    dec = Decoder({})
    halves = {}
    for i in range(MAX_TCP_FLOWS):
        m = pb.sip_invite(f"f{i}", f"z9hG4bKf{i}", A, B, transport="TCP")
        halves[i] = m
        src = f"10.9.{i >> 8 & 255}.{i & 255}"
        dec.frame(1, _seg(1.0, 5000, m[:50], src=src)[1], 1.0)
    for i in range(3000):
        dec.frame(1, _seg(1.1, i, flags=0x02, sport=2000 + i, src="10.8.0.1")[1], 1.1)
    assert "tcp_flows_dropped" not in dec.c
    assert dec.c["tcp_syn_ignored"] == 3000
    out = []
    for i in range(1, MAX_TCP_FLOWS):  # (flow 0 comes last: it is the least recently active)
        src = f"10.9.{i >> 8 & 255}.{i & 255}"
        out += dec.frame(1, _seg(1.2, 5050, halves[i][50:], src=src)[1], 1.2)
    assert [p.payload for p in out] == [halves[i] for i in range(1, MAX_TCP_FLOWS)]
    # one connection more with data: the least recently active goes, holding half a message
    dec.frame(1, _seg(1.3, 1, b"INVITE", src="10.8.0.2")[1], 1.3)
    assert dec.c["tcp_flows_dropped"] == 1
    assert any("1 TCP connections" in w for w in capture_warnings(dec.c, 1, 1))
    assert dec.frame(1, _seg(1.4, 5050, halves[0][50:], src="10.9.0.0")[1], 1.4) == []


def test_the_held_store_stays_bounded_and_linear():
    """Every segment ahead of a hole that never fills: at most MAX_TCP_OOO held, the hole given
    up each time the store fills, each held segment taken once."""
    dec = Decoder({})
    dec.frame(1, _seg(0.0, 999, flags=0x02)[1], 0.0)
    first = _invites(1)[0]
    assert [p.payload for p in dec.frame(1, _seg(0.0, 1000, first)[1], 0.0)] == [first]
    seq = 1000 + len(first)
    for k in range(20 * MAX_TCP_OOO):
        if k % (MAX_TCP_OOO + 1) == 0:
            seq += 10  # a hole
        dec.frame(1, _seg(0.0, seq, b"x" * 10)[1], 0.0)
        seq += 10
        (flow,) = dec.flows.values()
        assert len(flow.ooo) <= MAX_TCP_OOO and len(flow.heap) == len(flow.ooo)
        assert flow.ooo_bytes == sum(len(v) for v in flow.ooo.values())
    assert dec.c["tcp_gaps"] == 19


def _blk(t, body, tlen=None):
    n = 12 + len(body)
    return struct.pack("<II", t, n if tlen is None else tlen) + body + struct.pack("<I", n)


_SHB = _blk(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
_IDB = _blk(1, struct.pack("<HHI", 1, 0, 0))


def _frame(call_id: str) -> bytes:
    return pb.eth(pb.ipv4(A, B, 17, pb.udp(5060, 5060, pb.sip_invite(call_id, "z9hG4bK" + call_id))))


def _epb(frame: bytes, tlen=None) -> bytes:
    body = struct.pack("<IIIII", 0, 0, 0, len(frame), len(frame)) + frame + b"\0" * (-len(frame) % 4)
    return _blk(6, body, tlen)


def _udp_call_ids(tmp_path, data: bytes):
    path = tmp_path / "c.pcapng"
    path.write_bytes(data)
    counters: dict = {}
    return _call_ids(p.payload for p in read_packets(str(path), counters)), counters


def test_a_pcapng_block_whose_length_lies_does_not_swallow_the_next(tmp_path):
    """A block's leading length was never compared with its trailing copy: one that lies within
    the file read the next block as its own padding. The damaged block is counted (``truncated``)
    and reading goes on at the block after it."""
    one, two, three = _epb(_frame("one")), _epb(_frame("two")), _epb(_frame("three"))
    lying = _epb(_frame("one"), tlen=len(one) + len(two))
    got, counters = _udp_call_ids(tmp_path, _SHB + _IDB + lying + two + three)
    assert got == ["two", "three"]
    assert counters["truncated"] == 1
    # no trailing copy fits: reading stops there, counted
    broken = one[:-4] + struct.pack("<I", 8)
    got, counters = _udp_call_ids(tmp_path, _SHB + _IDB + two + broken + three)
    assert got == ["two"]
    assert counters["truncated"] == 1


def test_a_simple_packet_block_before_any_interface_is_counted(tmp_path):
    fr = _frame("spb")
    spb = _blk(3, struct.pack("<I", len(fr)) + fr + b"\0" * (-len(fr) % 4))
    got, counters = _udp_call_ids(tmp_path, _SHB + spb + _IDB + _epb(_frame("epb")))
    assert got == ["epb"]
    assert counters["unknown_interface"] == 1


def _stream(msgs, seq, t0, step, sport=40000):
    frames = []
    for i, m in enumerate(msgs):
        frames.append(_seg(t0 + i * step, seq, m, sport=sport))
        seq += len(m)
    return frames, seq


def _read_stamped(tmp_path, frames, name="s.pcap"):
    path = tmp_path / name
    path.write_bytes(pb.pcap(1, frames))
    counters: dict = {}
    got = [(p.payload, p.ts) for p in read_packets(str(path), counters) if p.transport == "tcp"]
    return got, counters


def test_a_forged_first_segment_does_not_take_the_stream(tmp_path):
    """SYN, then one forged segment 2^30 past its ISN, then the real stream: the forged one was
    taken for the start and every real byte for old data (0 of 100 seen)."""
    msgs = _invites(100)
    frames = [_seg(1.0, 999, flags=0x02), _seg(1.0005, 1000 + (1 << 30), b"x" * 100)]
    more, _ = _stream(msgs, 1000, 1.001, 0.001)
    got, counters = _read_stamped(tmp_path, frames + more)
    assert [p for p, _ in got] == msgs


def test_a_far_segment_held_does_not_make_a_later_reordering_a_lost_stream(tmp_path):
    """A segment far past the stream arrived after real data; seconds later two neighbours
    swapped places: the hole's clock ran from the old segment, the give-up jumped to it, and half
    the stream was lost as retransmissions."""
    msgs = _invites(100)
    frames, seq = _stream(msgs[:50], 1000, 1.0, 0.001)
    frames.insert(10, _seg(1.0095, 1000 + (1 << 30), b"x" * 100))
    rest, _ = _stream(msgs[50:], seq, 6.0, 0.001)
    rest[0], rest[1] = rest[1], rest[0]
    got, counters = _read_stamped(tmp_path, [_seg(0.9, 999, flags=0x02)] + frames + rest)
    assert [p for p, _ in got] == msgs
    assert "tcp_retransmissions" not in counters


@pytest.mark.parametrize("isn", [10, 50_000_000])  # the new ISN behind the old stream, or ahead
def test_a_connection_opened_again_without_its_close_captured_is_followed(tmp_path, isn):
    """A phone reconnects from the same address and port with a new ISN, the old connection's
    end not in the capture: with every SYN on a connection that carried data ignored, the new
    stream was old data (20 of 70) or held until the end and stamped then."""
    old, new = _invites(20, "old"), _invites(50, "new")
    frames, _ = _stream(old, 1_000_000, 1.0, 0.01)
    frames.append(_seg(100.0, isn - 1, flags=0x02))
    more, _ = _stream(new, isn, 100.01, 0.01)
    got, counters = _read_stamped(tmp_path, [_seg(0.9, 999_999, flags=0x02)] + frames + more)
    assert [p for p, _ in got] == old + new
    assert all(abs(t - (100.01 + i * 0.01)) < 1e-6 for i, (_, t) in enumerate(got[20:]))


def test_messages_after_a_hole_given_up_keep_their_own_time(tmp_path):
    """One segment missed, messages 10 ms apart: those released when the hole was given up were
    stamped with the segment that released them (up to 2.56 s late), or with the capture's last."""
    msgs = _invites(400)
    frames, seq = [_seg(0.99, 999, flags=0x02)], 1000
    for i, m in enumerate(msgs):
        if i != 1:
            frames.append(_seg(1.0 + i * 0.01, seq, m))
        seq += len(m)
    got, counters = _read_stamped(tmp_path, frames)
    assert [p for p, _ in got] == msgs[:1] + msgs[2:]
    want = [1.0] + [1.0 + i * 0.01 for i in range(2, 400)]
    assert max(abs(t - w) for (_, t), w in zip(got, want)) < 1e-6
    assert counters["tcp_gaps"] == 1


def test_a_close_gives_up_the_hole_and_frames_what_is_held(tmp_path):
    """c0, (c1 missed), c2, c3, c4, then a FIN without data: only c0 was seen, nothing counted."""
    msgs = _invites(5, "c")
    frames, seq = [_seg(0.99, 999, flags=0x02)], 1000
    for i, m in enumerate(msgs):
        if i != 1:
            frames.append(_seg(1.0 + i * 0.01, seq, m))
        seq += len(m)
    frames.append(_seg(1.2, seq, flags=0x11))
    got, counters = _read_stamped(tmp_path, frames)
    assert [p for p, _ in got] == [msgs[0], msgs[2], msgs[3], msgs[4]]
    assert counters["tcp_gaps"] == 1


def test_a_stream_that_lost_its_place_starts_again(tmp_path):
    """Our place taken by something we could not see through (32 segments in a row behind the
    stream or out of its window): reassembly starts again at the stream's own segments."""
    msgs = _invites(80)
    frames, _ = _stream(msgs[:10], 1000, 1.0, 0.001)
    # the capture lost ~100 MB of this connection (more than any window it follows)
    later, _ = _stream(msgs[10:], 1000 + (100 << 20), 2.0, 0.001)
    got, counters = _read_stamped(tmp_path, [_seg(0.99, 999, flags=0x02)] + frames + later)
    seen = [p for p, _ in got]
    assert seen[:10] == msgs[:10] and seen[10:] == msgs[10 + 31:]
    assert counters["tcp_resyncs"] == 1
