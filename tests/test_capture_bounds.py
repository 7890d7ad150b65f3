"""What a forged stream of fragments or TCP segments can make the capture reader hold and do.

The reader (capture/pcapfile.py) decodes files and, under ``sipwatch capture``, a live
interface: anyone who can put packets on the watched network writes its input. Reassembly keeps
state between packets, so these tests send what a sender that never completes anything sends,
and check that the state stays bounded and the work per packet constant, while the datagrams and
messages of honest senders in between still come out whole.

Work is counted, not timed (Python lines and C calls, as in test_adversarial_cost.py), so the
figures are the same on an idle and a loaded machine (capture/ is never compiled, so the count
holds under the compiled build too, which runs these tests as well).
"""
from __future__ import annotations

import pcapbuild as pb
from capture import pcapfile
from capture.pcapfile import MAX_FRAG_PARTS, Decoder
from test_adversarial_cost import count_events

A, B = "10.0.0.1", "10.0.0.2"


def _fragment_flood(n: int, ident: int = 9) -> list[bytes]:
    """One datagram's worth of 8-byte fragments that never completes: the last one first (its
    length known), then the pieces from the start on, one hole left before the last: each one
    made the reader walk every piece held before it (in Python; the sort of the offsets, already
    in order, is one C call)."""
    frames = [pb.eth(pb.ipv4(A, B, 17, b"z" * 8, ident, (n + 1) * 8, False))]
    frames += [pb.eth(pb.ipv4(A, B, 17, b"y" * 8, ident, k * 8, True)) for k in range(n)]
    return frames


def _held_fragments(dec: Decoder) -> int:
    return sum(len(p) for fs in dec.frags.values() for p in fs.parts.values())


def test_fragment_flood_costs_linear_work_and_is_given_up():
    """Each fragment made the reader look for the whole datagram over every fragment held: a
    forged datagram of n fragments cost n² (8000 in a random order, 464 KB of capture: 2.6 s). Now one
    datagram holds at most MAX_FRAG_PARTS fragments; past that it is given up and counted."""
    costs = {}
    for n in (500, 1000, 2000):
        frames = _fragment_flood(n)
        dec = Decoder({})

        def feed():
            for f in frames:
                dec.frame(1, f, 0.0)
        costs[n] = count_events(feed)
        assert all(len(fs.parts) <= MAX_FRAG_PARTS for fs in dec.frags.values())
        assert dec.c["fragments_dropped"] >= n // (MAX_FRAG_PARTS + 1)
        assert dec.frag_bytes == _held_fragments(dec)
    assert costs[1000] <= 2.3 * costs[500] and costs[2000] <= 2.3 * costs[1000], costs


def test_fragment_bytes_held_are_bounded_and_honest_datagrams_still_reassemble(monkeypatch):
    """Thousands of unfinished datagrams of large fragments: what is held never passes
    MAX_FRAG_BYTES (the oldest go first), the byte count the bound is kept by is exact at every
    step, and a datagram sent whole in three fragments in the middle of it comes out whole."""
    monkeypatch.setattr(pcapfile, "MAX_FRAG_BYTES", 1 << 20)
    dec = Decoder({})
    sip = pb.sip_invite("frag-ok@x", "z9hG4bKfrag", A, B, extra="X-Pad: " + "p" * 3500 + "\r\n")
    honest = [pb.eth(f) for f in pb.ipv4_fragments(A, B, 17, pb.udp(5060, 5060, sip), ident=77)]
    got = []
    for i in range(3000):
        # a datagram's first fragment only (1400 bytes), never the rest
        got += dec.frame(1, pb.eth(pb.ipv4(B, A, 17, b"f" * 1400, 1000 + i, 0, True)), 0.0)
        if 1500 <= i < 1500 + len(honest):
            got += dec.frame(1, honest[i - 1500], 0.0)
        assert dec.frag_bytes == _held_fragments(dec) <= 1 << 20
    assert [p.payload for p in got] == [sip]
    assert dec.c["fragments_dropped"] >= 3000 - (1 << 20) // 1400
    # a fragment sent again replaces the first copy: counted once
    for _ in range(3):
        dec.frame(1, pb.eth(pb.ipv4(B, A, 17, b"g" * 900, 5, 0, True)), 0.0)
    assert dec.frag_bytes == _held_fragments(dec)


