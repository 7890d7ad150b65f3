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
  mask-call-id  show Call-IDs as the sidecar logs them (to search its logs for a known Call-ID)
  alive     exit 0 if the proxy's --alive-file was touched lately (a liveness probe)
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
    if argv and argv[0] == "proxy":
        # SIGHUP's default action ends the process; until the proxy's own handler (re-open the
        # spans file) is installed, about 0.3 s into the start, a SIGHUP (log rotation) is ignored
        import signal
        try:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        except (AttributeError, OSError, ValueError):  # (no SIGHUP, or not the main thread)
            pass
    # the proxy's heap, before anything else is imported (see sipwatch.heap): this is where both
    # the `sipwatch` command and `python -m sipwatch` start
    import os

    from .heap import early_choice
    early_choice(argv, os.environ)
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
    if cmd == "mask-call-id":
        return mask_call_id_main(rest)
    if cmd == "alive":
        return alive_main(rest)
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


def alive_main(argv: list[str]) -> int:
    """``sipwatch alive FILE [--max-age SECONDS]``: 0 when the proxy's event loop touched FILE
    (``--alive-file``) within SECONDS (default 10), else 1. A liveness probe that reads a file
    queues behind nothing: an HTTP probe waits in the metrics port's accept queue, which a
    flood of connections keeps full for about two seconds at a time. A time more than SECONDS
    ahead is stale too: the wall clock stepped back since the last touch, and a live loop
    would have touched it again within a second (read as fresh, a loop stuck since then
    passed for the size of the step)."""
    import argparse
    import math
    import os
    import time

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
        return value

    ap = argparse.ArgumentParser(prog="sipwatch alive", description=alive_main.__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--max-age", type=seconds, default=10.0, help="seconds (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        age = time.time() - os.stat(args.file).st_mtime
    except OSError as exc:
        sys.stderr.write(f"sipwatch alive: {args.file}: {exc.strerror or exc}\n")
        return 1
    if age > args.max_age:
        sys.stderr.write(f"sipwatch alive: {args.file} last touched {age:.1f} s ago\n")
        return 1
    if age < -args.max_age:
        sys.stderr.write(f"sipwatch alive: {args.file} last touched {-age:.1f} s ahead of the clock\n")
        return 1
    return 0


def mask_call_id_main(argv: list[str]) -> int:
    """``sipwatch mask-call-id [--mode M] [--secret-file F] CALL-ID...``: one line per Call-ID,
    as the sidecar with the same secret (``SIPWATCH_SECRET`` or the file) writes it."""
    import argparse
    import os

    from .config import ConfigError, read_secret
    from .masking import CALL_ID_MODES, CallIdMasker, default_call_id_mode
    ap = argparse.ArgumentParser(prog="sipwatch mask-call-id",
                                 description="Print Call-IDs as logs and spans show them (--mask-call-id).")
    # the sidecar's own default: its SIPWATCH_MASK_CALL_ID, else what SIPWATCH_MASK_NUMBERS implies
    # (none keeps Call-IDs as they are: shown masked here, they matched nothing in its logs)
    default = os.environ.get("SIPWATCH_MASK_CALL_ID") or \
        default_call_id_mode(os.environ.get("SIPWATCH_MASK_NUMBERS", "partial"))
    ap.add_argument("--mode", choices=CALL_ID_MODES, default=default)
    ap.add_argument("--secret-file", help="the key file the sidecar reads (default: SIPWATCH_SECRET)")
    ap.add_argument("call_ids", nargs="+", metavar="CALL-ID")
    args = ap.parse_args(argv)
    if args.mode not in CALL_ID_MODES:  # (argparse checks the choices of a given flag, not a default)
        ap.error(f"SIPWATCH_MASK_CALL_ID: {args.mode!r} is not one of {', '.join(CALL_ID_MODES)}")
    try:
        secret = read_secret((os.environ.get("SIPWATCH_SECRET"), "SIPWATCH_SECRET"),
                             (args.secret_file or os.environ.get("SIPWATCH_SECRET_FILE"), "--secret-file"))
    except ConfigError as exc:
        sys.stderr.write(f"sipwatch mask-call-id: error: {exc}\n")
        return 2
    if not secret and args.mode != "none":
        sys.stderr.write("sipwatch mask-call-id: error: no SIPWATCH_SECRET or --secret-file: a sidecar "
                         "without a secret uses a random key nobody else can reproduce\n")
        return 2
    mask = CallIdMasker(args.mode, secret)
    for cid in args.call_ids:
        sys.stdout.write(f"{mask(os.fsencode(cid))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
