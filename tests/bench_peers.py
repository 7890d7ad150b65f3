"""Helper processes for the benchmark, run as ``python bench_peers.py MODE ...``:

``relay``      the baseline proxy: a bare uvloop UDP relay with the sidecar's socket layout (an
               unconnected listen socket for the gateway side, a second socket on the same
               address connected to the upstream, 4 MiB buffers). It parses nothing: datagrams
               from the gateway side go to the upstream, datagrams from the upstream go to the
               last gateway-side address seen. With ``--per-source`` it keeps one upstream socket
               (ephemeral port) per gateway-side source instead, so several clients can share it
               (still no SIP parsing): the latency probe next to a SIPp load.
``responder``  a tiny SIP UAS for the latency probe: answers every request with 200 OK to the
               datagram's source address (Via, From, To, Call-ID and CSeq echoed).
``split``      the upstream of a proxy under load while the latency probe runs through it: the
               probe's OPTIONS (Call-ID ``probe-...``) are answered on the spot like ``responder``;
               every other datagram from the proxy goes on to ``--upstream`` (the SIPp callee), and
               what the callee sends back goes to the proxy address that last sent something else.
``otlp``       a local OTLP/HTTP trace collector in its own process (so its CPU is charged to no
               proxy): decodes every ``POST /v1/traces`` and counts requests, spans and bytes;
               ``GET /stats`` answers those counts as JSON.

All print ``ready`` once bound and run until SIGTERM/SIGINT.
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


class _PerSourceFront(asyncio.DatagramProtocol):
    """--per-source: one connected upstream socket per gateway-side source address."""

    def __init__(self, relay: _Relay, upstream: tuple[str, int], host: str):
        self.relay, self.upstream, self.host = relay, upstream, host
        self.back: dict = {}

    def datagram_received(self, data, addr):
        tx = self.back.get(addr)
        if tx is None:
            if len(self.back) >= 64:
                return
            s = _sock(False)
            s.bind((self.host, 0))
            s.connect(self.upstream)
            loop = asyncio.get_running_loop()
            tx = self.back[addr] = _PerSourceBack(self.relay, addr)
            loop.create_task(loop.create_datagram_endpoint(lambda: tx, sock=s))
            tx.pending.append(data)
            return
        tx.send(data)
        self.relay.forwarded += 1

    def error_received(self, exc):
        pass


class _PerSourceBack(asyncio.DatagramProtocol):
    def __init__(self, relay: _Relay, client):
        self.relay, self.client = relay, client
        self.transport = None
        self.pending: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport
        for d in self.pending:
            transport.sendto(d)
        self.pending.clear()

    def send(self, data):
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.sendto(data)

    def datagram_received(self, data, addr):
        self.relay.listen_tx.sendto(data, self.client)
        self.relay.forwarded += 1

    def error_received(self, exc):
        pass


async def relay_per_source_main(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    relay = _Relay()
    ls = _sock(False)
    ls.bind(listen)
    relay.listen_tx, _ = await loop.create_datagram_endpoint(
        lambda: _PerSourceFront(relay, upstream, listen[0]), sock=ls)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    relay.listen_tx.close()


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


class _Split:
    def __init__(self):
        self.proxy = None
        self.front_tx = None
        self.back_tx = None


class _SplitFront(asyncio.DatagramProtocol):
    """Datagrams from the proxy under test."""

    def __init__(self, split: _Split):
        self.split = split

    def datagram_received(self, data, addr):
        sp = self.split
        if b"Call-ID: probe-" in data:
            resp = answer(data)
            if resp is not None:
                sp.front_tx.sendto(resp, addr)
            return
        sp.proxy = addr
        sp.back_tx.sendto(data)

    def error_received(self, exc):
        pass


class _SplitBack(asyncio.DatagramProtocol):
    """Datagrams from the SIPp callee."""

    def __init__(self, split: _Split):
        self.split = split

    def datagram_received(self, data, addr):
        sp = self.split
        if sp.proxy is not None:
            sp.front_tx.sendto(data, sp.proxy)

    def error_received(self, exc):
        pass


async def split_main(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    sp = _Split()
    fs = _sock(False)
    fs.bind(listen)
    bs = _sock(False)
    bs.bind((listen[0], 0))
    bs.connect(upstream)
    sp.front_tx, _ = await loop.create_datagram_endpoint(lambda: _SplitFront(sp), sock=fs)
    sp.back_tx, _ = await loop.create_datagram_endpoint(lambda: _SplitBack(sp), sock=bs)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    sp.front_tx.close()
    sp.back_tx.close()


def otlp_main(listen: tuple[str, int]) -> None:
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    )
    lock = threading.Lock()
    counts = {"requests": 0, "spans": 0, "bytes": 0, "bad_requests": 0}
    ok_body = ExportTraceServiceResponse().SerializeToString()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            try:
                n = int(self.headers.get("Content-Length", 0))
            except ValueError:
                n = -1
            if not 0 <= n <= 64 << 20:
                with lock:
                    counts["bad_requests"] += 1
                self._reply(400, "text/plain", b"bad length")
                self.close_connection = True
                return
            body = self.rfile.read(n)
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                import gzip
                body = gzip.decompress(body)
            req = ExportTraceServiceRequest()
            try:
                req.ParseFromString(body)
            except Exception:
                with lock:
                    counts["bad_requests"] += 1
                self._reply(400, "text/plain", b"not an ExportTraceServiceRequest")
                return
            spans = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            with lock:
                counts["requests"] += 1
                counts["spans"] += spans
                counts["bytes"] += n
            self._reply(200, "application/x-protobuf", ok_body)

        def do_GET(self):
            with lock:
                body = json.dumps(counts).encode()
            self._reply(200, "application/json", body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(listen, Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()


def _hostport(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_peers")
    p.add_argument("mode", choices=("relay", "responder", "split", "otlp"))
    p.add_argument("--listen", required=True, type=_hostport)
    p.add_argument("--upstream", type=_hostport)
    p.add_argument("--asyncio", action="store_true", help="relay on the stock asyncio loop")
    p.add_argument("--per-source", action="store_true", help="relay: one upstream socket per source")
    a = p.parse_args(argv)
    if a.mode in ("responder", "otlp"):
        try:
            (responder_main if a.mode == "responder" else otlp_main)(a.listen)
        except KeyboardInterrupt:
            pass
        return 0
    if a.mode == "split":
        import uvloop
        uvloop.run(split_main(a.listen, a.upstream))
        return 0
    main_fn = relay_per_source_main if a.per_source else relay_main
    if a.asyncio:
        asyncio.run(main_fn(a.listen, a.upstream))
    else:
        import uvloop
        uvloop.run(main_fn(a.listen, a.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
