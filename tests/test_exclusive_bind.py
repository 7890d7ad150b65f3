"""One sidecar per address. Its sockets share their port with SO_REUSEPORT (the two UDP
sockets, TCP connections from the listen port), and so would have let a second sidecar started on
the same address, or any program of the same user, bind it too: the kernel then handed that one
every new request, and the answers to requests the first had forwarded (strays there under
another key: the gateway got none of them). A sidecar now refuses to start where another socket
holds its address, and the one already there keeps forwarding."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from harness import Sidecar, free_port, sipwatch_path

OPTIONS = (b"OPTIONS sip:svc@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK-x%d\r\n"
           b"From: <sip:gw@127.0.0.1>;tag=1\r\nTo: <sip:svc@127.0.0.1>\r\nCall-ID: excl-%d\r\n"
           b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")


def _start(listen_port: int, upstream_port: int, *extra: str) -> subprocess.CompletedProcess:
    """A sidecar that should not start: its exit and output (a timeout fails the test)."""
    args = [sys.executable, "-m", "sipwatch", "proxy", "--listen", f"127.0.0.1:{listen_port}",
            "--upstream", f"127.0.0.1:{upstream_port}", "--gateway-metrics", f"127.0.0.1:{free_port()}",
            "--signaling-metrics", f"127.0.0.1:{free_port()}", "--no-tracing", *extra]
    return subprocess.run(args, capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": sipwatch_path()})


def _round_trip(port: int, upstream: socket.socket, n: int) -> bool:
    """An OPTIONS through the sidecar on ``port``, answered by ``upstream``: True if the
    answer came back."""
    gw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gw.bind(("127.0.0.1", 0))
    gw.settimeout(5)
    try:
        gw.sendto(OPTIONS % (gw.getsockname()[1], n, n), ("127.0.0.1", port))
        req, src = upstream.recvfrom(65535)
        head, _, _ = req.partition(b"\r\n\r\n")
        lines = [ln for ln in head.split(b"\r\n")[1:]
                 if ln.split(b":", 1)[0].lower() in (b"via", b"from", b"to", b"call-id", b"cseq")]
        upstream.sendto(b"SIP/2.0 200 OK\r\n" + b"\r\n".join(lines) + b"\r\nContent-Length: 0\r\n\r\n", src)
        resp, _ = gw.recvfrom(65535)
        return resp.startswith(b"SIP/2.0 200")
    except socket.timeout:
        return False
    finally:
        gw.close()


def test_a_second_sidecar_on_the_same_address_does_not_start_and_the_first_keeps_forwarding(tmp_path):
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    upstream.settimeout(5)
    with Sidecar(tmp_path, upstream.getsockname()[1], "--no-tracing") as first:
        assert _round_trip(first.port, upstream, 1)
        second = _start(first.port, upstream.getsockname()[1])
        assert second.returncode != 0
        assert b"in use" in second.stdout + second.stderr, second.stdout[-600:]
        for n in range(2, 12):  # every request still reaches the first one, and its answer comes back
            assert _round_trip(first.port, upstream, n), n
    upstream.close()


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
def test_a_sidecar_does_not_share_its_address_with_another_programs_reuseport_socket(kind):
    """Any program of the same user could bind the port with SO_REUSEPORT and take a share of
    the datagrams or connections."""
    squatter = socket.socket(socket.AF_INET, kind)
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    squatter.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        squatter.listen(8)
    port = squatter.getsockname()[1]
    try:
        got = _start(port, free_port())
        assert got.returncode != 0
        assert b"in use" in got.stdout + got.stderr, got.stdout[-600:]
    finally:
        squatter.close()
