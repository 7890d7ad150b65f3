"""Transaction and call state (sipwatch/state.py) and the observer on top of it, with injected time.

The expected figures come from the timelines the tests build and from RFC 3261: Timer B/F
(64*T1) until a provisional, Timer C (> 3 min, restarted by each provisional) for an INVITE
after one (§16.6 step 11, §16.7 step 2, §17.1.1.2); state that ended is dropped after its linger
(§17.1.1.2 Timer D, §17.1.2.2 Timer K / §17.2.2 Timer J); forks answer with another To-tag
(§16.7 step 5); a Call-ID reused by REGISTER then INVITE (§8.1.1.4, §10.2.4) is one call.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

import pcapbuild as pb
from capture.analyze import analyse, render
from sipwatch.observer import Observer
from sipwatch.state import ENDED_BY, Tracker, memory_per_call
from sipwatch.stats import (
    ACK, ANSWERED, BYE, CANCELLED, INVITE, METHOD_INDEX, REJ4, TIMEOUT, Stats,
)

REGISTER = METHOD_INDEX[b"REGISTER"]
OPTIONS = METHOD_INDEX[b"OPTIONS"]
T0 = 1000.0
PEER = ("10.0.0.2", 5060)


def tracker(**kw) -> Tracker:
    return Tracker(Stats(ring_size=64), **kw)


class Driver:
    """A tiny UAC/proxy view of a Tracker: requests and responses by name."""

    def __init__(self, tr: Tracker):
        self.tr = tr
        self.n = 0

    def call(self, cid: bytes, now: float, is_call: bool = True):
        return self.tr.new_call(cid, 1, 2, None, True, now, is_call)

    def req(self, call, method: bytes, now: float, cseq: int = 1, initial: bool | None = None,
            branch: bytes | None = None):
        self.n += 1
        midx = METHOD_INDEX.get(method, 14)
        if initial is None:
            initial = method == b"INVITE" and call.is_call
        key = (branch or b"br%d" % self.n, method)
        self.tr.request(key, midx, method, cseq, call, now, 3, call.span_id, 0, PEER, initial)
        return key

    def invite_call(self, cid: bytes, now: float, answer_at: float | None = None):
        call = self.call(cid, now)
        key = self.req(call, b"INVITE", now)
        self.tr.response(key, 100, now + 0.01)
        if answer_at is not None:
            self.tr.response(key, 200, answer_at, b"totag")
            self.tr.ack(ACK, b"ACK", 1, call, answer_at + 0.01, 4, 0, PEER)
        return call, key

    def bye(self, call, now: float):
        key = self.req(call, b"BYE", now, cseq=2)
        self.tr.response(key, 200, now + 0.01)
        return key


def drained(tr: Tracker, kind: str = "call") -> list:
    out = [obj for k, obj in tr.finished if k == kind]
    tr.finished.clear()
    return out


# -- 1. Timer B until a provisional, then Timer C -------------------------------------------
def test_ringing_40s_then_answered_is_answered_not_a_timeout():
    tr = tracker(timer_b=32.0, timer_c=180.0)
    d = Driver(tr)
    call = d.call(b"ring40", T0)
    key = d.req(call, b"INVITE", T0)
    tr.response(key, 100, T0 + 0.01)
    tr.response(key, 180, T0 + 1.0)
    for t in range(2, 41):  # housekeeping ticks while it rings, past Timer B
        tr.expire(T0 + t)
    assert tr.stats.timeouts[INVITE] == 0 and tr.stats.calls[TIMEOUT] == 0
    tx = tr.response(key, 200, T0 + 40.0, b"callee")
    assert tx is not None and tx.status == 200 and not tx.timed_out
    assert tr.stats.calls[ANSWERED] == 1 and sum(tr.stats.calls) == 1
    assert tr.stats.active_calls == 1 and call.t_answer == T0 + 40.0
    assert tr.stats.response_retransmissions == 0


def test_a_response_stamped_before_its_request_is_taken_at_the_request():
    """A response is never earlier than the request it answers: stamped so (a capture merged
    from two clocks, a wall-clock step under the proxy's arrival stamps) it is taken at the
    request's time, not as a negative RTT, setup or answer time."""
    tr = tracker()
    d = Driver(tr)
    call = d.call(b"early", T0)
    key = d.req(call, b"INVITE", T0 + 1.0)
    tr.response(key, 180, T0 + 0.5)
    tx = tr.response(key, 200, T0 + 2.0, b"callee")
    assert tx.t_first == T0 + 1.0 and tx.events[0] == (180, T0 + 1.0)
    assert call.t_setup == T0 + 1.0 and call.t_answer == T0 + 2.0
    tr.stats.ring.fold()
    assert tr.stats.ring.sums[INVITE] == 0.0 and tr.stats.ring.counts[INVITE].sum() == 1


def test_provisional_then_silence_times_out_at_timer_c_restarted_by_each_provisional():
    tr = tracker(timer_b=32.0, timer_c=180.0)
    d = Driver(tr)
    call = d.call(b"ring-forever", T0)
    key = d.req(call, b"INVITE", T0)
    tr.response(key, 180, T0 + 1.0)
    tr.response(key, 180, T0 + 61.0)  # RFC 3261 §13.3.1.1: the UAS repeats 180 every minute
    tr.response(key, 183, T0 + 121.0)
    tr.expire(T0 + 121.0 + 179.9)
    assert tr.stats.timeouts[INVITE] == 0 and not call.finished
    tr.expire(T0 + 121.0 + 180.0)
    assert tr.stats.timeouts[INVITE] == 1 and tr.stats.calls[TIMEOUT] == 1
    assert call.finished and call.outcome == TIMEOUT and call.ended_by == "timeout"
    assert call.t_end == T0 + 301.0
    assert key not in tr.transactions
    # a late 200 matches nothing and changes no count
    assert tr.response(key, 200, T0 + 302.0) is None
    assert tr.stats.calls[ANSWERED] == 0


def test_no_provisional_still_times_out_at_timer_b():
    tr = tracker(timer_b=32.0, timer_c=180.0)
    d = Driver(tr)
    call = d.call(b"silent", T0)
    d.req(call, b"INVITE", T0)
    tr.expire(T0 + 31.99)
    assert tr.stats.timeouts[INVITE] == 0
    tr.expire(T0 + 32.0)
    assert tr.stats.timeouts[INVITE] == 1 and call.outcome == TIMEOUT and call.ended_by == "timeout"


def test_non_invite_keeps_timer_f_after_a_provisional():
    tr = tracker(timer_b=32.0, timer_c=180.0)
    d = Driver(tr)
    entry = d.call(b"opt", T0, is_call=False)
    key = d.req(entry, b"OPTIONS", T0)
    tr.response(key, 100, T0 + 0.5)
    tr.expire(T0 + 32.0)
    assert tr.stats.timeouts[OPTIONS] == 1 and entry.ended_by == "timeout"


def test_observer_ringing_40s_capture_is_answered():
    obs = Observer(timer_b=32.0)
    a, b = ("10.0.0.1", 5060), ("10.0.0.2", 5060)
    inv = pb.sip_invite("longring@x", "z9hG4bKlr1")
    obs.feed(inv, a, b, T0)
    obs.feed(pb.sip_response(inv, 100, "Trying", to_tag="t"), b, a, T0 + 0.01)
    obs.feed(pb.sip_response(inv, 180, "Ringing", to_tag="t"), b, a, T0 + 1.0)
    obs.feed(b"\r\n\r\n", a, b, T0 + 35.0)  # packets keep coming while it rings
    obs.feed(pb.sip_response(inv, 200, "OK", to_tag="t"), b, a, T0 + 40.0)
    obs.finish()
    recs = obs.drain_finished()
    calls = [c for k, c in recs if k == "call"]
    assert obs.unmatched_responses == 0
    assert obs.stats.timeouts[INVITE] == 0 and obs.stats.calls[TIMEOUT] == 0
    assert len(calls) == 1 and calls[0].outcome == ANSWERED and calls[0].status == 200


def test_ringing_at_end_of_capture_is_unanswered_at_eof_not_timeout():
    obs = Observer(timer_b=32.0)
    a, b = ("10.0.0.1", 5060), ("10.0.0.2", 5060)
    inv = pb.sip_invite("cut@x", "z9hG4bKcut")
    obs.feed(inv, a, b, T0)
    obs.feed(pb.sip_response(inv, 180, "Ringing", to_tag="t"), b, a, T0 + 1.0)
    obs.feed(b"\r\n\r\n", a, b, T0 + 50.0)
    obs.finish()
    recs = obs.drain_finished()
    calls = [c for k, c in recs if k == "call"]
    txs = [t for k, t in recs if k == "tx"]
    assert len(calls) == 1 and calls[0].outcome < 0 and calls[0].ended_by == "eof"
    assert obs.eof_calls == 1 and obs.stats.calls[TIMEOUT] == 0 and sum(obs.stats.timeouts) == 0
    assert len(txs) == 1 and txs[0] in obs.eof_txs and not txs[0].timed_out


# -- 2. state that ends, leaves ---------------------------------------------------------------
def test_ended_calls_leave_after_linger_while_a_long_answered_call_stays():
    tr = tracker(timer_b=32.0)
    d = Driver(tr)
    long_call, _ = d.invite_call(b"long", T0, answer_at=T0 + 1.0)
    n = 20_000
    for i in range(n):
        t = T0 + 2.0 + i * 0.01
        call, _ = d.invite_call(b"short-%d" % i, t, answer_at=t + 0.05)
        d.bye(call, t + 0.1)
        if not i % 500:
            tr.expire(t)
    last_end = T0 + 2.0 + (n - 1) * 0.01 + 0.11
    assert tr.stats.active_calls == 1
    tr.expire(last_end + 32.0 + 0.01)
    assert list(tr.calls) == [b"long"] and tr.calls[b"long"] is long_call
    assert not tr.transactions
    # what left the table left its timer: only the long call still waits on one
    assert tr.queued() == 1
    ended = drained(tr)
    assert len(ended) == n and {c.ended_by for c in ended} == {"bye"}
    assert not long_call.finished and tr.stats.active_calls == 1
    # the long call is still there to match its BYE hours later
    d.bye(long_call, T0 + 3600.0)
    assert long_call.ended_by == "bye" and tr.stats.active_calls == 0


def test_call_rescheduled_later_does_not_hold_back_earlier_expiry():
    """The old FIFO stopped at its first entry not yet due: a call answered (rescheduled to
    max_call_duration) blocked the removal of every call that ended after it."""
    tr = tracker(timer_b=32.0, max_call_duration=4 * 3600.0)
    d = Driver(tr)
    first, _ = d.invite_call(b"first", T0, answer_at=T0 + 0.1)  # stays up
    second, key = d.invite_call(b"second", T0 + 1.0)
    tr.response(key, 486, T0 + 1.5)
    assert second.ended_by == "final" and second.outcome == REJ4
    tr.expire(T0 + 1.5 + 32.0)
    assert b"second" not in tr.calls and b"first" in tr.calls


def test_completed_transaction_lingers_then_leaves():
    tr = tracker(timer_b=32.0)
    d = Driver(tr)
    call, key = d.invite_call(b"c", T0, answer_at=T0 + 0.5)
    tr.response(key, 200, T0 + 1.0, b"totag")  # 2xx retransmission inside the linger
    assert tr.stats.response_retransmissions == 1
    tr.expire(T0 + 0.5 + 31.9)
    assert key in tr.transactions
    tr.expire(T0 + 0.5 + 32.0)
    assert key not in tr.transactions


def test_full_call_table_evicts_an_ended_call_before_any_live_one():
    tr = tracker(timer_b=32.0, max_calls=4)
    d = Driver(tr)
    live = [d.invite_call(b"live-%d" % i, T0 + i, answer_at=T0 + i + 0.1)[0] for i in range(2)]
    for i in range(2):
        c, _ = d.invite_call(b"done-%d" % i, T0 + 5 + i, answer_at=T0 + 5.1 + i)
        d.bye(c, T0 + 6 + i)
    assert len(tr.calls) == 4
    drained(tr)
    d.invite_call(b"new-1", T0 + 10)
    d.invite_call(b"new-2", T0 + 11)
    assert set(tr.calls) == {b"live-0", b"live-1", b"new-1", b"new-2"}
    assert tr.stats.evicted_calls == 0 and not drained(tr)  # ended ones leave quietly
    # all live now: the least recently active goes, and its record still comes out
    d.req(live[0], b"INFO", T0 + 12, cseq=2)  # live-0 active again, live-1 is the idlest
    d.invite_call(b"new-3", T0 + 13)
    assert b"live-1" not in tr.calls and b"live-0" in tr.calls
    assert tr.stats.evicted_calls == 1 and tr.stats.active_calls == 1
    ev = drained(tr)
    assert [c.call_id for c in ev] == [b"live-1"] and ev[0].ended_by == "evicted"
    assert live[1].finished


def test_full_transaction_table_evicts_completed_before_pending():
    tr = tracker(timer_b=32.0, max_transactions=3)
    d = Driver(tr)
    call = d.call(b"c", T0)
    pending = d.req(call, b"INVITE", T0)
    tr.response(pending, 180, T0 + 0.1)
    done = d.req(call, b"INFO", T0 + 1, cseq=2)
    tr.response(done, 200, T0 + 1.1)
    waiting = d.req(call, b"INFO", T0 + 2, cseq=3)
    newer = d.req(call, b"INFO", T0 + 3, cseq=4)
    assert set(tr.transactions) == {pending, waiting, newer}
    assert tr.stats.evicted_transactions == 0
    # now only pending ones: the least recently active goes (the 180 came at +0.1, the INFO at +2)
    d.req(call, b"INFO", T0 + 4, cseq=5)
    assert pending not in tr.transactions and tr.stats.evicted_transactions == 1


def test_state_stays_bounded_under_random_traffic():
    """Random calls, retransmissions, forks, evictions and timer ticks: tables never exceed
    their caps, deadline queues stay within a constant factor, each call is emitted once, and
    far in the future nothing is left."""
    rnd = random.Random(7)
    tr = tracker(timer_b=32.0, timer_c=180.0, max_calls=50, max_transactions=80,
                 max_call_duration=600.0)
    d = Driver(tr)
    now = T0
    open_keys: list = []
    calls = []
    for i in range(6000):
        now += rnd.random() * 0.5
        r = rnd.random()
        if r < 0.25:
            c, key = d.invite_call(b"c%d" % rnd.randrange(400), now)
            calls.append(c)
            open_keys.append(key)
        elif r < 0.35:
            c = d.call(b"r%d" % rnd.randrange(400), now, is_call=False)
            open_keys.append(d.req(c, b"REGISTER", now))
        elif r < 0.75 and open_keys:
            key = rnd.choice(open_keys)
            tr.response(key, rnd.choice((180, 183, 200, 200, 486, 487, 401)), now,
                        rnd.choice((b"x", b"y")))
        elif r < 0.85 and calls:
            c = rnd.choice(calls)
            if not c.finished:
                open_keys.append(d.req(c, b"BYE", now, cseq=2))
        else:
            tr.expire(now)
        assert len(tr.calls) <= 50 and len(tr.transactions) <= 80
        # each call and transaction of the tables waits on exactly one timer, nothing else does
        assert tr.queued() == len(tr.calls) + len(tr.transactions)
        if len(open_keys) > 200:
            del open_keys[:100]
    tr.expire(now + 1e6)  # timeouts end calls, which then linger timer_b
    assert all(c.finished for c in tr.calls.values())
    tr.expire(now + 1e6 + 32.0)
    assert not tr.calls and not tr.transactions
    emitted = drained(tr)
    ids = [id(c) for c in emitted]
    assert len(ids) == len(set(ids))  # finished (and emitted) at most once
    assert all(c.ended_by in ENDED_BY for c in emitted)
    assert tr.stats.active_calls == 0
    decided = sum(tr.stats.calls)
    assert decided == sum(1 for c in emitted if c.is_call and c.outcome >= 0) + \
        sum(1 for c in calls if c.outcome >= 0 and not c.finished)


def test_identical_timestamps_leave_one_timer_per_object():
    """A capture whose packets share one timestamp: every deadline coincides. Each rescheduling
    (Timer B -> C -> linger, the call's long timer -> linger) still leaves one timer per object,
    and nothing that is not due expires."""
    tr = tracker(timer_b=32.0)
    d = Driver(tr)
    n = 10_000
    for i in range(n):
        call, key = d.invite_call(b"same-ts-%d" % i, T0, answer_at=T0)
        d.bye(call, T0)
        if not i % 10:
            tr.expire(T0)
    assert len(tr.calls) == n and len(tr.transactions) == 2 * n  # INVITE and BYE lingering
    assert tr.queued() == len(tr.calls) + len(tr.transactions)
    tr.expire(T0 + 32.0 + 0.02)  # (the responses came 0.01 s later)
    assert not tr.calls and not tr.transactions and tr.queued() == 0


def test_memory_per_active_call_is_what_the_docstring_says():
    got = memory_per_call(2000)
    assert 1000 < got["bytes_per_call_with_transactions"] < 3500


# -- 3. forks ----------------------------------------------------------------------------------
def test_second_2xx_with_another_to_tag_is_a_fork_not_a_retransmission():
    tr = tracker()
    d = Driver(tr)
    call = d.call(b"fork", T0)
    key = d.req(call, b"INVITE", T0)
    tr.response(key, 200, T0 + 1.0, b"leg-a")
    tr.response(key, 200, T0 + 1.1, b"leg-b")
    assert tr.stats.forks == 1 and tr.stats.response_retransmissions == 0
    tr.response(key, 200, T0 + 1.5, b"leg-a")  # same To-tag, same status: retransmission
    tr.response(key, 200, T0 + 1.6, b"leg-b")
    assert tr.stats.forks == 1 and tr.stats.response_retransmissions == 2
    assert tr.stats.calls[ANSWERED] == 1 and tr.stats.active_calls == 1
    for i in range(100):  # forged tags: counted, memory bounded
        tr.response(key, 200, T0 + 2, b"f%d" % i)
    assert tr.stats.forks == 101 and len(tr.transactions[key].tags) <= 16


def test_observer_counts_forks_from_the_to_tag():
    obs = Observer()
    a, b = ("10.0.0.1", 5060), ("10.0.0.2", 5060)
    inv = pb.sip_invite("fork@x", "z9hG4bKf1")
    obs.feed(inv, a, b, T0)
    obs.feed(pb.sip_response(inv, 200, "OK", to_tag="one"), b, a, T0 + 0.2)
    obs.feed(pb.sip_response(inv, 200, "OK", to_tag="two"), b, a, T0 + 0.3)
    obs.feed(pb.sip_response(inv, 200, "OK", to_tag="one"), b, a, T0 + 0.7)
    assert obs.stats.forks == 1 and obs.stats.response_retransmissions == 1


# -- 4. calls keyed right ----------------------------------------------------------------------
def register_then_invite(cid: str, t: float, a=("10.0.0.1", 5060), b=("10.0.0.2", 5060)):
    """REGISTER/401, REGISTER/200, then INVITE/100/180/200/ACK, BYE/200 on one Call-ID."""
    reg = (f"REGISTER sip:{b[0]} SIP/2.0\r\nVia: SIP/2.0/UDP {a[0]}:5060;branch=z9hG4bKreg1{cid}\r\n"
           f"From: <sip:alice@{b[0]}>;tag=r1\r\nTo: <sip:alice@{b[0]}>\r\nCall-ID: {cid}\r\n"
           f"CSeq: 1 REGISTER\r\nMax-Forwards: 70\r\nContact: <sip:alice@{a[0]}>\r\n"
           f"Content-Length: 0\r\n\r\n").encode()
    reg2 = reg.replace(b"z9hG4bKreg1", b"z9hG4bKreg2").replace(b"CSeq: 1 ", b"CSeq: 2 ")
    inv = pb.sip_invite(cid, f"z9hG4bKinv{cid}", cseq=3)
    ack = (inv.split(b"\r\n\r\n")[0].replace(b"INVITE sip", b"ACK sip")
           .replace(b"CSeq: 3 INVITE", b"CSeq: 3 ACK").replace(b"To: <sip:+4940987654@10.0.0.2>",
                                                               b"To: <sip:+4940987654@10.0.0.2>;tag=t")
           .replace(b"z9hG4bKinv", b"z9hG4bKack") + b"\r\n\r\n")
    bye = (ack.replace(b"ACK sip", b"BYE sip").replace(b"CSeq: 3 ACK", b"CSeq: 4 BYE")
           .replace(b"z9hG4bKack", b"z9hG4bKbye"))
    return [
        (t, reg, a, b), (t + 0.01, pb.sip_response(reg, 401, "Unauthorized", "t"), b, a),
        (t + 0.1, reg2, a, b), (t + 0.11, pb.sip_response(reg2, 200, "OK", "t"), b, a),
        (t + 1.0, inv, a, b), (t + 1.01, pb.sip_response(inv, 100, "Trying", "t"), b, a),
        (t + 1.2, pb.sip_response(inv, 180, "Ringing", "t"), b, a),
        (t + 2.0, pb.sip_response(inv, 200, "OK", "t"), b, a), (t + 2.01, ack, a, b),
        (t + 5.0, bye, a, b), (t + 5.01, pb.sip_response(bye, 200, "OK", "t"), b, a),
    ]


def test_register_then_invite_on_one_call_id_is_one_call_in_list_text_and_totals(tmp_path):
    msgs = register_then_invite("reuse-1@x", T0) + register_then_invite("reuse-2@x", T0 + 10)
    frames = [(t, pb.eth(pb.ipv4(s[0], d[0], 17, pb.udp(s[1], d[1], m)))) for t, m, s, d in msgs]
    path = tmp_path / "reg_then_invite.pcap"
    path.write_bytes(pb.pcap(1, frames))
    rep = analyse(str(path))
    assert [c["call_sid"] for c in rep["calls"]] == ["reuse-1@x", "reuse-2@x"]
    assert all(c["outcome"] == "answered" and c["final_status"] == 200 for c in rep["calls"])
    assert all([t["method"] for t in c["transactions"]] == ["INVITE", "ACK", "BYE"]
               for c in rep["calls"])
    assert rep["calls_by_outcome"]["answered"] == 2 and sum(rep["calls_by_outcome"].values()) == 2
    text = render(rep)
    assert ", 2 calls," in text.splitlines()[0] and "Calls 2: answered 2" in text
    assert text.count("\nCall reuse-") == 2


def test_second_invite_dialog_after_the_first_ended_is_a_new_call():
    tr = tracker()
    d = Driver(tr)
    first, key1 = d.invite_call(b"same", T0, answer_at=T0 + 1)
    d.bye(first, T0 + 3)
    assert tr.lookup_call(b"same", False) is first  # late ACK/BYE retransmission still match
    assert tr.lookup_call(b"same", True, 1) is first  # the first INVITE seen again
    assert tr.lookup_call(b"same", True, 5) is None
    assert tr.lookup_call(b"same", True) is None
    second = d.call(b"same", T0 + 10)
    key2 = d.req(second, b"INVITE", T0 + 10, cseq=5)
    tr.response(key2, 486, T0 + 10.5)
    assert tr.calls[b"same"] is second and second.outcome == REJ4
    assert tr.stats.calls[ANSWERED] == 1 and tr.stats.calls[REJ4] == 1
    assert [c.call_id for c in drained(tr)] == [b"same", b"same"]  # each emitted once


def test_an_answered_call_still_open_is_not_replaced_by_a_new_invite_with_its_call_id():
    """Any party that saw a Call-ID could send an initial INVITE with it and another CSeq: the
    answered call in progress was ended ("replaced") and its BYE recorded in the new entry, in
    a trace the sender chose. The INVITE is now a transaction of the call; after the call ended,
    the Call-ID may start a new one (above)."""
    tr = tracker()
    d = Driver(tr)
    call, _ = d.invite_call(b"open", T0, answer_at=T0 + 1)
    assert tr.lookup_call(b"open", True, 7) is call
    d.req(call, b"INVITE", T0 + 5, cseq=7)
    d.bye(call, T0 + 10)
    assert tr.calls[b"open"] is call and call.ended_by == "bye" and call.outcome == ANSWERED
    assert [c.call_id for c in drained(tr)] == [b"open"] and tr.stats.calls[ANSWERED] == 1


def test_lookup_keeps_retransmissions_hops_and_auth_retries_in_the_call():
    tr = tracker()
    d = Driver(tr)
    call = d.call(b"auth", T0)
    key = d.req(call, b"INVITE", T0)
    tr.response(key, 407, T0 + 0.1)
    assert tr.lookup_call(b"auth", True, 1) is call  # retransmission / next hop
    assert tr.lookup_call(b"auth", True, 2) is call  # retry with credentials decides it
    key2 = d.req(call, b"INVITE", T0 + 0.2, cseq=2)
    tr.response(key2, 200, T0 + 0.5, b"t")
    assert tr.stats.calls == [1, 0, 0, 0, 0, 0, 0] and not call.finished
    # a REGISTER entry does not take the INVITE, and is emitted once when replaced
    reg = d.call(b"r", T0, is_call=False)
    d.req(reg, b"REGISTER", T0)
    assert tr.lookup_call(b"r", False, 1) is reg
    assert tr.lookup_call(b"r", True, 2) is None
    drained(tr)
    inv_call = d.call(b"r", T0 + 1)
    assert tr.calls[b"r"] is inv_call and reg.finished and reg.ended_by == "replaced"
    assert drained(tr) == [reg]


def test_observer_retransmitted_invite_after_rejection_is_not_a_new_call():
    obs = Observer()
    a, b = ("10.0.0.1", 5060), ("10.0.0.2", 5060)
    inv = pb.sip_invite("rej@x", "z9hG4bKrej")
    obs.feed(inv, a, b, T0)
    obs.feed(pb.sip_response(inv, 486, "Busy Here", to_tag="t"), b, a, T0 + 0.1)
    obs.feed(inv, a, b, T0 + 0.5)  # the 486 crossed a retransmission
    obs.feed(pb.sip_response(inv, 486, "Busy Here", to_tag="t"), b, a, T0 + 0.6)
    obs.finish()
    calls = [c for k, c in obs.drain_finished() if k == "call"]
    assert len(calls) == 1 and calls[0].retrans == 2
    assert obs.stats.request_retransmissions == 1 and obs.stats.response_retransmissions == 1


# -- 5. ended_by -------------------------------------------------------------------------------
@pytest.mark.parametrize("story,ended_by,outcome", [
    ("bye", "bye", ANSWERED), ("reject", "final", REJ4), ("cancel", "cancel", CANCELLED),
    ("timeout", "timeout", TIMEOUT), ("no_bye", "max_duration", ANSWERED),
    ("shutdown", "shutdown", ANSWERED), ("challenge_only", "final", REJ4),
])
def test_ended_by(story, ended_by, outcome):
    tr = tracker(timer_b=32.0, max_call_duration=3600.0)
    d = Driver(tr)
    if story in ("bye", "no_bye", "shutdown"):
        call, _ = d.invite_call(b"c", T0, answer_at=T0 + 1)
        if story == "bye":
            d.bye(call, T0 + 10)
        elif story == "no_bye":
            tr.expire(T0 + 1 + 3600.0)
        else:
            tr.finish_open_calls(T0 + 5)
    else:
        call, key = d.invite_call(b"c", T0)
        if story == "reject":
            tr.response(key, 486, T0 + 1)
        elif story == "cancel":
            d.req(call, b"CANCEL", T0 + 1, initial=False)
            tr.response(key, 487, T0 + 1.1)
        elif story == "challenge_only":
            tr.response(key, 401, T0 + 1)
            tr.expire(T0 + 1 + 31.9)
            assert not call.finished
            tr.expire(T0 + 1 + 32.0)
        else:
            tr.expire(T0 + 0.01 + 180.0)
    assert call.finished and call.ended_by == ended_by and call.outcome == outcome
    assert drained(tr) == [call]
    assert tr.stats.active_calls == 0


def test_observer_closes_open_calls_with_eof():
    obs = Observer()
    a, b = ("10.0.0.1", 5060), ("10.0.0.2", 5060)
    inv = pb.sip_invite("open@x", "z9hG4bKo")
    obs.feed(inv, a, b, T0)
    obs.feed(pb.sip_response(inv, 200, "OK", to_tag="t"), b, a, T0 + 0.1)
    obs.finish()
    calls = [c for k, c in obs.drain_finished() if k == "call"]
    assert len(calls) == 1 and calls[0].ended_by == "eof" and calls[0].outcome == ANSWERED
    assert calls[0].t_end == T0 + 0.1


def test_hostile_method_names_stay_bounded():
    obs = Observer()
    a, b = ("10.0.0.1", 5060), ("10.0.0.2", 5060)
    base = pb.sip_invite("m@x", "z9hG4bKm")
    for i in range(2000):
        name = "X" + "".join(chr(65 + int(ch)) for ch in str(i))
        obs.feed(base.replace(b"INVITE", name.encode()), a, b, T0 + i * 0.001)
    assert len(obs.methods) <= 257 and sum(obs.methods.values()) == 2000


def test_bye_timeout_ends_the_call_as_bye():
    tr = tracker(timer_b=32.0)
    d = Driver(tr)
    call, _ = d.invite_call(b"c", T0, answer_at=T0 + 1)
    d.req(call, b"BYE", T0 + 10, cseq=2)
    tr.expire(T0 + 42.0)
    assert call.ended_by == "bye" and tr.stats.timeouts[BYE] == 1 and tr.stats.active_calls == 0


# -- recorded fixtures (real SIPp through the sidecar), against tshark -------------------------
PCAPS = Path(__file__).resolve().parents[1] / "pcaps"
needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")


def tshark_sip_rows(path: Path) -> list[dict]:
    """Per SIP frame: time, hop, request method or status, CSeq method, Call-ID (tshark's)."""
    fields = ("frame.time_epoch", "ip.src", "udp.srcport", "ip.dst", "udp.dstport", "sip.Method",
              "sip.Status-Code", "sip.CSeq.method", "sip.Call-ID")
    cmd = ["tshark", "-n", "-r", str(path), "-Y", "sip", "-T", "fields", "-E", "separator=\t"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        t, sip_, sp, dip, dp, method, status, cseq_m, cid = line.split("\t")
        rows.append({"t": float(t), "src": f"{sip_}:{sp}", "dst": f"{dip}:{dp}", "method": method,
                     "status": int(status) if status else None, "cseq_method": cseq_m, "call_id": cid})
    return rows


@needs_tshark
def test_long_ring_fixture_is_answered_when_tshark_sees_the_200():
    path = PCAPS / "long_ring.pcap"
    facts = json.loads((PCAPS / "long_ring.facts.json").read_text())
    rows = tshark_sip_rows(path)
    invites = [r for r in rows if r["method"] == "INVITE"]
    oks = [r for r in rows if r["status"] == 200 and r["cseq_method"] == "INVITE"]
    first_1xx = min(r["t"] for r in rows if r["status"] and r["status"] < 200)
    answer_s = min(r["t"] for r in oks) - min(r["t"] for r in invites)
    assert answer_s > 32.0 and first_1xx - invites[0]["t"] < 1.0  # the recording is what it says
    rep = analyse(str(path))
    assert [c["outcome"] for c in rep["calls"]] == ["answered"] * facts["fixture"]["calls"]
    assert rep["calls"][0]["answer_ms"] == pytest.approx(answer_s * 1000.0, abs=0.01)
    assert rep["calls_by_outcome"]["answered"] == 1 and rep["calls_by_outcome"]["timeout"] == 0
    assert rep["txn"]["timeouts"] == 0 and rep["errors"]["unmatched_responses"] == 0
    assert rep["txn"]["retransmitted_responses"] == 0
    # every INVITE hop ended with tshark's 200 OK for it
    finals = {(t["src"], t["dst"]): t["status"] for c in rep["calls"] for t in c["transactions"]
              if t["method"] == "INVITE"}
    assert finals == {(r["src"], r["dst"]): 200 for r in invites}


@needs_tshark
def test_register_then_call_fixture_gives_each_call_once():
    path = PCAPS / "register_then_call.pcap"
    facts = json.loads((PCAPS / "register_then_call.facts.json").read_text())
    rows = tshark_sip_rows(path)
    reg_ids = {r["call_id"] for r in rows if r["method"] == "REGISTER"}
    inv_ids = {r["call_id"] for r in rows if r["method"] == "INVITE"}
    assert inv_ids and inv_ids == reg_ids  # each Call-ID registered, then called
    assert len(inv_ids) == facts["invite_calls"] == facts["fixture"]["calls"]
    answered = {r["call_id"] for r in rows if r["status"] == 200 and r["cseq_method"] == "INVITE"}
    rep = analyse(str(path))
    assert sorted(c["call_sid"] for c in rep["calls"]) == sorted(inv_ids)
    assert {c["call_sid"] for c in rep["calls"] if c["outcome"] == "answered"} == answered
    assert sum(rep["calls_by_outcome"].values()) == len(rep["calls"]) == len(inv_ids)
    text = render(rep)
    assert f", {len(inv_ids)} calls," in text.splitlines()[0]
    assert f"Calls {len(inv_ids)}: answered {len(answered)}" in text
    assert sum(text.count(f"\nCall {cid}\n") for cid in inv_ids) == len(inv_ids)


def test_calls_that_ended_leave_no_timer_behind():
    """20,000 answered calls that ended: their 4-hour max-duration timers leave with the BYE (a
    stale entry per call, kept for hours, had to be swept: ~2.5 % of the proxy's CPU), and
    once the linger is over nothing waits on a timer at all."""
    tr = tracker(timer_b=32.0)
    d = Driver(tr)
    n = 20_000
    for i in range(n):
        t = T0 + i * 0.001
        call, _ = d.invite_call(b"s-%d" % i, t, answer_at=t)
        d.bye(call, t)
    assert len(tr._call_long) == 0 and len(tr._call_linger) == n
    assert tr.queued() == len(tr.calls) + len(tr.transactions) == 3 * n
    tr.expire(T0 + n * 0.001 + 32.0 + 1.0)
    assert not tr.calls and not tr.transactions and tr.queued() == 0

def test_nothing_tracked_refers_back_to_its_timer_queue():
    """A queue holds its objects; an object names its queue by index, not by reference. A
    back-reference made every tracker one reference cycle: one a capture or a test let go of
    waited for the cyclic collector, and its collections grew (the core micro-benchmark, which
    starts a fresh core each round, ran INVITEs at 23 instead of 9 µs)."""
    import gc

    from sipwatch.state import DeadlineQueue

    tr = tracker(timer_b=32.0)
    d = Driver(tr)
    held, _ = d.invite_call(b"held", T0, answer_at=T0 + 0.1)
    ended, _ = d.invite_call(b"ended", T0, answer_at=T0 + 0.1)
    d.bye(ended, T0 + 1.0)
    ringing, _ = d.invite_call(b"ringing", T0)
    objs = list(tr.calls.values()) + list(tr.transactions.values())
    assert len(objs) == tr.queued() == 3 + 4
    for obj in objs:
        assert not any(isinstance(r, DeadlineQueue) for r in gc.get_referents(obj)), obj


def test_a_request_reusing_a_branch_takes_the_old_transaction_out_of_its_timer():
    """A new request with the key of one still held (a sender reusing its branch; any datagram
    can claim any branch): the table holds the new one, and the old one no longer waits on a
    timer, whichever it was on, so it can neither time out for the new one nor pile up."""
    tr = tracker(timer_b=32.0)
    d = Driver(tr)
    for i, status in enumerate((None, 180, 200)):  # the old one under Timer B, Timer C, linger
        first = d.call(b"first-%d" % i, T0)
        key = d.req(first, b"INVITE", T0, branch=b"z9hG4bK-reused-%d" % i)
        if status is not None:
            tr.response(key, status, T0 + 0.1, b"tag")
        old = tr.transactions[key]
        second = d.call(b"second-%d" % i, T0 + 1.0)
        d.req(second, b"INVITE", T0 + 1.0, branch=b"z9hG4bK-reused-%d" % i)
        assert tr.transactions[key] is not old and tr.transactions[key].call is second
        assert old.timer == -1
        assert tr.queued() == len(tr.calls) + len(tr.transactions)
    tr.expire(T0 + 1.0 + 32.0)  # the new ones time out, each once; the old ones are not seen
    assert tr.stats.timeouts[INVITE] == 3


# -- measurement truth: what a figure is about ------------------------------------------------
def test_an_auth_retry_that_rings_past_timer_b_is_decided_by_its_own_answer():
    """407, then the INVITE again with credentials (CSeq 2) that rings 35 s and is answered: the
    challenge's Timer B counted the call rejected_4xx (407) while it rang, and its 200 was then
    ignored (a real call, answered, never counted so)."""
    tr = tracker(timer_b=32.0, timer_c=180.0)
    d = Driver(tr)
    call = d.call(b"auth-ring", T0)
    k1 = d.req(call, b"INVITE", T0)
    tr.response(k1, 407, T0 + 0.001)
    k2 = d.req(call, b"INVITE", T0 + 0.05, cseq=2)
    tr.response(k2, 180, T0 + 0.051)
    for t in range(1, 36):
        tr.expire(T0 + t)
    assert sum(tr.stats.calls) == 0 and not call.finished
    tr.response(k2, 200, T0 + 35.05, b"callee")
    assert tr.stats.calls[ANSWERED] == 1 and sum(tr.stats.calls) == 1
    assert call.t_answer == T0 + 35.05 and tr.stats.active_calls == 1
    d.bye(call, T0 + 37.05)
    assert call.ended_by == "bye" and call.t_end == pytest.approx(T0 + 37.06)


def test_an_unanswered_challenge_is_still_rejected_at_timer_b():
    tr = tracker(timer_b=32.0)
    d = Driver(tr)
    call = d.call(b"auth-none", T0)
    tr.response(d.req(call, b"INVITE", T0), 407, T0 + 0.001)
    tr.expire(T0 + 33)
    assert tr.stats.calls[REJ4] == 1 and call.status == 407 and call.ended_by == "final"


def test_signaling_figures_count_only_requests_sent_to_signaling():
    """signaler_rtt_milliseconds and sip_transaction_timeouts are sip-signaling's: a request it
    sent toward the gateway (a BYE, a dispatcher's OPTIONS ping to a dead gateway) is answered,
    or not, by the gateway side. Both were counted as sip-signaling's (a caller's 300-ms answer
    to a BYE was a 300-ms signaling RTT; pings to a dead gateway fired the signaling alert).
    Those timeouts are the gateway side's counter."""
    from sipwatch.stats import FROM_SIGNALING
    tr = tracker(timer_b=32.0)
    call = tr.new_call(b"out", 1, 2, None, True, T0, True)
    up = (b"br-up", b"INVITE")
    tr.request(up, INVITE, b"INVITE", 1, call, T0, 3, call.span_id, 0, PEER, True)  # to signaling
    tr.response(up, 100, T0 + 0.004)
    down = (b"br-down", b"BYE")
    tr.request(down, BYE, b"BYE", 2, call, T0 + 1, 4, call.span_id, FROM_SIGNALING, ("10.0.0.1", 5070), False)
    tr.response(down, 200, T0 + 1.3)
    ring = tr.stats.ring
    assert ring.n == 1 and ring.method[0] == INVITE and ring.rtt[0] == pytest.approx(4.0)
    ping = tr.new_call(b"ping", 1, 2, None, True, T0, False)
    tr.request((b"br-ping", b"OPTIONS"), OPTIONS, b"OPTIONS", 1, ping, T0, 5, ping.span_id, FROM_SIGNALING,
               ("10.0.0.1", 5070), False)
    lost = tr.new_call(b"lost", 1, 2, None, True, T0, False)
    tr.request((b"br-lost", b"OPTIONS"), OPTIONS, b"OPTIONS", 1, lost, T0, 6, lost.span_id, 0, PEER, False)
    tr.expire(T0 + 40)
    assert tr.stats.timeouts[OPTIONS] == 1 and tr.stats.gateway_timeouts[OPTIONS] == 1


def test_a_call_whose_bye_is_never_answered_ends_when_the_bye_was_sent():
    """Its duration ran to Timer F, 32 s after the BYE (``duration_s`` and
    ``sip_call_duration_seconds`` 33 s for a 1-s call)."""
    tr = tracker(timer_b=32.0)
    d = Driver(tr)
    call, _ = d.invite_call(b"c", T0, answer_at=T0 + 1)
    d.req(call, b"BYE", T0 + 2, cseq=2)
    tr.expire(T0 + 40.0)
    assert call.ended_by == "bye" and call.t_end == T0 + 2 and call.t_end - call.t_answer == 1.0


def test_setup_after_a_challenge_is_the_retrys_ringing_not_the_challenge():
    """407 at 1 ms, the retry with credentials at 150 ms, its 180 at 256 ms: setup (RFC 6076 SRD:
    first INVITE to the first provisional or final answer) read 1 ms, the challenge. Unanswered,
    the challenge is the final answer and its time the setup."""
    tr = tracker(timer_b=32.0)
    d = Driver(tr)
    call = d.call(b"auth-setup", T0)
    k1 = d.req(call, b"INVITE", T0)
    tr.response(k1, 100, T0 + 0.0005)
    tr.response(k1, 407, T0 + 0.001)
    k2 = d.req(call, b"INVITE", T0 + 0.150, cseq=2)
    tr.response(k2, 180, T0 + 0.256)
    tr.response(k2, 200, T0 + 1.0, b"t")
    assert call.t_setup == T0 + 0.256
    lone = d.call(b"auth-lone", T0)
    tr.response(d.req(lone, b"INVITE", T0), 407, T0 + 0.002)
    tr.expire(T0 + 40)
    assert lone.outcome == REJ4 and lone.t_setup == T0 + 0.002


@pytest.mark.parametrize("status, ends", [(200, True), (481, True), (408, True), (500, True), (403, True),
                                          (407, False), (401, False)])
def test_a_challenged_bye_does_not_end_the_call(status, ends):
    """RFC 3261 §15.1.1: the session ends with the BYE, whatever its answer, but a challenged BYE
    (401/407) is sent again with credentials: that one ended the call, and the call ran on
    after its record said it had ended, the real BYE outside it. (A 500 kept it open until
    --max-call-duration, 4 h, in a first version of this rule.)"""
    tr = tracker(timer_b=32.0)
    d = Driver(tr)
    call, _ = d.invite_call(b"c", T0, answer_at=T0 + 1)
    tr.response(d.req(call, b"BYE", T0 + 2, cseq=2), status, T0 + 2.01)
    assert call.finished is ends
    if not ends:
        d.bye(call, T0 + 3)
        assert call.finished and call.t_end == T0 + 3.01 and tr.stats.active_calls == 0


def test_a_bye_timing_out_after_the_call_ended_leaves_its_end_alone():
    """Crossed BYEs: one answered 200 ends the call at 10.01 s; the other, never answered, times
    out later and moved the record's end back to its own sending, after the record was out."""
    tr = tracker(timer_b=32.0)
    d = Driver(tr)
    call, _ = d.invite_call(b"x", T0, answer_at=T0 + 1)
    d.req(call, b"BYE", T0 + 5, cseq=2)  # never answered
    d.bye(call, T0 + 10)
    assert call.finished and call.t_end == T0 + 10.01
    tr.expire(T0 + 60)
    assert call.t_end == T0 + 10.01
