"""When the cyclic garbage collector runs: never for long, never on its own schedule.

CPython's full collection walks every tracked object. A proxy carrying 2000 calls/s keeps about
a million of them alive (calls, transactions, their timer entries), and a full collection then
stopped the event loop for 100-375 ms (measured: gc callbacks in the sidecar, SIPp at 2000
calls/s): long enough for the receive queue to overflow, UACs to retransmit and the overload
guard to shed calls the proxy could have carried.

The call state is free of reference cycles (``state.Tracker.release``, timer entries hold
tokens), so it is freed by reference counting and never needs the cyclic collector. That makes
freezing safe: every ``EVERY`` seconds, :meth:`GcPolicy.tick` runs one collection over what was
allocated since the last one and then ``gc.freeze()`` moves the survivors out of the collector's
sight. The pause is proportional to what survived since the last one: a collection every second
stopped the loop for 3-7 ms at 1000 calls/s (a cause of the added round trip's p99), one every
100 ms for 0.75 ms on average with every feature on (p99 1.9-2.5 ms, the longest step of the
housekeeping), one every 20 ms (each housekeeping tick) for 0.1 ms (p99 0.45 ms), at about the same
total cost (~7 µs of CPU a call, measured live with SIPp). In between, the automatic collector is off:
left on, it ran a generation-0 pass every 700 allocations, about 4 % of the proxy's CPU at 1000
calls/s (perf), over objects that reference counting frees anyway; at most ``EVERY`` seconds of
cyclic garbage waits for the next tick. Objects frozen while alive and later left in a cycle
(rare: library internals) are not collected until a deep collection; one runs when the resident
size grew by ``DEEP_GROWTH`` since the last one, at most every ``DEEP_EVERY`` seconds, and its
duration is reported so an operator sees it.

Most ticks need no collection at all: carrying calls makes no cyclic garbage (live, 4000 calls/s
with every feature on, 400 collections in a row found nothing), yet each pass walked ~2700
young objects (timer entries, transactions, their lists) for 0.4-0.7 ms, ~4 % of the proxy's CPU,
with a p99 of 3 ms that lands on the round trip of whatever datagram waits behind it. So once
``QUIET`` collections in a row found nothing, a tick only freezes (O(1): the young list is moved
to the permanent one) and one tick in ``SPARSE`` still collects, as a probe; the first pass that
finds a cycle brings back a collection every tick. What a cycle left between two probes waits
for the deep collection, bounded by its RSS trigger.

Growth the live call state explains does not trigger a deep collection. A deep collection walks
every live object, and most of a busy proxy's are its calls and transactions: at 4000 calls/s
with every feature on, the finished calls lingering ``timer_b`` (32 s) took the resident size
from 100 to 600 MB in the first half minute, and the deep collection that growth set off a
minute after start stopped the loop for 1355 ms and found nothing; the overload guard shed 6494
INVITEs with 503 meanwhile (in another run 4496 calls failed). So ``state_size()`` (the proxy's
calls and transactions) is read every tick, and growth up to ``STATE_BYTES`` per entry that the
state's peak since the last deep collection had over its size then is explained: the peak, not
the present size, because the allocator keeps the memory of calls that have ended (a collection
would find nothing there either, and after an evening's drop in traffic it would walk the whole
remaining state for it). Growth the state never explained (a leak) still triggers one.
"""
from __future__ import annotations

import gc
import os
import time

EVERY = 0.02  # seconds between collect-and-freeze: each housekeeping tick (app.TICK)
DEEP_GROWTH = 64 << 20  # bytes of RSS growth that trigger a deep (unfreeze, full) collection
DEEP_EVERY = 60.0
# bytes of resident size one call or transaction in the tables explains: about 3x what they take
# (a lingering answered call and its transactions ~4 KB, in ~4 entries), so that growth of the
# state never looks like a leak; a leak goes on once the state stops growing, and is seen then
STATE_BYTES = 3 << 10
# seconds between reads of the resident size once a deep collection may run (DEEP_EVERY after the
# last): a read every tick was ~5% of an idle sidecar's CPU (a pread of /proc/self/statm and its
# parsing, 50 a second), for a trigger that acts at most once a minute
RSS_EVERY = 0.5
QUIET = 50  # collections in a row that found nothing before ticks stop collecting (1 s)
SPARSE = 25  # then one tick in SPARSE still collects (every 0.5 s), until a pass finds a cycle
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_statm: tuple[int, int] | None = None  # (pid, fd): "self" is the process that opened it


