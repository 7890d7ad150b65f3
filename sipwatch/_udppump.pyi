"""Types of the UDP edge's C receive loop (sipwatch/_udppump.c) for mypy and mypyc."""
from typing import Any, Callable

BATCH: int
SRC_CACHE: int

class Pump:
    def __init__(self, listen_fd: int, upstream_fd: int, upstream: tuple[str, int] | None,
                 receive: Callable[[bytes, tuple[str, int], float], Any], core: Any, edge: Any,
                 dispatch: Callable[[bytes, tuple[str, int], float, Any], None],
                 send_failed: Callable[[Exception], None], on_error: Callable[[BaseException], None],
                 clock: Callable[[], float], settle: Callable[[], None] | None = None,
                 refusals: tuple | None = None) -> None: ...
    @property
    def refused_here(self) -> int: ...
    def read_listen(self) -> None: ...
    def read_upstream(self) -> None: ...
    def close(self) -> None: ...