def _segment(sport: int, seq: int, payload: bytes, flags: int = 0x18) -> bytes:
    return pb.eth(pb.ipv4(A, B, 6, pb.tcp(sport, 5060, seq, payload, flags)))


def test_tcp_bytes_held_are_bounded_and_honest_connections_still_frame(monkeypatch):
    """Connections that leave a gap before everything they send (held out of order) and ones that
    announce a large body and send it slowly (held until it is complete): the sum held is looked
    at every quarter of MAX_TCP_HELD given to the flows, and the connections holding the most are
    dropped and counted. An honest connection sending a call in the middle keeps its messages."""
    bound = 1 << 20
    monkeypatch.setattr(pcapfile, "MAX_TCP_HELD", bound)
    dec = Decoder({})
    big_head = (b"MESSAGE sip:b@x SIP/2.0\r\nVia: SIP/2.0/TCP 10.0.0.1;branch=z9hG4bKbig\r\n"
                b"Call-ID: big@x\r\nCSeq: 1 MESSAGE\r\nContent-Length: 900000\r\n\r\n")
    seqs = {}
    for port in range(20000, 20300):
        dec.frame(1, _segment(port, 1000, b"", 0x02), 0.0)  # SYN
        seqs[port] = 1001
    invite = pb.sip_invite("tcp-ok@x", "z9hG4bKtcpok", A, B)
    honest_port, honest_seq = 40000, 501
    dec.frame(1, _segment(honest_port, 500, b"", 0x02), 0.0)
    got = []
    for rnd in range(40):
        for port in range(20000, 20300):
            if port % 2:  # out of order: a gap of one byte, then 8 KB at a new place each round
                dec.frame(1, _segment(port, seqs[port] + 1 + rnd * 8192, b"o" * 8192), 0.0)
            else:  # a body that never ends
                data = big_head if rnd == 0 else b"b" * 8192
                got += dec.frame(1, _segment(port, seqs[port], data), 0.0)
                seqs[port] += len(data)
            held = sum(len(f.buf) + f.plen + f.ooo_bytes for f in dec.flows.values())
            assert held <= bound + bound // 4 + 8192
            for f in dec.flows.values():
                assert f.ooo_bytes == sum(len(v) for v in f.ooo.values())
        if rnd in (10, 30):  # the honest call's INVITE, in two segments
            got += dec.frame(1, _segment(honest_port, honest_seq, invite[:100]), 0.0)
            got += dec.frame(1, _segment(honest_port, honest_seq + 100, invite[100:]), 0.0)
            honest_seq += len(invite)
    assert [p.payload for p in got] == [invite, invite]
    assert dec.c["tcp_flows_dropped"] > 0


def test_live_capture_exports_what_was_given_up():
    """``sipwatch capture`` says so on its metrics port when it gives up a reassembly."""
    from prometheus_client import CollectorRegistry, generate_latest

    from capture.live import DecoderMetrics

    dec = Decoder({"frames": 0})
    for f in _fragment_flood(MAX_FRAG_PARTS + 10):
        dec.frame(1, f, 0.0)
    reg = CollectorRegistry()
    reg.register(DecoderMetrics(dec.c))
    text = generate_latest(reg).decode()
    assert 'sipwatch_capture_reassembly_dropped_total{what="ip_fragments"} 1.0' in text
    assert 'sipwatch_capture_reassembly_dropped_total{what="tcp_connections"} 0.0' in text


