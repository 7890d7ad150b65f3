"""Helper processes for the benchmark, run as ``python bench_peers.py MODE ...``:

``relay``      the baseline proxy: a bare uvloop UDP relay with the sidecar's socket layout (an
               unconnected listen socket for the gateway side, a second socket on the same
               address connected to the upstream, 4 MiB buffers). It parses nothing: datagrams
               from the gateway side go to the upstream, datagrams from the upstream go to the
               last gateway-side address seen.
``responder``  a tiny SIP UAS for the latency probe: answers every request with 200 OK to the
               datagram's source address (Via, From, To, Call-ID and CSeq echoed).

Both print ``ready`` once bound and run until SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

BUF = 4 << 20


def _sock(reuse: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if reuse:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, BUF)
        except OSError:
            pass
    s.setblocking(False)
    return s


class _Relay:
    def __init__(self):
        self.gateway = None
        self.listen_tx = None
        self.upstream_tx = None
        self.forwarded = 0


class _FromGateway(asyncio.DatagramProtocol):
    def __init__(self, relay: _Relay):
        self.relay = relay

    def datagram_received(self, data, addr):
        r = self.relay
        r.gateway = addr
        r.upstream_tx.sendto(data)
        r.forwarded += 1

    def error_received(self, exc):
        pass


class _FromUpstream(asyncio.DatagramProtocol):
    def __init__(self, relay: _Relay):
        self.relay = relay

    def datagram_received(self, data, addr):
        r = self.relay
        if r.gateway is not None:
            r.listen_tx.sendto(data, r.gateway)
            r.forwarded += 1

    def error_received(self, exc):
        pass


async def relay_main(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    relay = _Relay()
    ls = _sock(True)
    ls.bind(listen)
    us = _sock(True)
    us.bind(ls.getsockname())
    us.connect(upstream)
    relay.listen_tx, _ = await loop.create_datagram_endpoint(lambda: _FromGateway(relay), sock=ls)
    relay.upstream_tx, _ = await loop.create_datagram_endpoint(lambda: _FromUpstream(relay), sock=us)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    relay.listen_tx.close()
    relay.upstream_tx.close()
    print(f"forwarded {relay.forwarded}", flush=True)


_ECHO = (b"via:", b"from:", b"f:", b"to:", b"t:", b"call-id:", b"i:", b"cseq:", b"v:")


def answer(request: bytes) -> bytes | None:
    """200 OK for a SIP request, or None for a response/garbage."""
    head = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    if not head or head[0].startswith(b"SIP/2.0"):
        return None
    out = [b"SIP/2.0 200 OK"]
    for line in head[1:]:
        low = line[:9].lower()
        if low.startswith(_ECHO):
            if low.startswith((b"to:", b"t:")) and b"tag=" not in line:
                line += b";tag=resp1"
            out.append(line)
    out.append(b"Content-Length: 0")
    return b"\r\n".join(out) + b"\r\n\r\n"


def responder_main(listen: tuple[str, int]) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(listen)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    recv, send = s.recvfrom, s.sendto
    while True:
        data, addr = recv(65535)
        resp = answer(data)
        if resp is not None:
            send(resp, addr)


def _hostport(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_peers")
    p.add_argument("mode", choices=("relay", "responder"))
    p.add_argument("--listen", required=True, type=_hostport)
    p.add_argument("--upstream", type=_hostport)
    p.add_argument("--asyncio", action="store_true", help="relay on the stock asyncio loop")
    a = p.parse_args(argv)
    if a.mode == "responder":
        try:
            responder_main(a.listen)
        except KeyboardInterrupt:
            pass
        return 0
    if a.asyncio:
        asyncio.run(relay_main(a.listen, a.upstream))
    else:
        import uvloop
        uvloop.run(relay_main(a.listen, a.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
