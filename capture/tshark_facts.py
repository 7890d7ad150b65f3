"""Ground-truth facts about a capture, produced only by Wireshark's own tools.

``python -m capture.tshark_facts FILE [FILE ...]`` prints JSON. Nothing here parses SIP or RTP
itself: every figure comes from tshark (``-z sip,stat``, ``-z rtp,streams`` with and without
heuristic RTP, ``-T fields``) or capinfos, so the facts can be used to judge sipwatch's own
analysis and the sidecar's metrics without sharing a bug with them.

Transactions are counted per hop: requests (ACK excluded: it has no response) keyed by Call-ID,
CSeq number and method, top Via branch, and (source IP, destination IP). A response belongs to
the request whose key matches with the IPs swapped. RTT = first copy of the request to the first
response of any status (100 Trying included), in milliseconds rounded to 3 decimals.
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from decimal import Decimal

SEP = "\x1f"
FIELDS = (
    "frame.number", "frame.time_epoch", "frame.protocols", "ip.src", "ip.dst", "ipv6.src",
    "ipv6.dst", "udp.srcport", "udp.dstport", "tcp.srcport", "tcp.dstport", "sip.Method",
    "sip.Status-Code", "sip.Call-ID", "sip.CSeq.seq", "sip.CSeq.method", "sip.Via.branch",
    "sctp.srcport", "sctp.dstport",
)


class TsharkError(RuntimeError):
    pass


def have_tshark() -> bool:
    return shutil.which("tshark") is not None and shutil.which("capinfos") is not None


def _run(args: list[str]) -> str:
    p = subprocess.run(args, capture_output=True, text=True, errors="replace")
    if p.returncode != 0:
        raise TsharkError(f"{' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def _capinfos(path: str) -> tuple[str, str]:
    """Packet count (-M: exact, never "12 k") and the encapsulation's long name."""
    packets = re.search(r"Number of packets\s*[:=]\s*(\S+)", _run(["capinfos", "-M", "-c", path]))
    encap = re.search(r"File encapsulation\s*:\s*(.+)", _run(["capinfos", "-E", path]))
    return (packets.group(1) if packets else "0", encap.group(1).strip() if encap else "")


def _sip_stat(text: str) -> tuple[int, dict, dict]:
    total = int(re.search(r"Number of SIP messages:\s*(\d+)", text).group(1))
    codes, methods = {}, {}
    section = None
    for line in text.splitlines():
        if "SIP Status Codes" in line:
            section = codes
        elif "List of SIP Request methods" in line:
            section = methods
        elif "Average setup time" in line:
            section = None
        elif section is codes and (m := re.match(r"\s+SIP (\d{3}) .*:\s*(\d+) Packets", line)):
            codes[m.group(1)] = codes.get(m.group(1), 0) + int(m.group(2))
        elif section is methods and (m := re.match(r"\s+(\S+)\s*:\s*(\d+) Packets", line)):
            methods[m.group(1)] = methods.get(m.group(1), 0) + int(m.group(2))
    return total, dict(sorted(methods.items())), dict(sorted(codes.items()))


_STREAM = re.compile(
    r"^\s*[\d.]+\s+[\d.]+\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)\s+(0x[0-9A-Fa-f]+)\s+(.+?)\s+(\d+)\s+"
    r"(-?\d+) \((-?[\d.]+)%\)\s+[-\d.]+\s+[-\d.]+\s+([-\d.]+)\s+[-\d.]+\s+([-\d.]+)\s+([-\d.]+)\s*(X?)\s*$")


