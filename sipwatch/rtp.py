"""RTP/RTCP quality per stream, computed the way Wireshark's ``-z rtp,streams`` reports it.

A stream is (source, destination, SSRC). Per stream: packets, expected/lost from RFC 3550
A.1 extended sequence numbers (16-bit wrap-around), duplicates, out-of-order, max delta and
interarrival jitter in milliseconds. Jitter follows RFC 3550 §6.4.1 (J += (|D| − J)/16) on the
payload type's clock rate; like Wireshark, the first packet, marker packets, comfort noise and
packets older than the last in-sequence one do not enter max delta/jitter, and payloads
without a known clock rate (telephone-event, unmapped dynamic types) leave jitter unchanged.
Matching Wireshark matters because tshark is how a user will check these figures; where
Wireshark departs from RFC 3550 the RFC wins, and the difference is said here: an event packet
is no reference for the next audio packet's D (Wireshark takes its arrival with the last audio
packet's timestamp, reading ~1000x the jitter on any stream with DTMF), and a clock rate that is
not a whole number of kHz (44.1) is not rounded down.

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
from collections import OrderedDict

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
MAX_DROPOUT, MAX_MISORDER = 3000, 100  # RFC 3550 A.1
# media sections read from one SDP body (a call offers a few; a conference bridge's bundled offer
# a few dozen): a forged body of thousands of m= lines would otherwise be that many endpoints
# held per message
MAX_SDP_MEDIA = 64
MAX_ADDRESS = 45  # characters of an SDP connection address: the longest IPv6 literal
# characters of an rtpmap encoding name kept (the longest registered is ~20): a 60-KB name was
# copied into every summary of the stream, 64 streams to a capture's call_summary line
MAX_CODEC_NAME = 32
MAX_SSRC_KEYS = 8  # streams remembered per SSRC for RTCP report blocks (one SSRC: a hop or two)
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
    # (G.107's polynomial dips below 1 for 0 < R < ~6.5; MOS is a 1-5 scale)
    return max(1.0, round(1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r), 2))


def codec_label(name: str) -> str:
    """A codec name from SDP or the static payload table as one of ``CODEC_LABELS``."""
    return _CODEC_ALIASES.get(name.strip().lower(), "other")


# -- SDP ----------------------------------------------------------------------------------
def parse_sdp(body: bytes) -> list[tuple[str, int, dict[int, tuple[str, int]]]]:
    """Media endpoints of an SDP body: [(ip, port, {pt: (encoding, clock)})] (port 0 skipped;
    the first MAX_SDP_MEDIA media sections; payload types 0..127, the 7 bits RTP has)."""
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
            if ip is not None and len(ip) > MAX_ADDRESS:  # no IP literal (a name ties no RTP)
                ip = None
            if media is None:
                session_ip = ip
            else:
                media[0] = ip
        elif k == "m":
            if media is not None:
                out.append(media)
                media = None
            if len(out) >= MAX_SDP_MEDIA:
                break
            parts = v.split()
            try:
                port = int(parts[1].split("/")[0])
                pts = [int(p) for p in parts[3:] if p.isdigit() and len(p) <= 3 and int(p) < 128]
            except (IndexError, ValueError):
                media = None
                continue
            media = [session_ip, port, pts, {}]
        elif k == "a" and media is not None and v.startswith("rtpmap:"):
            try:
                pt_s, enc = v[7:].split(None, 1)
                name, _, rest = enc.partition("/")
                if pt_s.isdigit() and len(pt_s) <= 3 and int(pt_s) < 128:
                    clock = int(rest.split("/")[0] or 0)
                    # (no RTP clock runs under 1 kHz; the jitter's units are clock // 1000)
                    media[3][int(pt_s)] = (name[:MAX_CODEC_NAME], clock if clock >= 1000 else 0)
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
        "w_cycles", "under", "seq_num", "ext_ts", "last_nominal", "time", "jitter_time", "jitter",
        "max_jitter", "mean_jitter", "delta", "max_delta", "prev_pt", "wrong_seq",
        "rtcp_fraction_lost", "rtcp_cum_lost", "rtcp_jitter_ms", "clock", "media", "heuristic",
        "received", "bad_seq", "restarts", "exp_before", "lost_before",
    )

    def __init__(self, src, dst, ssrc, ptmap):
        self.src, self.dst, self.ssrc = src, dst, ssrc
        self.ptmap = ptmap  # {pt: (name, clock)} from SDP, or {}
        self.call_id = None
        self.pts: dict[int, int] = {}
        self.packets = 0
        self.first_ts = self.last_ts = 0.0
        self.base_seq = self.max_seq = self.cycles = 0  # RFC 3550 A.1
        self.received = 0  # distinct valid packets since the last (re)start, RFC 3550 A.1
        self.bad_seq = -1  # A.1: a very large jump is believed only when the next one follows it
        self.restarts = 0
        self.exp_before = self.lost_before = 0  # expected/lost of the runs before a restart
        self.media = 0  # packets carrying a payload (header-only ones are keep-alives)
        self.heuristic = False  # found by the consistency heuristic, not tied by SDP
        self.dups = self.ooo = 0
        self.seen = set()  # recent extended sequence numbers (duplicate detection)
        self.start_seq = self.stop_seq = self.seq_num = 0  # Wireshark's sequence bookkeeping
        self.w_cycles, self.under, self.wrong_seq = 0, False, 0
        self.ext_ts = 0  # RTP timestamp of the first packet
        self.last_nominal = 0.0  # ms of RTP time since the first packet, at the last audio packet
        self.time = 0.0  # arrival of the last packet in time (max delta)
        self.jitter_time = 0.0  # arrival of the last packet whose clock is known (jitter's D)
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

    def add(self, now_ms: float, seq: int, rtp_ts: int, pt: int, marker: bool,
            media: bool = True) -> None:
        self.pts[pt] = self.pts.get(pt, 0) + 1
        self.packets += 1
        if media:
            self.media += 1
        if self.packets == 1:
            self.base_seq = self.max_seq = seq
            self.start_seq = self.stop_seq = self.seq_num = seq
            self.ext_ts = rtp_ts
            self.time = self.jitter_time = now_ms
            self.prev_pt = pt
            self.seen.add(seq)
            self.received = 1
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
                # D (RFC 3550 §6.4.1) pairs this packet with the last one of a known clock: an
                # event packet between them (its timestamp stands still, RFC 4733) is no
                # reference (Wireshark pairs the event's arrival with the audio's timestamp:
                # 15.8 ms of jitter on a clean stream with DTMF, 0.015 by A.8)
                self.clock = clock
                nominal = nominal_units / (clock / 1000)  # (44.1 kHz: not 44 units a ms)
                diff = abs(now_ms - (self.jitter_time + nominal - self.last_nominal))
                self.jitter = (15 * self.jitter + diff) / 16
                self.last_nominal = nominal
                self.jitter_time = now_ms
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
        """Extended highest sequence number, duplicates, reordering and restarts (RFC 3550 A.1).

        Forward steps below MAX_DROPOUT (3000) are in order (a gap is loss; passing 65535 is a
        wrap); up to MAX_MISORDER (100) behind the highest is a late packet or a duplicate; any
        other jump is believed only when the next packet follows it (the sender restarted its
        sequence): the run so far is closed (its loss kept) and counting starts again.
        """
        udelta = (seq - self.max_seq) & 0xFFFF
        if udelta < MAX_DROPOUT:
            if seq < self.max_seq:
                self.cycles += 0x10000
            self.max_seq = seq
            ext = self.cycles + seq
            behind = False
        elif udelta <= 0x10000 - MAX_MISORDER:
            if seq != self.bad_seq:
                self.bad_seq = (seq + 1) & 0xFFFF
                return  # not believed (yet): A.1 does not count it
            # two sequential packets after a jump: a restart; close the run, keep its loss
            expected = self.cycles + self.max_seq - self.base_seq + 1
            self.exp_before += expected
            self.lost_before += max(expected - self.received, 0)
            self.restarts += 1
            self.base_seq = (seq - 1) & 0xFFFF
            self.cycles = 0x10000 if seq == 0 else 0
            self.max_seq = seq
            self.received = 1  # the jump packet that announced the restart
            self.seen = {self.base_seq}
            ext = self.cycles + seq
            behind = False
        else:
            ext = self.cycles + self.max_seq - (0x10000 - udelta)
            behind = True
        if ext in self.seen:
            self.dups += 1
            return
        if behind:
            self.ooo += 1
        self.received += 1
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
        """Wireshark's Lost (expected − packets), but never below 0: duplicates or a late last
        packet make Wireshark's figure negative, which no packet count can be."""
        return max(self.expected - self.packets, 0)

    @property
    def expected_rfc3550(self) -> int:
        """RFC 3550 A.3: extended highest − base + 1, summed over the runs between restarts."""
        return self.exp_before + self.cycles + self.max_seq - self.base_seq + 1

    @property
    def lost_rfc3550(self) -> int:
        """RFC 3550 A.3 cumulative loss, duplicates not counted as received, never below 0."""
        cur = self.cycles + self.max_seq - self.base_seq + 1 - self.received
        return self.lost_before + max(cur, 0)

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
        loss_pct = min(self.lost * 100.0 / expected, 100.0)
        # MOS from RFC 3550 loss: a duplicate must not hide a lost packet
        rfc_expected = max(self.expected_rfc3550, 1)
        rfc_loss_pct = min(self.lost_rfc3550 * 100.0 / rfc_expected, 100.0)
        codec = self.codec()
        return {
            "src": _hp(self.src), "dst": _hp(self.dst), "ssrc": "0x%08X" % self.ssrc,
            "payload": self.payload_name(), "call_id": self.call_id,
            "detected_by": "heuristic" if self.heuristic else "sdp",
            # (Wireshark's expected goes negative when the last packet's number is from before
            # the first one's; no stream is expected to send fewer packets than it did)
            "pkts": self.packets, "expected": max(self.expected, self.packets), "lost": self.lost,
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
    """Classifies UDP payloads as RTP, RTCP, media keep-alives or none of these, and keeps one
    :class:`RtpStream` per (src, dst, SSRC).

    A packet becomes part of a stream in one of two ways, nothing else makes a stream:

    * **SDP**: its source or destination is a media address (``c=``/``m=``) of an offer or
      answer the observer saw; then, as in Wireshark's SDP-set-up conversations, every packet
      with a valid RTP version 2 header there is RTP of that call.
    * **Heuristic**: otherwise a (src, dst, SSRC) flow is held as a candidate until
      ``CONFIRM_RUN`` (4) consecutive packets of it have version 2, a payload type that is
      static (RFC 3551) or dynamic and declared by some SDP in the capture, sequence numbers
      each one more than the last and RTP timestamps that do not go back; then all its held
      packets and the rest of the flow are a stream. A flow that never does that (DNS, NetBIOS
      and the like whose first byte happens to read as version 2) is counted in ``not_rtp``.
      Well-known ports (below 1024) never start a heuristic stream. Like Wireshark's
      SDP-set-up conversations, which outlive the call, a pair of addresses that carried an
      SDP-tied stream keeps being RTP: a new SSRC between them is a stream at once (even
      after the live monitor forgot the call's SDP).

    Keep-alives are counted apart (``keepalives``) and never make a stream: UDP payloads too
    short for an RTP header (empty, a byte, CRLF) and STUN messages to or from a media address,
    and RTP packets without payload (RFC 6263 §4.6); a flow of nothing but those is not a
    stream. RTCP is accepted only as a valid compound packet (RFC 3550 A.2: every part
    version 2 with an RTCP packet type, lengths adding up to the datagram).
    """

    CONFIRM_RUN = 4
    MAX_HELD = 32  # packets held per candidate flow; the oldest beyond are not RTP
    MAX_CANDIDATES = 2048  # candidate flows held at once; the oldest beyond are dropped
    MAX_MEDIA_ADDRS = 65536  # remembered addresses of confirmed streams (keep-alive ports)
    # new SSRCs one direction of a media pair may start within CHURN_WINDOW seconds: a call
    # changes its SSRC a few times (re-INVITE, hold, transfer); a sender with a new one on every
    # packet made a stream of each (200,000 streams, 491 MB for a 14-MB capture). Past the
    # limit, packets of more new SSRCs are counted (``ssrc_churn``), not made streams.
    CHURN_WINDOW = 10.0
    CHURN_MAX = 16

    def __init__(self, max_streams: int = 0, on_evict=None):
        # (the tables that give up their oldest entry when full are OrderedDicts: taking a
        # plain dict's first key walks past every slot deleted before it, ~26 µs a time at
        # 65,536 entries once full, per media end of a forged SDP)
        self.streams: OrderedDict[tuple, RtpStream] = OrderedDict()
        self.max_streams = max_streams  # 0: unbounded (offline analysis)
        self.on_evict = on_evict  # callable(RtpStream) for a stream dropped to make room
        self.evicted = 0
        self.endpoints: OrderedDict[tuple[str, int], tuple[bytes, dict]] = OrderedDict()  # SDP (ip, port) → call
        self.dynamic_pts: set[int] = set()  # dynamic payload types some SDP declared
        self.candidates: OrderedDict[tuple, list] = OrderedDict()  # (src, dst, ssrc) → held packet headers
        self.media_addrs: OrderedDict[tuple, None] = OrderedDict()  # ends of confirmed streams, oldest first
        self.media_pairs: OrderedDict[tuple, None] = OrderedDict()  # (a, b) pairs that carried an SDP-tied stream
        self.by_ssrc: dict[int, list] = {}  # SSRC → stream keys, for RTCP report blocks
        self.new_ssrcs: dict[tuple, list] = {}  # (src, dst) → [window start, streams started in it]
        self.ssrc_churn = 0  # RTP packets of new SSRCs past CHURN_MAX in a window, not analysed
        self.rtcp_packets = 0
        self.keepalives = 0
        self._not_rtp = 0
        self.t0: float | None = None

    @property
    def not_rtp(self) -> int:
        """UDP payloads that are not RTP, RTCP or keep-alives (held candidates included: until
        they are confirmed they are not RTP)."""
        return self._not_rtp + sum(len(c) for c in self.candidates.values())

    @property
    def unconfirmed(self) -> int:
        """Packets held in flows not (yet) confirmed as RTP."""
        return sum(len(c) for c in self.candidates.values())

    def add_sdp(self, call_id: bytes, body: bytes, src=None, dst=None, ts=None) -> list:
        """Remember the media endpoints of an SDP body; returns them as [(ip, port)]."""
        added = []
        endpoints = self.endpoints
        for ip, port, ptmap in parse_sdp(body):
            endpoints.pop((ip, port), None)  # re-insert: newest last
            endpoints[(ip, port)] = (call_id, ptmap)
            if self.max_streams and len(endpoints) > self.MAX_MEDIA_ADDRS:  # live: the oldest go
                endpoints.popitem(last=False)
            if len(self.dynamic_pts) < 32:
                self.dynamic_pts.update(pt for pt in ptmap if 96 <= pt <= 127)
            added.append((ip, port))
        return added

    def _media_addr(self, src, dst) -> bool:
        ma, ep = self.media_addrs, self.endpoints
        return src in ep or dst in ep or src in ma or dst in ma

    def feed(self, payload: bytes, src, dst, ts: float) -> bool:
        """Account one UDP payload; False if it is neither RTP, RTCP nor a media keep-alive."""
        n = len(payload)
        if n < 12 or payload[0] >> 6 != 2:
            if n >= 8 and payload[0] >> 6 == 2 and 200 <= payload[1] <= 207 and self._rtcp(payload):
                return True
            if (n < 12 or _is_stun(payload)) and self._media_addr(src, dst):
                self.keepalives += 1
                return True
            self._not_rtp += 1
            return False
        b0, b1, seq, rtp_ts, ssrc = _hdr(payload, 0)
        if 200 <= b1 <= 207:
            if self._rtcp(payload):
                return True
            self._not_rtp += 1
            return False
        pt = b1 & 0x7F
        # payload bytes: plain 12-byte header (the usual case) or the full computation
        size = n - 12 if b0 == 0x80 else _payload_size(payload, b0)
        if size < 0 or 72 <= pt <= 76:  # bad header; 72-76 would collide with RTCP (RFC 5761)
            self._not_rtp += 1
            return False
        key = (src, dst, ssrc)
        st = self.streams.get(key)
        if st is None:
            tie = self.endpoints.get(dst) or self.endpoints.get(src)
            if (tie is not None or ((src, dst) if src <= dst else (dst, src)) in self.media_pairs) \
                    and self._churning((src, dst), ts):
                self.ssrc_churn += 1
                return True
            if tie is not None:
                st = self._new_stream(key, tie[1], ts, sdp=True)
                st.call_id = tie[0].decode("utf-8", "replace")
            elif ((src, dst) if src <= dst else (dst, src)) in self.media_pairs:
                held = self.candidates.get(key)  # a new SSRC between known RTP ends
                if held is not None:  # held before its pair was known: all of it is RTP
                    held.append((ts, seq, rtp_ts, pt, b1, size))
                    self._confirm(key, held)
                    return True
                st = self._new_stream(key, {}, ts)
                st.heuristic = True
            else:
                return self._candidate(key, ts, seq, rtp_ts, pt, b1, size)
        if self.t0 is None:
            self.t0 = ts
        if not size:
            self.keepalives += 1
        st.last_ts = ts
        st.add((ts - self.t0) * 1000.0, seq, rtp_ts, pt, bool(b1 & 0x80), size > 0)
        return True

    def _churning(self, flow: tuple, ts: float) -> bool:
        """Whether one more new stream on ``flow`` is past CHURN_MAX in its window (and counted
        as started if not)."""
        w = self.new_ssrcs.get(flow)
        if w is None or ts - w[0] > self.CHURN_WINDOW:  # (a time going back stays in the window)
            if len(self.new_ssrcs) >= self.MAX_MEDIA_ADDRS:
                self.new_ssrcs.clear()
            self.new_ssrcs[flow] = [ts, 1]
            return False
        if w[1] >= self.CHURN_MAX:
            return True
        w[1] += 1
        return False

    # -- heuristic streams --------------------------------------------------------------
    def _candidate(self, key, ts, seq, rtp_ts, pt, b1, size) -> bool:
        src, dst, _ = key
        if src[1] < 1024 or dst[1] < 1024:
            self._not_rtp += 1
            return False
        held = self.candidates.get(key)
        if held is None:
            if len(self.candidates) >= self.MAX_CANDIDATES:
                self._not_rtp += len(self.candidates.popitem(last=False)[1])
            held = self.candidates[key] = []
        elif len(held) >= self.MAX_HELD:
            del held[0]
            self._not_rtp += 1
        held.append((ts, seq, rtp_ts, pt, b1, size))
        # consecutive consistent packets at the end of what is held
        run = 0
        for k in range(len(held) - 1, -1, -1):
            p = held[k]
            if not self._valid_pt(p[3]):
                break
            run += 1
            if run >= self.CONFIRM_RUN:
                self._confirm(key, held)
                return True
            if k == 0:
                break
            q = held[k - 1]
            if (p[1] - q[1]) & 0xFFFF != 1 or (p[2] - q[2]) & 0xFFFFFFFF >= 0x80000000:
                break
        return True

    def _valid_pt(self, pt: int) -> bool:
        return pt in STATIC_PT or pt in self.dynamic_pts

    def _confirm(self, key, held) -> None:
        del self.candidates[key]
        st = self._new_stream(key, {}, held[0][0])
        st.heuristic = True
        if self.t0 is None:
            self.t0 = held[0][0]
        t0 = self.t0
        for ts, seq, rtp_ts, pt, b1, size in held:
            if not size:
                self.keepalives += 1
            st.last_ts = ts
            st.add((ts - t0) * 1000.0, seq, rtp_ts, pt, bool(b1 & 0x80), size > 0)

    def _new_stream(self, key, ptmap, ts, sdp: bool = False) -> RtpStream:
        if self.max_streams and len(self.streams) >= self.max_streams:
            self._evict()
        src, dst, ssrc = key
        st = self.streams[key] = RtpStream(src, dst, ssrc, ptmap)
        st.first_ts = ts
        ma = self.media_addrs
        for addr in (src, dst):
            if addr not in ma:
                if len(ma) >= self.MAX_MEDIA_ADDRS:
                    ma.popitem(last=False)
                ma[addr] = None
        mp = self.media_pairs
        pair = (src, dst) if src <= dst else (dst, src)
        if sdp and pair not in mp:
            if len(mp) >= self.MAX_MEDIA_ADDRS:
                mp.popitem(last=False)
            mp[pair] = None
        keys = self.by_ssrc.setdefault(ssrc, [])
        if len(keys) >= MAX_SSRC_KEYS:  # streams the live monitor finished are gone from self.streams
            # (and of those still there, the newest: a forger's thousands of streams with one
            # SSRC made this walk, and each RTCP block naming it, cost n a time)
            keys[:] = [k for k in keys if k in self.streams][1 - MAX_SSRC_KEYS:]
        keys.append(key)
        if len(self.by_ssrc) > 2 * max(len(self.streams), 1024):
            self.by_ssrc = {}
            for k in self.streams:
                self.by_ssrc.setdefault(k[2], []).append(k)
        return st

    def _evict(self) -> None:
        """Drop the oldest stream (first created) to make room for a new one."""
        st = self.streams.popitem(last=False)[1]
        self.evicted += 1
        if self.on_evict is not None:
            self.on_evict(st)

    # -- RTCP -----------------------------------------------------------------------------
    def _rtcp(self, data: bytes) -> bool:
        """A valid compound RTCP packet: read its SR/RR report blocks (fraction lost is x/256).
        False (nothing counted) unless every part is version 2 with an RTCP packet type
        (192-223), only the last one padded, and the lengths add up to the datagram."""
        n = len(data)
        off, parts = 0, []
        while off < n:
            if off + 4 > n:
                return False
            b0, pt, length = struct.unpack_from("!BBH", data, off)
            end = off + (length + 1) * 4
            if b0 >> 6 != 2 or not 192 <= pt <= 223 or end > n or (b0 & 0x20 and end != n):
                return False
            parts.append((off, end, b0, pt))
            off = end
        self.rtcp_packets += 1
        streams = self.streams
        for off, end, b0, pt in parts:
            if pt not in (200, 201):
                continue
            blocks = off + (28 if pt == 200 else 8)
            for i in range(b0 & 31):
                p = blocks + i * 24
                if p + 24 > end:
                    break
                src_ssrc, word, _, jit = struct.unpack_from("!IIII", data, p)
                cum = word & 0xFFFFFF
                if cum & 0x800000:
                    cum -= 0x1000000
                for k in self.by_ssrc.get(src_ssrc, ()):
                    st = streams.get(k)
                    if st is not None:
                        st.rtcp_fraction_lost = round((word >> 24) / 256.0, 4)
                        st.rtcp_cum_lost = cum
                        st.rtcp_jitter_ms = round(jit * 1000.0 / (st.clock or 8000), 3)
        return True

    def summaries(self) -> list[dict]:
        """Every stream that carried media (flows of keep-alives only are not streams)."""
        return [st.summary() for st in self.streams.values() if st.media]


def _payload_size(data: bytes, b0: int) -> int:
    """Payload bytes after the header (CSRCs, extension) and before the padding; -1 if the
    header does not fit the datagram."""
    n = len(data)
    off = 12 + (b0 & 15) * 4
    if b0 & 0x10:
        if off + 4 > n:
            return -1
        off += 4 + 4 * struct.unpack_from("!H", data, off + 2)[0]
    if off > n:
        return -1
    pad = 0
    if b0 & 0x20:
        pad = data[-1]
        if pad == 0 or off + pad > n:
            return -1
    return n - off - pad


def _is_stun(data: bytes) -> bool:
    """A STUN message (RFC 5389: type's top bits 00, magic cookie), as ICE keep-alives are."""
    return len(data) >= 20 and data[0] < 2 and data[4:8] == b"\x21\x12\xa4\x42"


__all__ = ["RtpAnalyzer", "RtpStream", "parse_sdp", "mos_from_loss", "codec_label", "CODEC_LABELS",
           "STATIC_PT"]
