"""pyshark engine: tshark's own dissectors feed the same :class:`~capture.pcapfile.Packet` tuples.

Slower than :mod:`capture.pcapfile` by orders of magnitude, but it decodes whatever tshark
decodes (including its TCP and IP reassembly), which makes it a useful cross-check. pyshark
drives tshark from an asyncio loop of its own and cannot run inside a running event loop, so it
runs in a separate worker process that sends packets back in batches.

Only frames matching ``sip || rtp || rtcp`` are read (RTP heuristics on, so streams without
SDP are found too); ``decode_as`` adds SIP on nonstandard ports, e.g. ``{"udp.port==5080": "sip"}``.
"""
from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import subprocess
from typing import Iterator

from .pcapfile import Packet

DISPLAY_FILTER = "sip || rtp || rtcp"
BATCH = 256
_END = "__end__"


def _raw(field) -> bytes:
    """Bytes of a JSON-mode raw field (hex string, or [hex, offset, length, ...])."""
    v = field.value if hasattr(field, "value") else field
    if isinstance(v, list):
        v = v[0]
    return bytes.fromhex(v)


def _convert(pkt) -> list[tuple]:
    names = [layer.layer_name for layer in pkt.layers]
    ts = float(pkt.sniff_timestamp)
    ips = [layer for layer in pkt.layers if layer.layer_name in ("ip", "ipv6")]
    if not ips:
        return []
    ip = ips[-1]  # tunnels: the innermost header is the last
    src_ip, dst_ip = str(ip.src), str(ip.dst)
    if "udp" in names:
        udp = pkt.udp
        payload = _raw(udp.payload_raw)
        return [(ts, (src_ip, int(udp.srcport)), (dst_ip, int(udp.dstport)), "udp",
                 payload)]
    if "tcp" in names and "sip_raw" in names:
        tcp = pkt.tcp
        raw = pkt.sip_raw.value
        chunks = raw if isinstance(raw, list) and raw and isinstance(raw[0], list) else [raw]
        return [(ts, (src_ip, int(tcp.srcport)), (dst_ip, int(tcp.dstport)), "tcp", _raw(c))
                for c in chunks]
    return []


def _worker(path: str, out, decode_as: dict | None) -> None:
    try:
        import pyshark
        cap = pyshark.FileCapture(path, use_json=True, include_raw=True,
                                  display_filter=DISPLAY_FILTER, decode_as=decode_as,
                                  override_prefs={"rtp.heuristic_rtp": "TRUE"})
        batch, frames, skipped = [], 0, 0
        try:
            for pkt in cap:
                frames += 1
                try:
                    batch.extend(_convert(pkt))
                except (AttributeError, KeyError, ValueError, TypeError):
                    skipped += 1
                if len(batch) >= BATCH:
                    out.put(batch)
                    batch = []
        finally:
            cap.close()
        out.put(batch)
        out.put((_END, frames, skipped, None))
    except Exception as exc:  # report to the parent, which raises it there
        out.put((_END, 0, 0, f"{type(exc).__name__}: {exc}"))


def _frame_count(path) -> int | None:
    """Every frame in the file (the display filter hides the rest from pyshark), by capinfos."""
    try:
        out = subprocess.run(["capinfos", "-M", "-c", "-T", "-r", str(path)], capture_output=True,
                             text=True, timeout=120).stdout
        return int(out.strip().split("\t")[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def read_packets(path, counters: dict | None = None,
                 decode_as: dict | None = None) -> Iterator[Packet]:
    """Same contract as :func:`capture.pcapfile.read_packets`, decoded by tshark via pyshark."""
    c = counters if counters is not None else {}
    ctx = mp.get_context("spawn")  # a clean interpreter: no inherited event loop
    q = ctx.Queue(maxsize=64)
    proc = ctx.Process(target=_worker, args=(str(path), q, decode_as), daemon=True)
    proc.start()
    try:
        while True:
            try:
                item = q.get(timeout=5.0)
            except queue_mod.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"pyshark worker exited with code {proc.exitcode}")
                continue
            if isinstance(item, tuple) and item and item[0] == _END:
                _, frames, skipped, err = item
                c["frames_matched"] = frames
                total = _frame_count(path)
                if total is not None:  # ``packets`` means frames read in both engines
                    c["frames"] = total
                if skipped:
                    c["undecodable"] = skipped
                if err:
                    raise RuntimeError(f"pyshark: {err}")
                return
            for t in item:
                yield Packet(*t)
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join(5)
