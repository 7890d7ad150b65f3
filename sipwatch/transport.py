"""The UDP edge: an asyncio DatagramProtocol that feeds the sans-IO core and sends its output.

Thin on purpose: one ``receive_datagram`` call and a ``sendto`` per output. Send failures
(an ICMP port unreachable from a dead upstream arrives as ``error_received``) are counted, never
raised. Next hops given as host names are resolved off the hot path and cached.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

from .core import ProxyCore

RESOLVE_TTL = 60.0
MAX_PENDING_RESOLVES = 1000


def epoch_clock():
    """time.time()-based seconds that never step: monotonic plus the offset at start."""
    offset = time.time() - time.monotonic()
    mono = time.monotonic
    return lambda: mono() + offset


class ProxyProtocol(asyncio.DatagramProtocol):
    def __init__(self, core: ProxyCore, clock):
        self.core = core
        self.stats = core.stats
        self.clock = clock
        self.transport: asyncio.DatagramTransport | None = None
        self._literal: dict[str, bool] = {}
        self._resolved: dict[str, tuple[str, float]] = {}
        self._pending = 0
        self.last_error: str | None = None

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            except OSError:
                pass

    def datagram_received(self, data: bytes, addr) -> None:
        out = self.core.receive_datagram(data, (addr[0], addr[1]), self.clock())
        sendto = self.transport.sendto
        for payload, (host, port) in out:
            literal = self._literal.get(host)
            if literal is None:
                literal = self._is_literal(host)
            if literal:
                try:
                    sendto(payload, (host, port))
                except OSError as exc:
                    self._send_failed(exc)
            else:
                self._send_by_name(payload, host, port)

    def error_received(self, exc: Exception) -> None:
        self._send_failed(exc)

    def _send_failed(self, exc: Exception) -> None:
        self.stats.send_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _is_literal(self, host: str) -> bool:
        try:
            ipaddress.ip_address(host)
            ok = True
        except ValueError:
            ok = False
        if len(self._literal) > 10_000:
            self._literal.clear()
        self._literal[host] = ok
        return ok

    def _send_by_name(self, payload: bytes, host: str, port: int) -> None:
        hit = self._resolved.get(host)
        if hit is not None and hit[1] > self.clock():
            try:
                self.transport.sendto(payload, (hit[0], port))
            except OSError as exc:
                self._send_failed(exc)
            return
        if self._pending >= MAX_PENDING_RESOLVES:
            self._send_failed(OSError(f"too many pending name lookups, dropped datagram to {host}"))
            return
        self._pending += 1
        asyncio.get_running_loop().create_task(self._resolve_and_send(payload, host, port))

    async def _resolve_and_send(self, payload: bytes, host: str, port: int) -> None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            ip = infos[0][4][0]
            self._resolved[host] = (ip, self.clock() + RESOLVE_TTL)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.sendto(payload, (ip, port))
        except (OSError, IndexError) as exc:
            self._send_failed(exc)
        finally:
            self._pending -= 1
