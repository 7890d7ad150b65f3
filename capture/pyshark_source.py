"""pyshark engine: tshark's own dissectors feed the same :class:`~capture.pcapfile.Packet` tuples.

Slower than :mod:`capture.pcapfile` by orders of magnitude, but it decodes whatever tshark
decodes (including its TCP and IP reassembly), which makes it a useful cross-check. pyshark
drives tshark from an asyncio loop of its own and cannot run inside a running event loop, so it
runs in a separate worker process that sends packets back in batches.

Only frames matching ``sip || rtp || rtcp`` are read (RTP heuristics on, so streams without
SDP are found too); ``decode_as`` adds SIP on nonstandard ports, e.g. ``{"udp.port==5080": "sip"}``.
tshark's EK output is used because it keeps every copy of a repeated layer (the outer and inner
IP/UDP of a tunnel), so addresses and ports are the innermost hop's; SIP over SCTP is read too.
``packets`` (the ``frames`` counter) is every frame in the file, counted by capinfos, as in the
fast engine; SIP messages are counted apart.
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


def _fields(layer) -> dict:
    """A layer's fields in EK mode. A layer repeated in a frame (the outer and inner IP/UDP of a
    tunnel) comes as a list of dicts, outermost first: the innermost is the last. (JSON mode
    keeps only the outermost of repeated layers, which reads every tunnel as its outer hop.)"""
    fd = layer._fields_dict
    return fd[-1] if isinstance(fd, list) else fd


def _hex(v) -> bytes:
    return bytes.fromhex(v[-1] if isinstance(v, list) else v or "")


def _convert(pkt) -> list[tuple]:
    names = [layer.layer_name for layer in pkt.layers]
    ts = float(pkt.sniff_timestamp)
    nets = [n for n in names if n in ("ip", "ipv6")]
    if not nets:
        return []
    net = nets[-1]  # tunnels: the innermost header is the last
    ipf = _fields(pkt.get_multiple_layers(net)[-1])
    src_ip, dst_ip = ipf[f"{net}_{net}_src"], ipf[f"{net}_{net}_dst"]
    transports = [n for n in names if n in ("udp", "tcp", "sctp")]
    if not transports:
        return []
    if transports[-1] == "sctp":  # SIP over SCTP (RFC 4168), which the fast reader does not open
        if "sip_raw" not in names:
            return []
        t = _fields(pkt.get_multiple_layers("sctp")[-1])
        raw = pkt.get_multiple_layers("sip_raw")[-1]._fields_dict
        return [(ts, (src_ip, int(t["sctp_sctp_srcport"])), (dst_ip, int(t["sctp_sctp_dstport"])), "sctp",
                 bytes.fromhex(c)) for c in (raw if isinstance(raw, list) else [raw])]
    if transports[-1] == "udp":
        u = _fields(pkt.get_multiple_layers("udp")[-1])
        return [(ts, (src_ip, int(u["udp_udp_srcport"])), (dst_ip, int(u["udp_udp_dstport"])), "udp",
                 _hex(u.get("udp_udp_payload_raw")))]
    if "sip_raw" in names:
        t = _fields(pkt.get_multiple_layers("tcp")[-1])
        raw = pkt.get_multiple_layers("sip_raw")[-1]._fields_dict
        chunks = raw if isinstance(raw, list) else [raw]  # several SIP messages in one segment
        return [(ts, (src_ip, int(t["tcp_tcp_srcport"])), (dst_ip, int(t["tcp_tcp_dstport"])), "tcp",
                 bytes.fromhex(c)) for c in chunks]
    return []


def _worker(path: str, out, decode_as: dict | None) -> None:
    try:
        import pyshark
        cap = pyshark.FileCapture(path, use_ek=True, include_raw=True,
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