def test_sdp_floods_leave_live_rtp_state_bounded():
    """``sipwatch capture`` remembers the media ends of every SDP it sees, to tie RTP to calls.
    Bodies of thousands of m= lines and rtpmap lines, a call re-offering new ports again and
    again, and more calls than the monitor keeps: before, 500 such bodies held 743 MB (1.5 million
    endpoints). What is held is now bounded, and an honest call offered after all of it still has
    its RTP tied to it."""
    from capture.live import MAX_CALL_ENDPOINTS, RtpMonitor
    from sipwatch.rtp import MAX_SDP_MEDIA, RtpAnalyzer

    mon = RtpMonitor(max_streams=50)  # (keeps the media ends of max(1000, 4 × 50) calls)
    m_lines = b"".join(b"m=audio %d RTP/AVP 0 8 %d 9999999\r\n" % (2000 + i, 200 + i) for i in range(1500))
    rtpmaps = b"".join(b"a=rtpmap:%d x/8000\r\n" % (128 + i) for i in range(500))
    for c in range(1200):
        body = b"v=0\r\nc=IN IP4 10.9.%d.%d\r\n" % (c >> 8, c & 255) + m_lines + rtpmaps
        mon.add_sdp(b"flood-%d" % c, body)
    for k in range(300):  # one call moving its media on every re-offer
        mon.add_sdp(b"mover", b"v=0\r\nc=IN IP4 10.8.0.1\r\nm=audio %d RTP/AVP 0\r\n" % (10000 + k))
    a = mon.analyzer
    assert len(a.endpoints) <= RtpAnalyzer.MAX_MEDIA_ADDRS
    assert len(mon.call_endpoints) <= mon.max_pending
    assert all(len(eps) <= MAX_CALL_ENDPOINTS for eps in mon.call_endpoints.values())
    assert all(len(eps) <= MAX_SDP_MEDIA for k, eps in mon.call_endpoints.items() if k != b"mover")
    assert all(set(ptmap) <= set(range(128)) for _, ptmap in a.endpoints.values())
    # the mover's newest offers are the ones kept
    assert ("10.8.0.1", 10299) in mon.call_endpoints[b"mover"]
    assert a.endpoints[("10.8.0.1", 10299)][0] == b"mover"
    assert ("10.8.0.1", 10000) not in a.endpoints

    mon.add_sdp(b"honest", b"v=0\r\nc=IN IP4 10.0.0.2\r\nm=audio 5000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
    for i in range(3):
        a.feed(pb.rtp(100 + i, 160 * i, 0x1234, pt=0), ("10.0.0.1", 4000), ("10.0.0.2", 5000), 1.0 + i / 50)
    st = a.streams[(("10.0.0.1", 4000), ("10.0.0.2", 5000), 0x1234)]
    assert st.call_id == "honest" and st.packets == 3


def test_forged_ssrcs_to_a_calls_media_port_do_not_grow_its_summary_without_bound():
    """Every RTP packet with a new SSRC sent to a call's media port is a stream of its own; each
    finished one waited in the call's list until the call ended, so a long call under such a
    flood grew by one entry per packet. Its summary now lists at most MAX_CALL_STREAMS, those
    that carried the most packets, and the metrics still count every stream."""
    from capture.live import MAX_CALL_STREAMS, RtpMonitor
    from sipwatch.state import Call

    mon = RtpMonitor(max_streams=50)
    mon.add_sdp(b"call-x", b"v=0\r\nc=IN IP4 10.0.0.2\r\nm=audio 5000 RTP/AVP 0\r\n")
    src, dst = ("10.0.0.1", 4000), ("10.0.0.2", 5000)
    for i in range(60):  # the call's own stream, 60 packets
        mon.analyzer.feed(pb.rtp(100 + i, 160 * i, 0xCAFE, pt=0), src, dst, 1.0 + i / 50)
    for k in range(3000):  # then one packet each from 3000 forged SSRCs (each from its own port:
        # new SSRCs on one flow past RtpAnalyzer.CHURN_MAX are not streams at all)
        mon.analyzer.feed(pb.rtp(7, 0, 0x10000 + k, pt=0), ("10.6.6.6", 10000 + k), dst, 3.0 + k / 10000)
    assert sum(len(x) for x in mon.by_call.values()) <= MAX_CALL_STREAMS
    mon.call_ended(Call(b"call-x", 1, 1, None, True, 1.0, 1e9, True), 4.0)
    (_, rtp), = mon.tick(10.0)
    assert len(rtp) == MAX_CALL_STREAMS
    assert [r["packets"] for r in rtp if r["ssrc"] == "0x0000CAFE"] == [60]
    assert mon.streams["PCMU"] == 3001


def test_a_bug_one_frame_or_tick_reaches_does_not_end_the_live_capture():
    """``sipwatch capture`` reads dumpcap's records in one loop: anything raised there ended the
    capture (the reader task finished and the process exited 1). A frame that reaches a bug is
    now counted in ``sipwatch_internal_errors_total{component="datagram"}`` and logged, and the
    frames after it are read; a failing housekeeping tick counts as ``tick``."""
    import asyncio
    import io
    import struct
    from types import SimpleNamespace

    from capture.live import LiveCapture
    from sipwatch.logs import JsonLog

    out = io.BytesIO()
    lc = LiveCapture("lo", "", None, log=JsonLog(stream=out))
    seen = []

    def feed(payload, src, dst, ts, transport="udp"):
        if b"boom" in payload:
            raise RuntimeError("a bug reached by this frame")
        seen.append(payload)
        return True
    lc.feed = feed
    frames = [pb.eth(pb.ipv4(A, B, 17, pb.udp(5060, 5060, b"OPTIONS %d boom" % i if i == 1 else
                                                 b"OPTIONS %d" % i))) for i in range(3)]
    lc.header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)

    async def run():
        reader = asyncio.StreamReader()
        for f in frames:
            reader.feed_data(struct.pack("<IIII", 1, 0, len(f), len(f)) + f)
        reader.feed_eof()
        lc.proc = SimpleNamespace(stdout=reader)
        await lc.read()
    asyncio.run(run())
    assert seen == [b"OPTIONS 0", b"OPTIONS 2"]
    errors = lc.observer.stats.internal_errors
    assert errors["datagram"] == 1
    assert b'"internal_error"' in out.getvalue()

    def failing_tick(now):
        raise RuntimeError("a bug in a tick")
    lc.rtp.tick = failing_tick
    lc.housekeeping(10.0)
    assert errors["tick"] == 1


