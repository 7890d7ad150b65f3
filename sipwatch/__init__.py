"""sipwatch: SIP/RTP tracing sidecar (inline UDP proxy, W3C trace stamping, RTT metrics, OTLP spans)."""

from __future__ import annotations

import os
from importlib import import_module
from types import ModuleType

__version__ = "0.1.0"


def optional_c(name: str) -> ModuleType | None:
    """sipwatch's C module ``name`` (``"_sipscan"``, ``"_udppump"``...), or None: not built (no C
    compiler at install time), or ``SIPWATCH_NO_C=1``; then the Python path it stands in for does
    the work."""
    if os.environ.get("SIPWATCH_NO_C") == "1":
        return None
    try:
        return import_module(f"{__name__}.{name}")
    except ImportError:
        return None
