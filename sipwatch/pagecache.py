"""The page cache of a file this process appends to and someone else reads later (the spans file).

Left alone, every page written stays cached until memory runs short: at 4000 calls/s the spans
file grows by ~15 MB/s, and a node's page cache fills with spans nobody reads from memory, pushing
out what the node's own services cache. Each new page is also a fresh page to the kernel; on a VM
that hands free pages back to its host (free page reporting, virtio-balloon), the first write to
each can cost a host fault: writing 3 GB took 4.8-6.6 s of system time that way here, and 1.0 s
when the pages written were let go a little behind the end, so that the next writes reuse them.

:class:`DropBehind` lets them go: every ``every`` bytes written it asks the kernel
(``posix_fadvise(DONTNEED)``) to drop the pages that lie more than ``lag`` bytes behind the end.
Dirty pages are not dropped by that call, only sent to disk; the next call, one step later,
covers them again and drops them then. A reader that tails the file (a log shipper) within
``lag`` bytes of its end still reads from memory; one further behind reads from disk."""
from __future__ import annotations

import os

DROP_LAG = 64 << 20  # bytes behind the end that stay cached: ~4 s of spans at 4000 calls/s
DROP_EVERY = 8 << 20  # bytes written between two requests to the kernel


class DropBehind:
    """Drop-behind for descriptor ``fd`` (appended to by this process). Files whose pages cannot
    be dropped this way (a pipe, a FIFO, a terminal: no position; a kernel without the call) turn
    it off at the first try; nothing here raises."""

    def __init__(self, fd: int, lag: int = DROP_LAG, every: int = DROP_EVERY):
        self.fd: int | None = fd
        self.lag = lag
        self.every = every
        self._since = 0  # bytes written since the last request
        self._from = 0  # where the next request starts: the one before's start (its dirty pages)
        self._last = 0  # where the last request ended

    def wrote(self, n: int) -> None:
        """``n`` more bytes were written."""
        if self.fd is None:
            return
        self._since += n
        if self._since < self.every:
            return
        self._since = 0
        try:
            stop = os.lseek(self.fd, 0, os.SEEK_CUR) - self.lag
            if stop < self._from:  # the file was cut (copytruncate rotation): start over
                self._from = self._last = 0
            if stop <= self._last:
                return
            os.posix_fadvise(self.fd, self._from, stop - self._from, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):  # ESPIPE, EBADF, no posix_fadvise: off for good
            self.fd = None
            return
        self._from, self._last = self._last, stop


__all__ = ["DropBehind", "DROP_LAG", "DROP_EVERY"]
