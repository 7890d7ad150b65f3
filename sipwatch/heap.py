"""The Python object heap on transparent huge pages (``sipwatch/_hugeheap.c``), for the proxy and
its span worker.

Almost everything the proxy allocates lives in pymalloc's 1-MiB arenas; on plain 4-KiB pages a
growing call state costs a page fault per page and the objects a wake-up touches cost TLB
misses, both dear under a hypervisor. With the arenas carved from one huge-page region the proxy
and its span worker took ~350 page faults a second at 1000 calls/s instead of ~1,200, and 2-8%
less CPU per message (see the C file). The proxy chooses at its start (:func:`early_choice`), the
span worker as the proxy did; ``--no-huge-heap`` keeps CPython's own arenas.

The region is address space only until arenas are carved from it (reserved without memory or
commit charge); up to ``KEEP_RESIDENT`` freed arenas keep their memory for reuse, past that it is
returned. Without the C module, or where the region cannot be reserved, nothing changes.
"""
from __future__ import annotations

from . import optional_c

_hugeheap = optional_c("_hugeheap")

# address space reserved for the arenas: 4 GiB, far more than a proxy's heap (a few hundred MB at
# 4000 calls/s); what does not fit comes from CPython's own arena allocator
RESERVE = 4 << 30

_active = False


def use_huge_pages() -> bool:
    """Carve this process's arenas from now on from a huge-page region; True when that is so."""
    global _active
    if _hugeheap is None:
        return False
    try:
        _active = bool(_hugeheap.install(RESERVE))
    except (OSError, ValueError, MemoryError):
        _active = False
    return _active


def early_choice(argv: list[str], env) -> bool:
    """The command line's first step (``sipwatch.cli.main``, for the ``sipwatch`` command and
    ``python -m sipwatch`` alike): the proxy's heap, chosen before any other module is imported,
    so that the functions, types and constants read at every message are on the huge pages too (the configuration itself is parsed later; a bad value
    there stops the proxy anyway). Installed after the proxy's imports instead, the sidecar took
    as few page faults but as much CPU as without it (1000 calls/s, every feature on, alternating
    runs: 29.4 against 29.6 µs a message; installed before them, 28.1)."""
    if not argv or argv[0] != "proxy" or "--no-huge-heap" in argv[1:]:
        return False
    # (config's true values; config itself is not imported here: it pulls in prometheus_client)
    if env.get("SIPWATCH_NO_HUGE_HEAP", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return use_huge_pages()


def active() -> bool:
    """Whether :func:`use_huge_pages` took effect in this process."""
    return _active


def stats() -> dict:
    """The region's figures (empty without the C module)."""
    return _hugeheap.stats() if _hugeheap is not None else {}