def test_a_syn_flood_does_not_push_out_an_active_sip_connection():
    """The reader keeps 10,000 TCP connections and gave up the oldest *opened* one past that, so
    a SYN flood on the watched network (each SYN a new connection) pushed out a long-lived SIP
    connection between two segments of a message, which was then lost. The least recently active
    one goes now."""
    from capture.pcapfile import MAX_TCP_FLOWS

    dec = Decoder({})
    invite = pb.sip_invite("syn-flood@x", "z9hG4bKsyn", A, B)
    assert dec.frame(1, _segment(5070, 100, b"", 0x02), 0.0) == []
    got = dec.frame(1, _segment(5070, 101, invite[:200]), 0.0)
    for k in range(MAX_TCP_FLOWS + 500):  # every SYN from another port of another address
        dec.frame(1, pb.eth(pb.ipv4(f"10.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}", B, 6,
                                    pb.tcp(1024 + k % 60000, 5060, k, b"", 0x02))), 0.0)
        if k % 2000 == 0:  # the SIP connection stays active meanwhile (a keep-alive)
            got += dec.frame(1, _segment(5070, 101 + 200, b"", 0x10), 0.0)
            got += dec.frame(1, _segment(5070, 99, b"\r\n"), 0.0)  # (a retransmitted byte or two)
    got += dec.frame(1, _segment(5070, 301, invite[200:]), 0.0)
    assert [p.payload for p in got] == [invite]
    assert len(dec.flows) <= MAX_TCP_FLOWS


def test_live_capture_holds_a_bounded_number_of_finished_records(monkeypatch):
    """A wire of ACKs (each one a finished record) faster than the ticks drain them: the queue of
    records waiting for the next tick grew without bound in ``sipwatch capture`` (its observer
    took 2^30). Now past MAX_FINISHED new records are dropped and counted, and a tick drains its
    share as before. (The bound made small here; every frame goes through the live feed.)"""
    import io

    from capture import live
    from capture.live import LiveCapture
    from prometheus_client import generate_latest

    from sipwatch.logs import JsonLog

    monkeypatch.setattr(live, "MAX_FINISHED", 500)
    lc = LiveCapture("lo", "", None, log=JsonLog(stream=io.BytesIO()))
    acks = 1500
    for i in range(acks):
        ack = (b"ACK sip:b@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKack%d\r\n"
               b"From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\nCall-ID: ack-%d\r\nCSeq: 1 ACK\r\n"
               b"Content-Length: 0\r\n\r\n" % (i, i))
        lc.feed(ack, ("10.0.0.1", 5060), ("10.0.0.2", 5060), 1000.0 + i / 1000)
    tracker = lc.observer.tracker
    assert len(tracker.finished) == 500
    assert lc.observer.stats.records_dropped == acks - 500
    assert "sipwatch_records_dropped_total 1000.0" in generate_latest(lc.metrics.gateway).decode()
    lc.housekeeping(1002.0)
    assert len(tracker.finished) == 0  # (a tick takes up to DRAIN_PER_TICK)


