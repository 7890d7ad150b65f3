"""SIP over TCP through a real sidecar, with real SIPp peers over TCP (``-t t1``: one connection,
``-t tn``: one per call) and UDP, on loopback.

Ground truth is outside sipwatch: SIPp's own call results (a call through the sidecar must do
exactly what it does direct), the sidecar's scraped counts against what SIPp sent, and dumpcap's
capture of the loopback read back by tshark (every message the sidecar sent is SIP tshark
dissects without complaint; the 4 KB INVITE's body and Identity header arrive byte for byte).
"""
from __future__ import annotations

import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from harness import HAVE_SIPP, Sidecar, Sipp, free_port, metric, run_call_pair, stop_process

pytestmark = [pytest.mark.sipp, pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp (Debian sip-tester)")]
HAVE_TSHARK = shutil.which("dumpcap") is not None and shutil.which("tshark") is not None

N = 10
# (gateway side, upstream side, SIPp -t mode of the TCP ends)
PATHS = [("tcp", "tcp", "t1"), ("udp", "tcp", "tn"), ("tcp", "udp", "tn")]
# caller and callee scenarios: plain calls, BYE from the callee, re-INVITE, CANCEL
FLOWS = [("uac_call", "uas_call"), ("uac_answer_bye", "uas_hangup"), ("uac_reinvite", "uas_reinvite"),
         ("uac_cancel", "uas_cancel")]


def _t(transport: str, mode: str) -> tuple[str, ...]:
    if transport != "tcp":
        return ()
    return ("-t", mode, "-max_socket", "1000") if mode == "tn" else ("-t", mode)


def _upstream(transport: str, port: int) -> tuple[str, ...]:
    return ("--upstream", f"{transport}:127.0.0.1:{port}")


class Dumpcap:
    """dumpcap on lo for the given ports, read back with tshark."""

    def __init__(self, path, ports):
        self.path = path
        flt = " or ".join(f"port {p}" for p in ports)
        self.proc = subprocess.Popen(["dumpcap", "-q", "-i", "lo", "-f", flt, "-w", str(path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not path.exists() or path.stat().st_size == 0:  # the header is written when ready
            assert self.proc.poll() is None and time.monotonic() < deadline, self.proc.stderr.read()
            time.sleep(0.05)

    def stop(self):
        time.sleep(0.5)
        stop_process(self.proc, signal.SIGINT)

    def fields(self, ports, display: str, *fields: str) -> list[list[str]]:
        decode = []
        for p in ports:
            decode += ["-d", f"tcp.port=={p},sip", "-d", f"udp.port=={p},sip"]
        out = subprocess.run(["tshark", "-r", str(self.path), "-n", *decode, "-Y", display, "-T", "fields",
                              "-E", "occurrence=a", "-E", "aggregator=|", *sum((["-e", f] for f in fields), [])],
                             capture_output=True, timeout=120, check=True).stdout.decode(errors="replace")
        return [ln.split("\t") for ln in out.splitlines() if ln.strip()]


def _sidecar_sent_problems(cap: Dumpcap, ports, sc_port: int) -> tuple[int, list]:
    """(SIP messages the sidecar sent, the ones tshark finds malformed or warns about)."""
    src = f"(tcp.srcport == {sc_port} || udp.srcport == {sc_port})"
    sent = cap.fields(ports, f"sip && {src}", "frame.number", "sip.Method", "sip.Status-Code")
    bad = cap.fields(ports, f"{src} && (_ws.malformed || (sip && _ws.expert.severity >= 6291456))",
                     "frame.number", "_ws.expert.message")
    n = sum(max(len(r[1].split("|")) if r[1] else 0, len(r[2].split("|")) if len(r) > 2 and r[2] else 0)
            for r in sent)
    return n, bad


@pytest.mark.parametrize("gw,up,mode", PATHS, ids=[f"{g}-to-{u}" for g, u, _ in PATHS])
def test_calls_across_transports(tmp_path, gw, up, mode):
    """Every flow, both ways, as a direct call would: SIPp's results and the sidecar's counts by
    transport. TCP->TCP runs under dumpcap and tshark checks every message the sidecar sent."""
    uas_port = free_port()
    with Sidecar(tmp_path, uas_port, *_upstream(up, uas_port)) as sc:
        cap = None
        if gw == up == "tcp" and HAVE_TSHARK:
            cap = Dumpcap(tmp_path / "tcp.pcap", [sc.port, uas_port])
        try:
            for uac, uas in FLOWS:
                uac_rc, uas_rc, caller, callee = run_call_pair(
                    tmp_path, uac, uas, sc.port, uas_port, N, rate=20,
                    uac_extra=_t(gw, mode), uas_extra=_t(up, mode), timeout=60)
                assert (uac_rc, uas_rc) == (0, 0), f"{uac}: " + caller.errors() + callee.errors()
                assert int(caller.stat()["SuccessfulCall(C)"]) == N, uac
                assert int(callee.stat()["SuccessfulCall(C)"]) == N, uas
            gwm = sc.wait_for(lambda s: metric(s, "sip_calls_processed_total") >= 4 * N)
        finally:
            if cap is not None:
                cap.stop()
    assert metric(gwm, "sip_calls_processed_total", outcome="answered") == 3 * N
    assert metric(gwm, "sip_calls_processed_total", outcome="cancelled") == N
    # re-INVITE: 2 INVITEs per call; every other flow one
    assert metric(gwm, "sip_requests_total", method="INVITE", direction="from_gateway", transport=gw) == 5 * N
    assert metric(gwm, "sip_requests_total", method="BYE", direction="from_signaling", transport=up) == N
    assert metric(gwm, "sip_requests_total", method="CANCEL", transport=gw) == N
    other = "udp" if gw == "tcp" else "tcp"
    assert metric(gwm, "sip_requests_total", direction="from_gateway", transport=other) == 0
    assert metric(gwm, "sip_parse_errors_total") == 0
    assert metric(gwm, "sip_stray_responses_total") == 0
    # one connection to each callee process (a new one per flow), reused for all its calls;
    # requests toward a TCP gateway take the gateway's own connection
    outbound = metric(gwm, "sipwatch_tcp_connections_opened_total", direction="outbound")
    assert outbound == (len(FLOWS) if up == "tcp" else 0)
    if cap is not None:
        n, bad = _sidecar_sent_problems(cap, [sc.port, uas_port], sc.port)
        # what SIPp saw: 4 flows x N calls; per call INVITE(s), ACK(s), BYE/CANCEL and answers
        assert n >= 4 * N * 6, n
        assert bad == []


@pytest.mark.skipif(not HAVE_TSHARK, reason="needs dumpcap and tshark")
def test_large_invite_from_udp_gateway_reaches_tcp_upstream_intact(tmp_path):
    """A 4 KB INVITE (STIR/SHAKEN Identity, long SDP) from a UDP gateway: too big for a UDP hop
    (RFC 3261 §18.1.1), it leaves over TCP toward the upstream, and tshark finds its Identity
    header and body on the TCP leg exactly as the caller sent them on the UDP one."""
    uas_port = free_port()
    n = 3
    with Sidecar(tmp_path, uas_port, *_upstream("tcp", uas_port)) as sc:
        cap = Dumpcap(tmp_path / "big.pcap", [sc.port, uas_port])
        try:
            uac_rc, uas_rc, caller, callee = run_call_pair(
                tmp_path, "uac_call_large", "uas_call", sc.port, uas_port, n, rate=5,
                uas_extra=("-t", "t1"))
        finally:
            cap.stop()
        assert (uac_rc, uas_rc) == (0, 0), caller.errors() + callee.errors()
        assert int(callee.stat()["SuccessfulCall(C)"]) == n
    ports = [sc.port, uas_port]
    fields = ("frame.len", "sip.Method", "sip.Identity", "sip.msg_body")
    udp_in = [r for r in cap.fields(ports, f"sip.Method == \"INVITE\" && udp.dstport == {sc.port}", *fields)]
    tcp_out = [r for r in cap.fields(ports, f"sip.Method == \"INVITE\" && tcp.dstport == {uas_port}", *fields)]
    assert len(udp_in) == n and len(tcp_out) == n
    assert all(int(r[0]) > 4000 for r in udp_in)  # the datagram really was over 4 KB
    assert sorted((r[2], r[3]) for r in udp_in) == sorted((r[2], r[3]) for r in tcp_out)
    assert all(len(r[2]) > 3000 for r in tcp_out)
    bad = cap.fields(ports, f"tcp.srcport == {sc.port} && (_ws.malformed || _ws.expert.severity >= 6291456)",
                     "frame.number", "_ws.expert.message")
    assert bad == []


class CuttableLink:
    """A TCP hop between the sidecar and sip-signaling (a load balancer or NAT on the path) whose
    sidecar-facing connection can be reset while sip-signaling's stays up, as when a middlebox
    drops a connection: the sidecar must open a new one. Whole messages only are passed on (a cut
    never leaves half a message on sip-signaling's connection); what sip-signaling sends while no
    sidecar connection is up is lost, as it would be."""

    def __init__(self, upstream_port: int):
        self.lst = socket.socket()
        self.lst.bind(("127.0.0.1", 0))
        self.lst.listen(8)
        self.port = self.lst.getsockname()[1]
        self.upstream_port = upstream_port
        self.up: socket.socket | None = None
        self.down: socket.socket | None = None
        self.accepted = 0
        self.lost = 0
        self.invites: set[bytes] = set()  # Call-IDs of the INVITEs passed on so far
        self.invites_at_cut = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.lst.accept()
            except OSError:
                return
            with self.lock:
                self.down = conn
                self.accepted += 1
                if self.up is None:
                    self.up = socket.create_connection(("127.0.0.1", self.upstream_port))
                    threading.Thread(target=self._pump_up, daemon=True).start()
            threading.Thread(target=self._pump_down, args=(conn,), daemon=True).start()

    @staticmethod
    def _messages(buf: bytearray):
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            i = head.find(b"content-length:")
            n = int(head[i + 15:].split(b"\r\n", 1)[0]) if i >= 0 else 0
            if len(buf) < end + 4 + n:
                return
            yield bytes(buf[:end + 4 + n])
            del buf[:end + 4 + n]

    def _pump_down(self, conn):  # sidecar -> sip-signaling
        buf = bytearray()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            try:
                for m in self._messages(buf):
                    if m.startswith(b"INVITE "):
                        cid = re.search(rb"(?im)^call-id:\s*(\S+)", m)
                        self.invites.add(cid.group(1) if cid else b"")
                    self.up.sendall(m)
            except OSError:  # sip-signaling went away (the end of the run)
                return

    def _pump_up(self):  # sip-signaling -> sidecar
        buf = bytearray()
        while True:
            try:
                data = self.up.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            for m in self._messages(buf):
                with self.lock:
                    down = self.down
                try:
                    if down is None:
                        raise OSError
                    down.sendall(m)
                except OSError:
                    self.lost += 1

    def cut(self):
        """Reset the sidecar-facing connection (RST, like a middlebox dropping it)."""
        with self.lock:
            down, self.down = self.down, None
            self.invites_at_cut = len(self.invites)
        down.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        down.close()

    def close(self):
        self.lst.close()
        for s in (self.up, self.down):
            if s is not None:
                s.close()


def test_upstream_connection_lost_mid_run_is_reopened(tmp_path):
    """The connection between the sidecar and sip-signaling is reset in the middle of a run of
    calls: the next message opens a new one, and no call fails but those in flight at that
    instant (the UDP caller's retransmissions recover some of them; SIPp's answers sent while no
    connection is up are lost, as they would be)."""
    uas_port = free_port()
    calls, rate = 100, 20
    callee = Sipp(tmp_path, "uas_call", uas_port, None, calls, None, "-t", "t1").start()
    time.sleep(0.3)
    link = CuttableLink(uas_port)
    try:
        with Sidecar(tmp_path, link.port, *_upstream("tcp", link.port)) as sc:
            caller = Sipp(tmp_path, "uac_call", free_port(), sc.port, calls, rate, "-recv_timeout", "5000").start()
            try:
                time.sleep(2.5)
                link.cut()
                uac_rc = caller.wait(60)
                uas_rc = callee.wait(10)
            finally:
                caller.kill()
                callee.kill()
            gwm = sc.wait_for(lambda s: metric(s, "sipwatch_tcp_connections_opened_total", direction="outbound") >= 2)
    finally:
        link.close()
    ok, failed = int(caller.stat()["SuccessfulCall(C)"]), int(caller.stat()["FailedCall(C)"])
    # the calls that failed were those in flight at the reset: SIPp numbers its calls in order
    # (Call-ID "N-pid@..."), and the cut came after the link had passed ``invites_at_cut`` INVITEs
    lost = {int(n) for n in re.findall(r"Call-Id: (\d+)-", caller.errors())}
    k = link.invites_at_cut
    assert ok + failed == calls and len(lost) == failed, (uac_rc, uas_rc, ok, failed, caller.errors()[-2000:])
    assert all(k - rate // 2 <= n <= k + rate // 2 for n in lost), (k, sorted(lost))
    assert failed <= 5 and ok > 0
    assert link.accepted == 2
    assert metric(gwm, "sipwatch_tcp_connections_opened_total", direction="outbound") == 2
    assert metric(gwm, "sipwatch_tcp_connections_closed_total", reason="error") \
        + metric(gwm, "sipwatch_tcp_connections_closed_total", reason="peer_closed") == 1


def test_idle_connections_and_a_slow_sender_do_not_stall_calls(tmp_path):
    """A thousand connections that never send, and one that sends an INVITE a byte at a time:
    TCP calls through the same sidecar pass with no failure, and the slow sender is cut off once
    its message takes longer than allowed (counted)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    uas_port = free_port()
    idle: list[socket.socket] = []
    stop = threading.Event()
    with Sidecar(tmp_path, uas_port, *_upstream("tcp", uas_port)) as sc:
        try:
            for _ in range(1000):
                s = socket.create_connection(("127.0.0.1", sc.port), timeout=5)
                idle.append(s)
            slow = socket.create_connection(("127.0.0.1", sc.port), timeout=5)
            idle.append(slow)
            invite = (b"INVITE sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKslow\r\n"
                      + b"X-Pad: " + b"p" * 2000 + b"\r\n")

            def trickle():
                for b in invite:
                    if stop.wait(0.01):
                        return
                    try:
                        slow.send(bytes([b]))
                    except OSError:
                        return

            t = threading.Thread(target=trickle, daemon=True)
            t.start()
            gwm = sc.wait_for(lambda s: metric(s, "sipwatch_tcp_connections", direction="inbound") >= 1001)
            assert metric(gwm, "sipwatch_tcp_connections", direction="inbound") >= 1001
            uac_rc, uas_rc, caller, callee = run_call_pair(
                tmp_path, "uac_call", "uas_call", sc.port, uas_port, 40, rate=20,
                uac_extra=("-t", "t1"), uas_extra=("-t", "t1"), timeout=60)
            assert (uac_rc, uas_rc) == (0, 0), caller.errors() + callee.errors()
            assert int(caller.stat()["SuccessfulCall(C)"]) == 40
            assert int(caller.stat()["FailedCall(C)"]) == 0
            gwm = sc.wait_for(lambda s: metric(s, "sipwatch_tcp_connections_closed_total", reason="slow") >= 1,
                              timeout=20)
        finally:
            stop.set()
            for s in idle:
                s.close()
    assert metric(gwm, "sipwatch_tcp_connections_closed_total", reason="slow") == 1
    assert metric(gwm, "sip_calls_processed_total", outcome="answered") == 40


def test_a_flood_of_silent_connections_does_not_close_the_ones_carrying_calls(tmp_path):
    """Once calls flow, connections opened and left silent in bursts bigger than the whole table:
    each one that needs room takes the place of another that has delivered no message yet, not of
    the caller's connection or the one toward the upstream (which were closed before, least
    recently active first, and the calls on them failed). TCP both sides, SIPp ``-t t1``: one
    connection each. (A connection that has sent nothing yet is one of the flood to the table:
    the flood starts once the caller's first message is in.)"""
    uas_port = free_port()
    table = 32
    stop = threading.Event()
    opened = [0]
    with Sidecar(tmp_path, uas_port, *_upstream("tcp", uas_port), "--tcp-max-connections", str(table)) as sc:

        def flood():
            held: list[socket.socket] = []
            while not stop.is_set() and not metric(sc.gateway(), "sipwatch_tcp_messages_received_total"):
                stop.wait(0.05)
            while not stop.is_set():
                burst = []
                for _ in range(table + 8):
                    try:
                        burst.append(socket.create_connection(("127.0.0.1", sc.port), timeout=5))
                        opened[0] += 1
                    except OSError:
                        pass
                for s in held:
                    s.close()
                held = burst
                stop.wait(0.2)
            for s in held:
                s.close()

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        try:
            uac_rc, uas_rc, caller, callee = run_call_pair(
                tmp_path, "uac_call", "uas_call", sc.port, uas_port, 60, rate=10,
                uac_extra=("-t", "t1"), uas_extra=("-t", "t1"), timeout=90)
        finally:
            stop.set()
            t.join()
        gwm = sc.wait_for(lambda s: metric(s, "sip_calls_processed_total", outcome="answered") >= 60)
    assert opened[0] > 4 * table  # the flood ran for the calls' time
    assert (uac_rc, uas_rc) == (0, 0), caller.errors() + callee.errors()
    assert int(caller.stat()["SuccessfulCall(C)"]) == 60
    assert int(caller.stat()["FailedCall(C)"]) == 0
    assert metric(gwm, "sip_calls_processed_total", outcome="answered") == 60
    assert metric(gwm, "sipwatch_tcp_connections_closed_total", reason="limit") > 0
