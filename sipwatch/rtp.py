"""RTP/RTCP quality per stream, computed the way Wireshark's ``-z rtp,streams`` reports it.

A stream is (source, destination, SSRC). Per stream: packets, expected/lost from RFC 3550
A.1 extended sequence numbers (16-bit wrap-around), duplicates, out-of-order, max delta and
interarrival jitter in milliseconds. Jitter follows RFC 3550 §6.4.1 (J += (|D| − J)/16) on the
payload type's clock rate; like Wireshark, the first packet, marker packets, comfort noise and
packets older than the last in-sequence one do not enter max delta/jitter, and payloads
without a known clock rate (telephone-event, unmapped dynamic types) leave jitter unchanged.
Matching Wireshark exactly matters because tshark is how a user will check these figures.

MOS is the simplified E-model (ITU-T G.107): R = 93.2 − Ie_eff (no delay term: a one-point
capture cannot see mouth-to-ear delay), Ie_eff = Ie + (95 − Ie)·Ppl/(Ppl + Bpl) with Ie and
Bpl per codec from ITU-T G.113 Appendix I (G.711 without PLC: 0/4.3; G.729: 10/19),
MOS = 1 + 0.035R + 7e-6·R(R − 60)(100 − R).

Streams are tied to calls through the SDP offer/answer the observer saw (``c=`` and ``m=``).

For metrics, :func:`codec_label` folds the codec name into a fixed set (``CODEC_LABELS``) so a
label never takes a value from the wire. Live capture bounds the stream table with
``RtpAnalyzer(max_streams=..., on_evict=...)``; each stream keeps only a short window of recent
sequence numbers for duplicate detection.
"""
from __future__ import annotations

import struct

# static payload types (RFC 3551 §6): name, clock rate
STATIC_PT = {
    0: ("g711U", 8000), 3: ("GSM", 8000), 4: ("G723", 8000), 5: ("DVI4", 8000),
    6: ("DVI4", 16000), 7: ("LPC", 8000), 8: ("g711A", 8000), 9: ("G722", 8000),
    10: ("L16", 44100), 11: ("L16", 44100), 12: ("QCELP", 8000), 13: ("CN", 8000),
    14: ("MPA", 90000), 15: ("G728", 8000), 16: ("DVI4", 11025), 17: ("DVI4", 22050),
    18: ("g729", 8000), 19: ("CN", 8000), 25: ("CelB", 90000), 26: ("JPEG", 90000),
    28: ("nv", 90000), 31: ("H261", 90000), 32: ("MPV", 90000), 33: ("MP2T", 90000),
    34: ("H263", 90000),
}
PT_CN = (13, 19)
# E-model impairment per codec family: (Ie, Bpl), ITU-T G.113 Appendix I
CODEC_IMPAIRMENT = {"pcmu": (0.0, 4.3), "pcma": (0.0, 4.3), "g711u": (0.0, 4.3),
                    "g711a": (0.0, 4.3), "g729": (10.0, 19.0)}
# metric label values for codecs: a fixed set, anything else is "other"
CODEC_LABELS = ("PCMU", "PCMA", "G722", "G729", "GSM", "iLBC", "opus", "AMR", "AMR-WB",
                "telephone-event", "other")
_CODEC_ALIASES = {"pcmu": "PCMU", "g711u": "PCMU", "pcma": "PCMA", "g711a": "PCMA",
                  "g722": "G722", "g729": "G729", "g729a": "G729", "gsm": "GSM", "ilbc": "iLBC",
                  "opus": "opus", "amr": "AMR", "amr-wb": "AMR-WB",
                  "telephone-event": "telephone-event"}

_hdr = struct.Struct("!BBHII").unpack_from


def mos_from_loss(loss_pct: float, codec: str) -> float | None:
    """E-model MOS for a packet-loss percentage; None for codecs without G.113 figures."""
    imp = CODEC_IMPAIRMENT.get(codec.lower().split("/")[0].split(",")[0].strip())
    if imp is None:
        return None
    ie, bpl = imp
    ie_eff = ie + (95.0 - ie) * loss_pct / (loss_pct + bpl)
    r = 93.2 - ie_eff
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    return round(1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r), 2)


def codec_label(name: str) -> str:
    """A codec name from SDP or the static payload table as one of ``CODEC_LABELS``."""
    return _CODEC_ALIASES.get(name.strip().lower(), "other")


