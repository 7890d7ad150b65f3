"""What a C extension keeps after many calls: references to its inputs, and memory."""
from __future__ import annotations

import gc
import sys
import tracemalloc


def kept_by(calls, watched: list, rounds: int) -> tuple[list[int], int]:
    """``calls()`` once to warm up, then ``rounds`` times: the change in each watched object's
    reference count (all 0 when nothing is kept) and the bytes of memory grown meanwhile. (Objects
    the whole interpreter shares, b"" and one-byte bytes, move with it: leave them out.)"""
    calls()
    gc.collect()
    before = [sys.getrefcount(x) for x in watched]
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(rounds):
            calls()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    after = [sys.getrefcount(x) for x in watched]  # (counted as before was: the same references)
    return [a - b for a, b in zip(after, before)], grown