def _rtp_streams(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        m = _STREAM.match(line)
        if not m:
            continue
        g = m.groups()
        out.append({
            "src": _hp(g[0], g[1]), "dst": _hp(g[2], g[3]), "ssrc": g[4], "payload": g[5],
            "pkts": int(g[6]), "lost": int(g[7]), "lost_pct": float(g[8]),
            "max_delta_ms": float(g[9]), "mean_jitter_ms": float(g[10]),
            "max_jitter_ms": float(g[11]), "problem": g[12] == "X",
        })
    return out


def _rtp_block(text: str) -> str:
    i = text.find("RTP Streams")
    return text[i:] if i >= 0 else ""


def _frames(path: str) -> list[list[str]]:
    args = ["tshark", "-n", "-r", path, "-T", "fields", "-E", f"separator={SEP}",
            "-E", "occurrence=a", "-E", "aggregator=,"]
    for f in FIELDS:
        args += ["-e", f]
    return [line.split(SEP) for line in _run(args).splitlines() if line]


def sip_transactions(rows: list[list[str]]) -> tuple[list[dict], dict, set, set]:
    """Per-hop transactions from tshark's field rows (see module docstring)."""
    txs: dict[tuple, dict] = {}
    order: list[dict] = []
    invite_cids: set[str] = set()
    transports: set[str] = set()
    for r in rows:
        (_, t, protos, ip_s, ip_d, ip6_s, ip6_d, us, ud, ts, td, method, status, cid, seq,
         cmeth, branch, ss, sd) = r
        if not cid:
            continue
        if "," in seq:
            raise TsharkError(f"frame {r[0]}: several SIP messages in one frame are not supported")
        layers = protos.split(":")
        # tunnelled: the innermost IP header is the last one, of whichever version it is
        inner6 = ip6_s and (not ip_s or _last(layers, "ipv6") > _last(layers, "ip"))
        src_ip, dst_ip = (ip6_s, ip6_d) if inner6 else (ip_s, ip_d)
        src_ip, dst_ip = src_ip.split(",")[-1], dst_ip.split(",")[-1]
        # the innermost transport header too (a VXLAN/Geneve outer UDP header comes first)
        inner_tcp = ts and (not us or _last(layers, "tcp") > _last(layers, "udp"))
        sport, dport = (ts, td) if inner_tcp else (us, ud) if us else (ss, sd)
        sport, dport = sport.split(",")[-1], dport.split(",")[-1]
        transports.add("TCP" if inner_tcp else "UDP" if us else "SCTP" if ss else "OTHER")
        top = branch.split(",")[0]
        when = Decimal(t)
        if method:
            if method == "INVITE":
                invite_cids.add(cid)
            if method == "ACK":
                continue
            key = (cid, seq, cmeth, top, src_ip, dst_ip)
            tx = txs.get(key)
            if tx is None:
                tx = {"call_id": cid, "method": cmeth, "cseq": int(seq),
                      "src": _hp(src_ip, sport), "dst": _hp(dst_ip, dport),
                      "t0": when, "t1": None, "copies": 1}
                txs[key] = tx
                order.append(tx)
            else:
                tx["copies"] += 1
        elif status:
            tx = txs.get((cid, seq, cmeth, top, dst_ip, src_ip))
            if tx is not None and tx["t1"] is None:
                tx["t1"] = when
    listing = []
    rtts = []
    for tx in order:
        rtt = None
        if tx["t1"] is not None:
            rtt = _ms(tx["t1"] - tx["t0"])
            rtts.append(rtt)
        listing.append({k: tx[k] for k in ("call_id", "method", "cseq", "src", "dst")} |
                       {"rtt_ms": rtt})
    summary = {
        "transactions": len(order),
        "answered": len(rtts),
        "unanswered": len(order) - len(rtts),
        "retransmitted_requests": sum(tx["copies"] - 1 for tx in order),
        "rtt_first_resp_ms_min": min(rtts) if rtts else None,
        "rtt_first_resp_ms_median": round(statistics.median(rtts), 3) if rtts else None,
        "rtt_first_resp_ms_max": max(rtts) if rtts else None,
    }
    return listing, summary, invite_cids, transports


def _last(layers: list[str], name: str) -> int:
    return max((i for i, x in enumerate(layers) if x == name), default=-1)


def _hp(ip: str, port: str) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _ms(delta: Decimal) -> float:
    return float(round(delta * 1000, 3))


def sip_stat(path: str, display_filter: str | None = None) -> tuple[int, dict, dict]:
    """``-z sip,stat`` of the frames matching a display filter: (messages, methods, status codes)."""
    z = "sip,stat" + (f",{display_filter}" if display_filter else "")
    return _sip_stat(_run(["tshark", "-n", "-q", "-r", path, "-z", z]))


def facts(path: str) -> dict:
    packets, encap = _capinfos(path)
    stat = _run(["tshark", "-n", "-q", "-r", path, "-z", "sip,stat", "-z", "rtp,streams"])
    heur = _run(["tshark", "-n", "-q", "-r", path, "-o", "rtp.heuristic_rtp:TRUE",
                 "-z", "rtp,streams"])
    total, methods, codes = _sip_stat(stat)
    rows = _frames(path)
    listing, txn, invite_cids, transports = sip_transactions(rows)
    rtcp = sum(1 for r in rows if "rtcp" in r[2].split(":"))
    return {
        "packets": packets,
        "encapsulation": encap,
        "sip_messages": total,
        "methods": methods,
        "status_codes": codes,
        "invite_calls": len(invite_cids),
        "sip_transport": sorted(transports),
        "txn": txn,
        "rtp_sdp_streams": _rtp_streams(_rtp_block(stat)),
        "rtp_heur_streams": _rtp_streams(_rtp_block(heur)),
        "rtcp_frames": rtcp,
        "transactions_list": listing,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write("usage: python -m capture.tshark_facts FILE [FILE ...]\n")
        return 0 if argv else 2
    try:
        if len(argv) == 1:
            out = facts(argv[0])
        else:
            out = {p.rsplit("/", 1)[-1]: facts(p) for p in argv}
    except TsharkError as exc:
        sys.stderr.write(f"tshark_facts: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