def test_distinct_invite_call_ids_are_counted_without_keeping_them():
    """The observer counts distinct INVITE Call-IDs (tshark's "calls") for the life of a live
    capture, up to a million: it kept each Call-ID, whatever its size, after the call itself was
    long forgotten (30-KB Call-IDs: 114 MiB for 4,000). It keeps a hash. Bytes counted with
    tracemalloc, after the tracker has let every call go."""
    import gc
    import tracemalloc

    from sipwatch.observer import Observer

    obs = Observer()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ts = 1000.0
        for i in range(300):
            cid = b"%010d" % i + b"x" * 30000
            obs.feed(b"INVITE sip:b@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK%d\r\n"
                     b"From: <sip:a@h>;tag=1\r\nTo: <sip:b@h>\r\nCall-ID: %s\r\nCSeq: 1 INVITE\r\n\r\n" % (i, cid),
                     ("1.1.1.1", 5060), ("2.2.2.2", 5060), ts)
            ts += 0.001
        for k in range(1, 5):  # (timed out, finished, lingered, gone)
            obs.tracker.expire(ts + 10_000 * k)
            obs.drain_finished()
        assert not obs.tracker.calls and not obs.tracker.transactions
        gc.collect()  # (what the calls left in cycles: the collector's, not the observer's)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(obs.invite_call_ids) == 300
    assert held < 1 << 20, held  # before: 300 x 30 KB = 9 MB held


def _ssrc_flood_events(n: int) -> int:
    """Counted work (Python lines + C calls) of n SDP-tied streams that all carry one SSRC, then
    one RTCP receiver report of 31 blocks naming that SSRC."""
    import struct

    from sipwatch.rtp import RtpAnalyzer
    from test_adversarial_cost import count_events

    a = RtpAnalyzer(max_streams=0)
    for i in range(n):
        a.add_sdp(b"c%d" % i, b"v=0\r\nc=IN IP4 10.0.0.5\r\nm=audio %d RTP/AVP 0\r\n" % (10000 + 2 * i))
    rr = struct.pack("!BBHI", 0x80 | 31, 201, 1 + 31 * 6, 1) + \
        b"".join(struct.pack("!IIIIII", 0xCAFE, 5, 100, 7, 0, 0) for _ in range(31))

    def work():
        for i in range(n):
            a.feed(pb.rtp(1, 160, 0xCAFE, pt=0), ("10.0.0.6", 20000 + i), ("10.0.0.5", 10000 + 2 * i), 1.0 + i / 1e4)
        a.feed(rr, ("10.0.0.6", 20001), ("10.0.0.5", 10001), 2.0)
    events = count_events(work)
    assert len(a.streams) == n
    return events


def test_streams_sharing_an_ssrc_cost_linear_work():
    """A forger's thousands of streams with one SSRC: each new stream re-read the SSRC's whole
    list of streams, and each RTCP report block naming it walked that list (2,000 streams took
    2 s to build; one 752-byte report 34 ms). The list keeps the newest eight."""
    e1, e2, e3 = (_ssrc_flood_events(n) for n in (250, 500, 1000))
    assert e2 <= 2.3 * e1 and e3 <= 2.3 * e2, (e1, e2, e3)