# -- SDP ----------------------------------------------------------------------------------
def parse_sdp(body: bytes) -> list[tuple[str, int, dict[int, tuple[str, int]]]]:
    """Media endpoints of an SDP body: [(ip, port, {pt: (encoding, clock)})] (port 0 skipped)."""
    out = []
    session_ip = None
    media = None  # [ip, port, pts, rtpmap]
    for raw in body.splitlines():
        line = raw.strip().decode("ascii", "replace")
        if len(line) < 2 or line[1] != "=":
            continue
        k, v = line[0], line[2:]
        if k == "c":
            parts = v.split()
            ip = parts[2].split("/")[0] if len(parts) >= 3 else None
            if media is None:
                session_ip = ip
            else:
                media[0] = ip
        elif k == "m":
            if media is not None:
                out.append(media)
            parts = v.split()
            try:
                port = int(parts[1].split("/")[0])
                pts = [int(p) for p in parts[3:] if p.isdigit()]
            except (IndexError, ValueError):
                media = None
                continue
            media = [session_ip, port, pts, {}]
        elif k == "a" and media is not None and v.startswith("rtpmap:"):
            try:
                pt_s, enc = v[7:].split(None, 1)
                name, _, rest = enc.partition("/")
                media[3][int(pt_s)] = (name, int(rest.split("/")[0] or 0))
            except ValueError:
                continue
    if media is not None:
        out.append(media)
    result = []
    for ip, port, pts, rtpmap in out:
        if not ip or not port:
            continue
        names = {pt: rtpmap.get(pt) or STATIC_PT.get(pt) for pt in pts}
        result.append((ip, port, {pt: n for pt, n in names.items() if n}))
    return result