def rss_bytes() -> int:
    """Resident set size of this process (Linux), or 0 where it cannot be read.

    ``/proc/self/statm`` stays open: each read at offset 0 is a fresh figure, one system call
    instead of an open, a read and a close every collection (a forked child opens its own)."""
    global _statm
    try:
        pid = os.getpid()
        if _statm is None or _statm[0] != pid:
            _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
        return int(os.pread(_statm[1], 256, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class GcPolicy:
    def __init__(self, clock=time.monotonic, on_deep=None, state_size=None):
        self.clock = clock
        self.on_deep = on_deep  # callable(seconds, collected, rss_before, rss_after)
        self.state_size = state_size  # callable() -> entries of live state (calls, transactions)
        self._state_base = 0  # state_size() at the last deep collection (or the start)
        self._state_peak = 0  # its highest since then
        self.deep_explained = 0  # reads of the size that found growth over DEEP_GROWTH the state explains
        self._next = 0.0
        self._rss_next = 0.0  # when the resident size is read next (see RSS_EVERY)
        self._deep_at = 0.0
        self._baseline = 0
        self.collections = 0
        self.deep_collections = 0
        self.quiet = 0  # collections in a row that found nothing
        self.skipped = 0  # ticks that froze without collecting (sparse mode)
        self._since = 0  # ticks since the last collection
        self._was_enabled = True

    def start(self) -> None:
        """After start-up: everything imported and built so far is frozen for good."""
        self._was_enabled = gc.isenabled()
        gc.disable()  # collections run from tick() only
        gc.collect()
        gc.freeze()
        now = self.clock()
        self._next = now + EVERY
        self._deep_at = now
        self._baseline = rss_bytes()
        self._state_base = self._state_peak = self._state()

    def _state(self) -> int:
        return self.state_size() if self.state_size is not None else 0

    def tick(self) -> None:
        now = self.clock()
        if now < self._next:
            return
        self._next = now + EVERY
        size = self._state()
        if size > self._state_peak:
            self._state_peak = size
        rss = 0
        if now - self._deep_at >= DEEP_EVERY and now >= self._rss_next:
            self._rss_next = now + RSS_EVERY
            rss = rss_bytes()
        if rss and rss - self._baseline > DEEP_GROWTH and not self._explained(rss):
            t0 = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            gc.freeze()
            self.deep_collections += 1
            self._deep_at = now
            after = rss_bytes()
            self._baseline = after
            self._state_base = self._state_peak = size
            if self.on_deep is not None:
                self.on_deep(time.perf_counter() - t0, found, rss, after)
            return
        # generation 0 holds everything the collector tracks that is not frozen: the last freeze
        # took the older generations along and nothing else collects in between. A full
        # collection's extras are left out: its empty generations and its freeing of the
        # interpreter's free lists, which the next allocations refilled (~10 % of the pass).
        if self.quiet >= QUIET and self._since < SPARSE - 1:
            self._since += 1
            self.skipped += 1
            gc.freeze()  # nothing found for a while: keep the young out of later passes, no walk
            return
        self._since = 0
        found = gc.collect(0)
        gc.freeze()
        self.collections += 1
        self.quiet = 0 if found else self.quiet + 1

    def _explained(self, rss: int) -> bool:
        """The growth since the last deep collection is no more than the live state's growth to
        its peak accounts for (asked only once the growth is over DEEP_GROWTH)."""
        grown = self._state_peak - self._state_base
        if grown > 0 and rss - self._baseline <= DEEP_GROWTH + grown * STATE_BYTES:
            self.deep_explained += 1
            return True
        return False

    def stop(self) -> None:
        gc.unfreeze()
        if self._was_enabled:
            gc.enable()
