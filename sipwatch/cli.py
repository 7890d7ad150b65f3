"""``sipwatch`` command: ``proxy`` (the sidecar), plus the capture-side tools."""
from __future__ import annotations

import sys

USAGE = """usage: sipwatch COMMAND [options]

commands:
  proxy     run the inline SIP proxy sidecar (see: sipwatch proxy --help)
  analyze   analyse a pcap/pcapng file: calls, transactions, RTTs, RTP quality
  replay    replay a recorded SIP conversation through a running sidecar
  capture   capture live from an interface and export like the proxy
  waterfall text waterfall/ladder of a call from a --spans-file
"""

# subcommand -> "module:function", imported on demand so the proxy never loads pyshark
SUBCOMMANDS = {
    "analyze": "capture.analyze:main",
    "replay": "capture.replay:main",
    "capture": "capture.live:main",
    "waterfall": "sipwatch.waterfall:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "proxy":
        from .app import run_proxy
        from .config import ConfigError, settings_from
        try:
            settings = settings_from(rest)
        except ConfigError as exc:
            sys.stderr.write(f"sipwatch proxy: error: {exc}\n")
            return 2
        return run_proxy(settings)
    target = SUBCOMMANDS.get(cmd)
    if target is None:
        sys.stderr.write(f"sipwatch: unknown command {cmd!r}\n{USAGE}")
        return 2
    import importlib
    mod, func = target.split(":")
    try:
        fn = getattr(importlib.import_module(mod), func)
    except (ImportError, AttributeError) as exc:
        sys.stderr.write(f"sipwatch {cmd}: not available ({exc})\n")
        return 2
    return fn(rest)


if __name__ == "__main__":
    sys.exit(main())