# -- streams --------------------------------------------------------------------------------
class RtpStream:
    """One direction of one SSRC. ``add`` is called per packet in capture order."""

    __slots__ = (
        "src", "dst", "ssrc", "pts", "ptmap", "call_id", "packets", "first_ts", "last_ts",
        "base_seq", "max_seq", "cycles", "dups", "ooo", "seen", "start_seq", "stop_seq",
        "w_cycles", "under", "seq_num", "ext_ts", "last_nominal", "time", "jitter",
        "max_jitter", "mean_jitter", "delta", "max_delta", "prev_pt", "wrong_seq",
        "rtcp_fraction_lost", "rtcp_cum_lost", "rtcp_jitter_ms", "clock",
    )

    def __init__(self, src, dst, ssrc, ptmap):
        self.src, self.dst, self.ssrc = src, dst, ssrc
        self.ptmap = ptmap  # {pt: (name, clock)} from SDP, or {}
        self.call_id = None
        self.pts: dict[int, int] = {}
        self.packets = 0
        self.first_ts = self.last_ts = 0.0
        self.base_seq = self.max_seq = self.cycles = 0  # RFC 3550 A.1
        self.dups = self.ooo = 0
        self.seen = set()  # recent extended sequence numbers (duplicate detection)
        self.start_seq = self.stop_seq = self.seq_num = 0  # Wireshark's sequence bookkeeping
        self.w_cycles, self.under, self.wrong_seq = 0, False, 0
        self.ext_ts = 0  # RTP timestamp of the first packet
        self.last_nominal = 0.0  # ms of RTP time since the first packet, at the last audio packet
        self.time = 0.0
        self.jitter = self.max_jitter = self.mean_jitter = 0.0
        self.delta = self.max_delta = 0.0
        self.prev_pt = -1
        self.clock = 0
        self.rtcp_fraction_lost = self.rtcp_cum_lost = self.rtcp_jitter_ms = None

    def clock_rate(self, pt: int) -> int:
        if pt < 96:
            return STATIC_PT.get(pt, ("", 0))[1]
        name, clock = self.ptmap.get(pt, ("", 0))
        if name.lower().startswith("telephone-event"):
            return 0  # event timestamps stand still for the whole event (RFC 4733 §2.2.1)
        return clock

    def add(self, now_ms: float, seq: int, rtp_ts: int, pt: int, marker: bool) -> None:
        self.pts[pt] = self.pts.get(pt, 0) + 1
        self.packets += 1
        if self.packets == 1:
            self.base_seq = self.max_seq = seq
            self.start_seq = self.stop_seq = self.seq_num = seq
            self.ext_ts = rtp_ts
            self.time = now_ms
            self.prev_pt = pt
            self.seen.add(seq)
            return
        self._rfc3550_seq(seq)
        # RTP timestamp relative to the first packet, modulo 2^32; "in time" if less than half
        # the range ahead (a packet from before the first one is not)
        nominal_units = (rtp_ts - self.ext_ts) & 0xFFFFFFFF
        in_time = nominal_units < 0x80000000
        self._wireshark_seq(seq, in_time)
        cn = pt in PT_CN
        follow_cn = self.prev_pt in PT_CN
        self.prev_pt = pt
        clock = self.clock_rate(pt)
        diff = 0.0
        if in_time:
            self.delta = now_ms - self.time
            if clock:
                self.clock = clock
                nominal = nominal_units / (clock // 1000)
                diff = abs(now_ms - (self.time + nominal - self.last_nominal))
                self.jitter = (15 * self.jitter + diff) / 16
                self.last_nominal = nominal
        if not (marker or cn or follow_cn or not in_time):
            if self.delta > self.max_delta:
                self.max_delta = self.delta
            if clock:
                if self.jitter > self.max_jitter:
                    self.max_jitter = self.jitter
                # Wireshark's "Mean Jitter": running mean of J, divided by all packets so far
                n = self.packets - 1
                self.mean_jitter = (self.mean_jitter * (n - 1) + self.jitter) / n
        if in_time:
            self.time = now_ms
        self.stop_seq = seq

    def _rfc3550_seq(self, seq: int) -> None:
        """Extended highest sequence number, duplicates and reordering (RFC 3550 A.1)."""
        udelta = (seq - self.max_seq) & 0xFFFF
        behind = udelta > 0xFFFF - 100  # up to 100 behind the highest: late or duplicate
        if behind:
            ext = self.cycles + self.max_seq - (0x10000 - udelta)
        else:  # in order, possibly after a gap (or a jump we take as a restart)
            if seq < self.max_seq:
                self.cycles += 0x10000
            self.max_seq = seq
            ext = self.cycles + seq
        if ext in self.seen:
            self.dups += 1
            return
        if behind:
            self.ooo += 1
        self.seen.add(ext)
        if len(self.seen) > 256:
            # only numbers up to 100 behind the highest can be duplicates: keep a short window
            self.seen = {e for e in self.seen if e > ext - 128}

    def _wireshark_seq(self, seq: int, in_time: bool) -> None:
        """Wrap-around cycles the way Wireshark counts them for its Lost column."""
        if seq < self.start_seq and in_time and not self.under:
            self.w_cycles += 1
            self.under = True
        elif seq == 0 and self.stop_seq == 65535 and in_time and not self.under:
            self.w_cycles += 1
            self.under = True
        elif seq > self.start_seq and in_time and self.under:
            self.under = False
        self.seq_num = seq

    # -- results --------------------------------------------------------------------------
    @property
    def expected(self) -> int:
        """Wireshark: last sequence number + wraps − first + 1."""
        return self.stop_seq + self.w_cycles * 0x10000 - self.start_seq + 1

    @property
    def lost(self) -> int:
        return self.expected - self.packets

    @property
    def lost_rfc3550(self) -> int:
        """RFC 3550 A.3: extended highest − base + 1 − received (duplicates excluded)."""
        return self.cycles + self.max_seq - self.base_seq + 1 - (self.packets - self.dups)

    def payload_name(self) -> str:
        names = []
        for pt, _ in sorted(self.pts.items(), key=lambda kv: -kv[1]):
            n = STATIC_PT.get(pt) if pt < 96 else self.ptmap.get(pt)
            names.append(n[0] if n else str(pt))
        return ", ".join(names)

    def codec(self) -> str:
        """Encoding name of the payload type carried most (SDP rtpmap first), or ""."""
        main_pt = max(self.pts, key=self.pts.get) if self.pts else -1
        return (self.ptmap.get(main_pt) or STATIC_PT.get(main_pt) or ("",))[0]

    def summary(self) -> dict:
        expected = max(self.expected, 1)
        loss_pct = max(self.lost, 0) * 100.0 / expected
        # MOS from RFC 3550 loss: a duplicate must not hide a lost packet
        rfc_expected = max(self.cycles + self.max_seq - self.base_seq + 1, 1)
        rfc_loss_pct = max(self.lost_rfc3550, 0) * 100.0 / rfc_expected
        codec = self.codec()
        return {
            "src": _hp(self.src), "dst": _hp(self.dst), "ssrc": "0x%08X" % self.ssrc,
            "payload": self.payload_name(), "call_id": self.call_id,
            "pkts": self.packets, "expected": self.expected, "lost": self.lost,
            "lost_rfc3550": self.lost_rfc3550,
            "lost_pct": round(loss_pct, 2), "duplicates": self.dups, "out_of_order": self.ooo,
            "max_delta_ms": round(self.max_delta, 3),
            "mean_jitter_ms": round(self.mean_jitter, 3),
            "max_jitter_ms": round(self.max_jitter, 3),
            "mos": mos_from_loss(rfc_loss_pct, codec),
            "rtcp_fraction_lost": self.rtcp_fraction_lost,
            "rtcp_cumulative_lost": self.rtcp_cum_lost,
            "rtcp_jitter_ms": self.rtcp_jitter_ms,
        }


def _hp(addr) -> str:
    ip, port = addr
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class RtpAnalyzer:
    """Classifies UDP payloads as RTP/RTCP and keeps one :class:`RtpStream` per (src, dst, SSRC)."""

    def __init__(self, max_streams: int = 0, on_evict=None):
        self.streams: dict[tuple, RtpStream] = {}
        self.max_streams = max_streams  # 0: unbounded (offline analysis)
        self.on_evict = on_evict  # callable(RtpStream) for a stream dropped to make room
        self.evicted = 0
        self.endpoints: dict[tuple[str, int], tuple[bytes, dict]] = {}  # SDP (ip, port) → call
        self.rtcp_packets = 0
        self.not_rtp = 0
        self.t0: float | None = None

    def add_sdp(self, call_id: bytes, body: bytes, src=None, dst=None, ts=None) -> list:
        """Remember the media endpoints of an SDP body; returns them as [(ip, port)]."""
        added = []
        for ip, port, ptmap in parse_sdp(body):
            self.endpoints.pop((ip, port), None)  # re-insert: newest last
            self.endpoints[(ip, port)] = (call_id, ptmap)
            added.append((ip, port))
        return added

    def feed(self, payload: bytes, src, dst, ts: float) -> bool:
        """Account one UDP payload; False if it is neither RTP nor RTCP."""
        if len(payload) < 8 or payload[0] >> 6 != 2:
            self.not_rtp += 1
            return False
        pt = payload[1]
        if 200 <= pt <= 207 or 72 <= (pt & 0x7F) <= 76:
            return self._rtcp(payload)
        if len(payload) < 12:
            self.not_rtp += 1
            return False
        b0, b1, seq, rtp_ts, ssrc = _hdr(payload, 0)
        if 12 + (b0 & 15) * 4 > len(payload):
            self.not_rtp += 1
            return False
        if self.t0 is None:
            self.t0 = ts
        key = (src, dst, ssrc)
        st = self.streams.get(key)
        if st is None:
            if self.max_streams and len(self.streams) >= self.max_streams:
                self._evict()
            tie = self.endpoints.get(dst) or self.endpoints.get(src)
            st = self.streams[key] = RtpStream(src, dst, ssrc, tie[1] if tie else {})
            st.first_ts = ts
            if tie:
                st.call_id = tie[0].decode("utf-8", "replace")
        st.last_ts = ts
        st.add((ts - self.t0) * 1000.0, seq, rtp_ts, b1 & 0x7F, bool(b1 & 0x80))
        return True

    def _evict(self) -> None:
        """Drop the oldest stream (first created) to make room for a new one."""
        key = next(iter(self.streams))
        st = self.streams.pop(key)
        self.evicted += 1
        if self.on_evict is not None:
            self.on_evict(st)

    def _rtcp(self, data: bytes) -> bool:
        """Read SR/RR report blocks of a compound RTCP packet (fraction lost is x/256)."""
        self.rtcp_packets += 1
        off = 0
        while off + 8 <= len(data):
            b0, pt, length = struct.unpack_from("!BBH", data, off)
            end = off + (length + 1) * 4
            if b0 >> 6 != 2 or end > len(data):
                break
            rc = b0 & 31
            blocks = off + (28 if pt == 200 else 8) if pt in (200, 201) else end
            for i in range(rc if pt in (200, 201) else 0):
                p = blocks + i * 24
                if p + 24 > end:
                    break
                src_ssrc, word, _, jit = struct.unpack_from("!IIII", data, p)
                cum = word & 0xFFFFFF
                if cum & 0x800000:
                    cum -= 0x1000000
                for st in self.streams.values():
                    if st.ssrc == src_ssrc:
                        st.rtcp_fraction_lost = round((word >> 24) / 256.0, 4)
                        st.rtcp_cum_lost = cum
                        st.rtcp_jitter_ms = round(jit * 1000.0 / (st.clock or 8000), 3)
            off = end
        return True

    def summaries(self) -> list[dict]:
        return [st.summary() for st in self.streams.values()]


__all__ = ["RtpAnalyzer", "RtpStream", "parse_sdp", "mos_from_loss", "codec_label", "CODEC_LABELS",
           "STATIC_PT"]