def test_long_connection_addresses_tie_nothing_and_call_ends_stay_bounded_in_all(monkeypatch):
    """An SDP ``c=`` address longer than any IP literal (900 characters held per media end) is
    not an end RTP can come from: ignored. And the media ends remembered per call were bounded
    per call (64) but not in all (64 for each of 16,000 calls, long after the analyzer's own
    table of 65,536 had let them go): now the oldest calls' are forgotten past that bound."""
    from capture.live import RtpMonitor
    from sipwatch.rtp import RtpAnalyzer, parse_sdp

    assert parse_sdp(b"v=0\r\nc=IN IP4 " + b"1" * 900 + b"\r\nm=audio 4000 RTP/AVP 0\r\n") == []
    # an encoding name is kept to 32 characters (a 60-KB one went into every stream's summary)
    long_name = b"v=0\r\nc=IN IP4 10.0.0.1\r\nm=audio 4000 RTP/AVP 96\r\na=rtpmap:96 %s/8000\r\n"
    assert parse_sdp(long_name % (b"opus" * 15_000)) == [("10.0.0.1", 4000, {96: ("opus" * 8, 8000)})]
    assert parse_sdp(long_name % b"telephone-event") == [("10.0.0.1", 4000, {96: ("telephone-event", 8000)})]
    monkeypatch.setattr(RtpAnalyzer, "MAX_MEDIA_ADDRS", 1000)
    m = RtpMonitor()
    for call in range(100):
        body = b"v=0\r\nc=IN IP4 10.1.%d.1\r\n" % call + b"".join(
            b"m=audio %d RTP/AVP 0\r\n" % (4000 + 2 * k) for k in range(40))
        m.add_sdp(b"call-%d" % call, body)
        held = sum(len(ends) for ends in m.call_endpoints.values())
        assert held == m.n_call_endpoints <= 1000 + 40
    assert b"call-99" in m.call_endpoints and b"call-0" not in m.call_endpoints
    # the newest call's ends still tie its RTP
    assert m.analyzer.endpoints[("10.1.99.1", 4000)][0] == b"call-99"


def test_the_streams_waiting_for_their_calls_summaries_are_bounded_in_all():
    """Each call's list was bounded (MAX_CALL_STREAMS) and so was the number of calls, but not
    their product: SDP for 3000 calls, then streams to each, held ~190,000 entries (~100 MB at
    the default sizes, ~550 MB at most). Now at most 16 per stream the table holds, the oldest
    calls' lists given up first."""
    from capture.live import RtpMonitor

    mon = RtpMonitor(max_streams=50)  # at most 800 entries waiting
    for c in range(300):
        mon.add_sdp(b"call-%d" % c, b"v=0\r\nc=IN IP4 10.1.%d.%d\r\nm=audio 5000 RTP/AVP 0\r\n" % (c // 250, c % 250))
    t = 1.0
    for c in range(300):
        dst = ("10.1.%d.%d" % (c // 250, c % 250), 5000)
        for s in range(10):  # ten streams a call, each one 5 packets, from its own port
            for i in range(5):
                mon.analyzer.feed(pb.rtp(i, 160 * i, 0x1000 + s, pt=0), ("10.0.0.1", 20000 + s), dst, t)
                t += 0.001
        t += 20.0  # the last call's streams idle out at the next sweep
        mon.tick(t)
    assert mon.listed == sum(len(x) for x in mon.by_call.values()) <= 16 * 50
    assert "call-299" in mon.by_call and "call-0" not in mon.by_call


def test_calls_already_listed_do_not_grow_past_the_bound_in_all():
    """The bound on entries in all was checked for new calls only: calls listed once each grew
    their lists to MAX_CALL_STREAMS (64,000 entries against a bound of 1,600)."""
    from capture.live import RtpMonitor

    class Finished:
        media, packets, lost, clock, max_jitter = True, 10, 0, 8000, 0.0
        lost_rfc3550, expected_rfc3550 = 0, 10

        def __init__(self, cid):
            self.call_id = cid

        def summary(self):
            return {"ssrc": "0x1", "lost": 0, "lost_rfc3550": 0, "lost_pct": 0.0, "mean_jitter_ms": 0,
                    "max_jitter_ms": 0, "mos": 4.4}

        def codec(self):
            return "PCMA"

    mon = RtpMonitor(max_streams=100)
    for _ in range(64):
        for c in range(1000):
            mon._finish(Finished(f"call{c}"), "idle")
    assert mon.listed == sum(len(x) for x in mon.by_call.values()) <= mon.max_listed
