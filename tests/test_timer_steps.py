"""The proxy's timers run in bounded steps: a tick handles at most EXPIRE_STEP due timer entries and
the rest follow in callbacks of their own, with the same outcome as one unbounded pass (the same
timeouts, records and counters, in the same order)."""
from __future__ import annotations

import asyncio

from sipwatch.state import EXPIRE_STEP, Tracker
from sipwatch.stats import INVITE, Stats

from test_resilience import _app

T0 = 1000.0


def _unanswered(tracker: Tracker, n: int) -> None:
    """``n`` initial INVITEs forwarded at T0 and never answered (each runs Timer B)."""
    for i in range(n):
        call = tracker.new_call(b"step-%d@gw" % i, i + 1, i + 2, None, True, T0, True,
                                b"<sip:a@gw>", b"<sip:b@sig>", b"sip:b@sig")
        tracker.request((b"z9hG4bK-step-%d" % i, b"INVITE"), INVITE, b"INVITE", 1, call, T0, i + 3,
                        call.span_id, 0, ("127.0.0.1", 5060), True)


def _outcome(tracker: Tracker) -> list:
    return [(kind, obj.call_id if kind == "call" else obj.key, getattr(obj, "ended_by", None))
            for kind, obj in tracker.finished]


def test_bounded_steps_end_as_one_unbounded_pass():
    n = 3 * EXPIRE_STEP + 5
    whole, steps = Tracker(Stats()), Tracker(Stats())
    _unanswered(whole, n)
    _unanswered(steps, n)
    steps.expire_budget = EXPIRE_STEP
    now = T0 + whole.timer_b + 1.0
    whole.expire(now)
    assert not whole.expire_left and whole.stats.timeouts[INVITE] == n
    steps.expire(now)
    assert steps.expire_left and steps.stats.timeouts[INVITE] == EXPIRE_STEP
    rounds = 1
    while steps.expire_left:
        steps.expire(now)
        rounds += 1
    assert rounds == 4
    assert steps.stats.timeouts[INVITE] == n and steps.stats.calls == whole.stats.calls
    assert _outcome(steps) == _outcome(whole)
    assert len(_outcome(steps)) == 2 * n  # each INVITE's timeout and its call's end
    assert not steps.transactions and len(steps.calls) == len(whole.calls)


def test_a_tick_leaves_the_rest_of_the_timers_to_callbacks_of_their_own(tmp_path):
    app, _ = _app(tmp_path, "--no-tracing")
    tracker = app.core.tracker
    n = 2 * EXPIRE_STEP + 1
    _unanswered(tracker, n)
    app.clock = lambda: T0 + tracker.timer_b + 1.0

    async def run():
        app.tick()
        assert tracker.stats.timeouts[INVITE] == EXPIRE_STEP and tracker.expire_left
        for _ in range(10):
            await asyncio.sleep(0)
        assert tracker.stats.timeouts[INVITE] == n and not tracker.expire_left

    asyncio.run(run())
    _unanswered(tracker, n)
    app.clock = lambda: T0 + 2 * tracker.timer_b + 2.0
    app.tick()  # no running loop (shutdown): every due entry at once
    assert tracker.stats.timeouts[INVITE] == 2 * n and not tracker.expire_left


def _provisionals(tracker: Tracker, n: int, each: int = 5) -> None:
    """``each`` 180s to each of the ``n`` INVITEs: every one restarts Timer C."""
    for i in range(n):
        for k in range(each):
            tracker.response((b"z9hG4bK-step-%d" % i, b"INVITE"), 180, T0 + 0.01 * (k + 1))


def test_restarting_timer_c_keeps_one_timer_per_invite():
    """Each 180 moves its INVITE to the back of Timer C's queue with the new deadline: one timer
    per INVITE (not one per provisional), and they fire at the last 180 + timer_c."""
    tracker = Tracker(Stats(), timer_c=180.0)
    _unanswered(tracker, 600)
    _provisionals(tracker, 600)
    assert len(tracker._tx_c) == 600 and len(tracker._tx_b) == 0
    assert tracker.queued() == 1200  # and each call's own timer
    tracker.expire(T0 + 0.05 + 180.0 - 0.001)  # the last 180 came at T0 + 0.05
    assert tracker.stats.timeouts[INVITE] == 0
    tracker.expire(T0 + 0.05 + 180.0)
    assert tracker.stats.timeouts[INVITE] == 600 and tracker.queued() == 600  # the calls linger
