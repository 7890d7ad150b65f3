"""``sipwatch replay`` fed a hostile capture (a customer's pcap): nothing in it may make the sidecar
send anywhere but the replayer's own sockets, let a stray sender take over a side, hang the
replay, or end it in a traceback; IPv6 literals are written in brackets.

Real sockets on loopback, a real ``sipwatch proxy`` where the sidecar's routing is the point; no
wall-clock thresholds (a subprocess timeout only stops a hung replay)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

import capture.replay as rp
from harness import ROOT, Sidecar, free_port
from pcapbuild import eth, ipv4, pcap, sip_invite, sip_response, udp

GW_IP, SIG_IP = "10.0.0.1", "10.0.0.2"
NO_DRAIN = ("--drain-timeout", "0")  # these captures leave calls open: stop the sidecar at once
# runs main() of the module under test (by file: the one this process imported)
RUNNER = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('capture.replay', sys.argv[1]);"
          " m = importlib.util.module_from_spec(spec); sys.modules['capture.replay'] = m;"
          " spec.loader.exec_module(m); sys.exit(m.main(sys.argv[2:]))")


def frame(src: str, dst: str, payload: bytes) -> bytes:
    return eth(ipv4(src, dst, 17, udp(5060, 5060, payload)))


def sig_request(method: bytes, uri: bytes, call_id: bytes, cseq: int, to_tag: bytes | None = None,
                extra: bytes = b"") -> bytes:
    """A request from the signaling side (10.0.0.2) to the gateway (10.0.0.1)."""
    to = b"To: <sip:+4930123456@10.0.0.1>" + (b";tag=" + to_tag if to_tag else b"")
    return (method + b" " + uri + b" SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKs" + call_id
            + b"%d\r\nFrom: <sip:+4940987654@10.0.0.2>;tag=s1\r\n" % cseq + to + b"\r\nCall-ID: " + call_id
            + b"\r\nCSeq: %d %s\r\n" % (cseq, method) + extra + b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")


def write_pcap(path, frames) -> str:
    path.write_bytes(pcap(1, frames))
    return str(path)


def replay_in_process(conv, sidecar: Sidecar, upstream: int, **kw) -> rp.Replayer:
    r = rp.Replayer(conv, ("127.0.0.1", sidecar.port), ("127.0.0.1", upstream), grace=kw.pop("grace", 0.5), **kw)
    try:
        r.run()
    finally:
        r.close()
    return r


def drained(sock: socket.socket) -> list[bytes]:
    """Whatever is queued on ``sock`` now."""
    sock.setblocking(False)
    got = []
    while True:
        try:
            got.append(sock.recv(65535))
        except BlockingIOError:
            return got


def run_main(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, rp.__file__, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def udp_sock(addr=("127.0.0.1", 0), family=socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(addr)
    return s


# -- 1. the capture cannot redirect the sidecar ---------------------------------------------------

def test_signaling_requests_reach_only_the_gateway_socket(tmp_path):
    """A signaling-side OPTIONS whose Request-URI names another local port, and an in-dialog BYE
    whose learned route set names one (from a Record-Route recorded in the gateway's INVITE):
    the sidecar (which allows the replay host's IP on any port) must send both to the replayer's
    gateway socket, never to the port the capture names."""
    sink = udp_sock()
    sink_port = sink.getsockname()[1]
    invite = sip_invite("c1", "z9hG4bK1", extra=f"Record-Route: <sip:127.0.0.1:{sink_port};lr>\r\n")
    ok = sip_response(invite, 200, "OK")
    path = write_pcap(tmp_path / "redirect.pcap", [
        (0.0, frame(GW_IP, SIG_IP, invite)),
        (0.05, frame(SIG_IP, GW_IP, ok)),
        (0.1, frame(SIG_IP, GW_IP, sig_request(b"OPTIONS", b"sip:x@127.0.0.1:%d" % sink_port, b"o1", 1))),
        (0.2, frame(SIG_IP, GW_IP, sig_request(b"OPTIONS", b"sip:x@10.0.0.1:5060;maddr=127.0.0.1", b"o2", 1))),
        (0.3, frame(SIG_IP, GW_IP, sig_request(b"BYE", b"sip:alice@10.0.0.1:5060", b"c1", 2, b"b1"))),
    ])
    conv = rp.load(path)
    upstream = free_port()
    try:
        with Sidecar(tmp_path, upstream, *NO_DRAIN) as sc:
            r = replay_in_process(conv, sc, upstream, speed=1.0)
        leaked = drained(sink)
    finally:
        sink.close()
    assert leaked == []
    for rec in conv.recs[2:]:
        assert rec.arrived_at is not None, rec.key  # at the gateway socket, through the sidecar
    assert r.summary()["missing"] == []


def test_readdress_rewrites_any_host_and_drops_maddr(tmp_path):
    path = write_pcap(tmp_path / "c.pcap", [(0.0, frame(GW_IP, SIG_IP, sip_invite("c1", "z9hG4bK1")))])
    r = rp.Replayer(rp.load(path), ("127.0.0.1", free_port()), ("127.0.0.1", free_port()))
    try:
        own = b"127.0.0.1:%d" % r.addr[rp.GW][1]
        for uri in (b"sip:x@127.0.0.1:5099", b"sip:x@10.0.0.1", b"sips:x@192.0.2.7:5061;transport=tcp",
                    b"sip:x@10.0.0.1:5060;maddr=127.0.0.1;user=phone", b"sip:x@\xff\xfe", b"tel:+123"):
            out = r._readdress(uri)
            host, port, params = rp.uri_hostport(out)
            assert b"%s:%d" % (host, port) == own, (uri, out)
            assert b"maddr" not in params and b"transport" not in params, (uri, out)
    finally:
        r.close()


# -- 2. only the sidecar is listened to -----------------------------------------------------------

def test_stray_datagram_does_not_take_over_the_signaling_side(tmp_path):
    """A datagram from another local port reaches the signaling socket between the INVITE (from
    the sidecar) and the signaling side's next request: it is ignored, and that request still
    goes to the sidecar, not to the stray sender."""
    invite = sip_invite("c1", "z9hG4bK1")
    path = write_pcap(tmp_path / "inject.pcap", [
        (0.0, frame(GW_IP, SIG_IP, invite)),
        (0.2, frame(SIG_IP, GW_IP, sig_request(b"OPTIONS", b"sip:x@10.0.0.1", b"c1", 2))),
    ])
    conv = rp.load(path)
    upstream = free_port()
    attacker = udp_sock()
    try:
        with Sidecar(tmp_path, upstream, *NO_DRAIN) as sc:
            r = rp.Replayer(conv, ("127.0.0.1", sc.port), ("127.0.0.1", upstream), grace=0.5)
            take = r.on_datagram

            def on_datagram(side, data, src, now, *more):
                took = take(side, data, src, now, *more)
                if side == rp.SIG and data.startswith(b"INVITE"):
                    # queued now, while the loop drains the socket: read before the OPTIONS
                    # (due 0.2 s after this INVITE) can leave, whatever the machine's load
                    attacker.sendto(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP x;branch=z9hG4bKq\r\n"
                                    b"Call-ID: zz\r\nCSeq: 9 FOO\r\nFrom: <sip:a@b>;tag=1\r\n"
                                    b"To: <sip:a@b>\r\nContent-Length: 0\r\n\r\n", ("127.0.0.1", upstream))
                return took

            r.on_datagram = on_datagram
            try:
                r.run()
            finally:
                r.close()
        got = drained(attacker)
    finally:
        attacker.close()
    assert got == []
    s = r.summary()
    assert s["ignored"] == {"gateway": 0, "signaling": 1}
    assert s["missing"] == []  # the OPTIONS went through the sidecar to the gateway socket


def test_tcp_connection_from_another_host_is_not_accepted(tmp_path):
    """Over TCP the signaling side accepts only the sidecar's connections (its IP): a connection
    from 127.0.0.2 carrying the very INVITE the recording expects is closed, counted as ignored,
    and never becomes the side's connection."""
    invite = sip_invite("c1", "z9hG4bK1", transport="TCP")
    path = write_pcap(tmp_path / "c.pcap", [(0.0, frame(GW_IP, SIG_IP, invite))])
    sidecar = socket.create_server(("127.0.0.1", 0))  # stands in for the sidecar: forwards nothing
    bind = ("127.0.0.1", free_port())
    r = rp.Replayer(rp.load(path), sidecar.getsockname()[:2], bind, grace=0.3, transport="tcp")
    stranger = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        stranger.bind(("127.0.0.2", 0))
        stranger.connect(bind)  # queued in the listener's backlog before the replay starts
        stranger.sendall(invite)
        r.run()
        assert r.conv.recs[0].arrived_at is None
        assert r.conn[rp.SIG] is None
        assert r.summary()["ignored"] == {"gateway": 0, "signaling": 1}
    finally:
        r.close()
        stranger.close()
        sidecar.close()


def test_requests_seen_is_bounded_and_strangers_teach_nothing(tmp_path):
    path = write_pcap(tmp_path / "c.pcap", [(0.0, frame(GW_IP, SIG_IP, sip_invite("c1", "z9hG4bK1")))])
    to = ("127.0.0.1", free_port())
    r = rp.Replayer(rp.load(path), to, ("127.0.0.1", free_port()))
    try:
        for n in range(2000):  # from the sidecar's address, but nothing the recording expects
            r.on_datagram(rp.SIG, sig_request(b"OPTIONS", b"sip:x@h", b"f%d" % n, n + 1), to, 0.0)
        stranger = ("127.0.0.1", to[1] + 1)
        r.on_datagram(rp.SIG, sip_invite("c1", "z9hG4bK1"), stranger, 0.0)
        assert len(r.requests_seen[rp.SIG]) == 0
        assert r.reply_to == [to, to]
        assert r.conv.recs[0].arrived_at is None  # the stranger's copy of the expected INVITE
    finally:
        r.close()


# -- 3. no hang, no nonsense timing flags ----------------------------------------------------------

def hang_pcap(tmp_path) -> str:
    return write_pcap(tmp_path / "hang.pcap", [(0.0, frame(GW_IP, SIG_IP, sip_invite("c1", "z9hG4bK1"))),
                                               (4294967295.0, frame(GW_IP, SIG_IP, sip_invite("c2", "z9hG4bK2")))])


def test_gap_of_136_years_is_compressed(tmp_path):
    path = hang_pcap(tmp_path)
    conv = rp.load(path)
    assert conv.recs[1].t - conv.recs[0].t == rp.MAX_GAP  # the documented default bound
    dummy = udp_sock()  # stands in for the sidecar: takes the datagrams, forwards nothing
    try:
        p = run_main(path, "--to", "127.0.0.1:%d" % dummy.getsockname()[1], "--bind", f"127.0.0.1:{free_port()}",
                     "--max-gap", "0.2", "--grace", "0.2", "--json")
    finally:
        dummy.close()
    assert p.returncode == 1, p.stderr  # both sent, neither came back
    s = json.loads(p.stdout)
    assert s["sent"] == {"gateway": 2, "signaling": 0}


@pytest.mark.parametrize("flag,value", [("--speed", "nan"), ("--speed", "inf"), ("--speed", "0"), ("--speed", "-1"),
                                        ("--grace", "nan"), ("--grace", "inf"), ("--max-gap", "nan")])
def test_non_finite_timing_flags_are_usage_errors(tmp_path, flag, value):
    p = run_main(str(ROOT / "pcaps" / "options_keepalive.pcap"), "--to", f"127.0.0.1:{free_port()}",
                 "--bind", f"127.0.0.1:{free_port()}", "--grace", "0.1", flag, value, timeout=30)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("sipwatch replay: error:"), p.stderr
    assert flag in p.stderr


# -- 4. no tracebacks ---------------------------------------------------------------------------------

def test_non_utf8_request_uri_host_is_replayed(tmp_path):
    invite = sip_invite("c1", "z9hG4bK1")
    path = write_pcap(tmp_path / "nonutf8uri.pcap", [
        (0.0, frame(GW_IP, SIG_IP, invite)),
        (0.05, frame(SIG_IP, GW_IP, sip_response(invite, 200, "OK"))),
        (0.1, frame(SIG_IP, GW_IP, sig_request(b"BYE", b"sip:x@\xff\xfe", b"c1", 2, b"b1"))),
    ])
    conv = rp.load(path)
    upstream = free_port()
    with Sidecar(tmp_path, upstream, *NO_DRAIN) as sc:
        r = replay_in_process(conv, sc, upstream, speed=1.0)
    assert r.summary()["missing"] == []


def test_gateway_not_in_capture_is_a_usage_error():
    p = run_main(str(ROOT / "pcaps" / "options_keepalive.pcap"), "--to", f"127.0.0.1:{free_port()}",
                 "--bind", f"127.0.0.1:{free_port()}", "--gateway", "1.2.3.4:5060", timeout=30)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("sipwatch replay: error:"), p.stderr
    assert "1.2.3.4" in p.stderr


# -- 5. IPv6 --------------------------------------------------------------------------------------------

def _have_ipv6_loopback() -> bool:
    try:
        udp_sock(("::1", 0), socket.AF_INET6).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _have_ipv6_loopback(), reason="no ::1")
def test_ipv6_literals_are_bracketed(tmp_path):
    invite = sip_invite("c1", "z9hG4bK1")
    path = write_pcap(tmp_path / "v6.pcap", [
        (0.0, frame(GW_IP, SIG_IP, invite)),
        (0.1, frame(SIG_IP, GW_IP, sig_request(b"OPTIONS", b"sip:x@10.0.0.1:5060", b"o1", 1))),
    ])
    conv = rp.load(path)
    dummy = udp_sock(("::1", 0), socket.AF_INET6)
    r = rp.Replayer(conv, ("::1", dummy.getsockname()[1]), ("::1", 0))
    try:
        gw_port = r.addr[rp.GW][1]
        via = [ln for ln in r.build(conv.recs[0]).split(b"\r\n") if ln.lower().startswith(b"via:")]
        assert via == [b"Via: SIP/2.0/UDP [::1]:%d;branch=z9hG4bK1;rport" % gw_port]
        start, *lines = r.build(conv.recs[1]).split(b"\r\n")
        assert start == b"OPTIONS sip:x@[::1]:%d SIP/2.0" % gw_port
        via = [ln for ln in lines if ln.lower().startswith(b"via:")]
        assert via[0].startswith(b"Via: SIP/2.0/UDP [::1]:%d;" % r.addr[rp.SIG][1])
    finally:
        r.close()
        dummy.close()


@pytest.mark.skipif(not _have_ipv6_loopback(), reason="no ::1")
def test_ipv6_replay_through_the_sidecar(tmp_path):
    """callee_bye (the signaling side sends in-dialog BYEs) replayed over ::1 through a sidecar
    listening on [::1]: every message must get through (unbracketed Vias and URIs did not)."""
    upstream = free_port()
    sc = Sidecar(tmp_path, upstream, *NO_DRAIN)
    v4 = {f"127.0.0.1:{sc.port}": f"[::1]:{sc.port}", f"127.0.0.1:{upstream}": f"[::1]:{upstream}"}
    sc.args = [v4.get(a, a) for a in sc.args]  # (its metrics stay on 127.0.0.1, where the harness reads them)
    conv = rp.load(str(ROOT / "pcaps" / "callee_bye.pcap"))
    with sc:
        r = rp.Replayer(conv, ("::1", sc.port), ("::1", upstream), speed=5.0, grace=1.0)
        try:
            r.run()
        finally:
            r.close()
    s = r.summary()
    assert s["missing"] == []
    assert s["unexpected"] == {"gateway": 0, "signaling": 0}
