"""Command-line and environment configuration for ``sipwatch proxy``.

Every flag ``--some-flag`` can also be set as ``SIPWATCH_SOME_FLAG`` (container convention);
a flag on the command line wins over the environment. Tracing also honours the standard
``OTEL_*`` variables. A bad value ends the program with one message naming it, exit code 2.
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import socket
from dataclasses import dataclass, field

from .correlation import DEFAULT as DEFAULT_CORRELATION, parse_kinds
from .hep_sender import EndpointError, add_hep_arguments, hep_options
from .masking import CALL_ID_MODES, MODES as MASK_MODES, CallIdMasker, default_call_id_mode

Addr = tuple[str, int]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the flag/variable and the value."""


def parse_hostport(text: str, what: str, default_port: int | None = None) -> Addr:
    t = text.strip()
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif t.count(":") == 1:
        host, port_s = t.split(":")
    elif t.count(":") > 1:  # bare IPv6 without port
        host, port_s = t, ""
    else:
        host, port_s = t, ""
    if not host:
        raise ConfigError(f"{what}: {text!r} has no host (expected HOST:PORT)")
    if not port_s:
        if default_port is None:
            raise ConfigError(f"{what}: {text!r} has no port (expected HOST:PORT)")
        return host, default_port
    if not (port_s.isascii() and port_s.isdigit()) or not 0 < int(port_s) < 65536:
        raise ConfigError(f"{what}: port {port_s!r} in {text!r} is not 1-65535")
    return host, int(port_s)


def resolve_ip(host: str, what: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if len(host) > 253 or any(not 0 < len(label) < 64 for label in host.rstrip(".").split(".")):
        raise ConfigError(f"{what}: {host[:80]!r} is not a host name (labels of 1-63 characters, "
                          "at most 253 in all)")
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][4][0]
    except (OSError, IndexError, UnicodeError) as exc:
        raise ConfigError(f"{what}: cannot resolve host {host!r} ({exc})") from None


def default_advertise(listen: Addr) -> Addr:
    """Our address for Via/Record-Route: the listen address, or this host's IP for a wildcard."""
    host, port = listen
    if host not in ("0.0.0.0", "::", ""):
        return host, port
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, only a route lookup
            return s.getsockname()[0], port
    except OSError:
        return socket.gethostbyname(socket.gethostname()), port


@dataclass
class ProxySettings:
    listen: Addr
    upstream: Addr
    advertise: Addr
    gateway_metrics: Addr | None
    signaling_metrics: Addr | None
    trace_header: str
    record_route: bool
    mask_numbers: str
    timer_b: float
    max_transactions: int
    max_calls: int
    max_call_duration: float
    service_name: str
    log_level: str
    tracing: bool
    otlp_endpoint: str | None
    otlp_protocol: str | None
    sample_ratio: float | None
    spans_file: str | None
    # requests from signaling may also go to these networks (ipaddress.ip_network objects)
    allow_next_hop: tuple = ()
    # key for the MACs in Via branch / Record-Route and the Call-ID hash; b"": random per process
    secret: bytes = field(default=b"", repr=False)
    drain_timeout: float = 25.0
    timer_c: float = 180.0
    mask_call_id: str = "digits"
    # HEP output (sipwatch.hep_sender): ("udp"|"tcp", (ip, port)) or None
    hep_endpoint: tuple | None = None
    hep_capture_id: int = 0
    hep_auth_key: bytes = field(default=b"", repr=False)
    hep_node_name: bytes = b""
    hep_log: bool = False
    # SIP over TCP (sipwatch.tcp): how sip-signaling is reached ("udp", "tcp", or "udp+tcp":
    # UDP, and TCP for requests over 1300 bytes), and the listen address's TCP side
    upstream_transport: str = "udp"
    tcp: bool = True
    tcp_max_connections: int = 4096
    tcp_idle_timeout: float = 300.0
    # B2BUA leg correlation headers (sipwatch.correlation), comma-separated
    correlation_headers: str = DEFAULT_CORRELATION
    # seconds the receive queue must stay above its high-water mark before new dialogs get 503
    overload_after: float = 0.05
    # pymalloc's arenas on transparent huge pages, in the proxy and its span worker (sipwatch.heap)
    huge_heap: bool = True
    # a file whose modification time the loop sets every second (a liveness probe that does not
    # queue behind the metrics ports' connections: `sipwatch alive`); "" for none
    alive_file: str = ""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _env_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{name}: {value!r} is not a boolean (use true/false)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sipwatch proxy", description="Inline SIP UDP proxy between sip-gateway and sip-signaling: trace stamping, per-hop RTT metrics, OTLP spans.")
    a = p.add_argument
    a("--listen", help="address the gateway side sends to (default 0.0.0.0:5060)")
    a("--upstream", help="sip-signaling [udp:|tcp:]HOST[:PORT] requests are forwarded to (required; udp when no transport is given)")
    a("--upstream-tcp", action="store_true", default=None, help="sip-signaling also listens on TCP at the --upstream address: requests over 1300 bytes go over TCP (RFC 3261 18.1.1) instead of as fragmented UDP")
    a("--no-tcp", action="store_true", default=None, help="listen on UDP only (by default the listen address takes UDP and TCP)")
    a("--tcp-max-connections", help="cap on SIP over TCP connections, both ways (default 4096; to make room the oldest accepted one none of whose messages was forwarded is closed, else the least recently forwarded from of the party holding the most: an IPv4 address, an IPv6 /64)")
    a("--tcp-idle-timeout", help="seconds a TCP connection may go without a message before it is closed (default 300)")
    a("--overload-after", help="seconds the receive queue must stay above its high-water mark before new "
                               "dialogs are answered 503 (default 0.05; the queue is sampled every 0.01 s)")
    a("--advertise", help="address written into Via/Record-Route (default: listen address, or this host's IP when listening on 0.0.0.0)")
    a("--gateway-metrics", help="gateway-side metrics endpoint (default 0.0.0.0:13012; 'off' disables)")
    a("--signaling-metrics", help="signaling-side metrics endpoint (default 0.0.0.0:13022; 'off' disables)")
    a("--trace-header", help="header(s) the W3C trace context is stamped into, comma-separated (default traceparent; e.g. traceparent,X-Traceparent; X-Trace-ID gets the bare trace id). Incoming traceparent, X-Traceparent and X-Trace-ID are read whatever is set")
    a("--correlation-headers", help=f"headers that tie a B2BUA's new leg to a call seen before, comma-separated: X-CID, Session-ID, P-Charging-Vector, or none (default {DEFAULT_CORRELATION})")
    a("--no-record-route", action="store_true", default=None, help="do not Record-Route (in-dialog requests may then bypass the sidecar)")
    a("--mask-numbers", help=f"phone-number masking in logs and spans: {', '.join(MASK_MODES)} (default partial)")
    a("--timer-b", type=str, help="seconds before an unanswered transaction counts as timed out (default 32)")
    a("--max-transactions", type=str, help="cap on in-flight transactions (default 200000)")
    a("--max-calls", type=str, help="cap on tracked calls (default 100000)")
    a("--max-call-duration", type=str, help="seconds after which an answered call without BYE is closed (default 14400)")
    a("--service-name", help="service.name in logs and spans (default OTEL_SERVICE_NAME or sipwatch)")
    a("--log-level", help="debug, info, warning, error (default info)")
    a("--no-tracing", action="store_true", default=None, help="do not export spans (trace ids are still stamped)")
    a("--otlp-endpoint", help="OTLP endpoint (default OTEL_EXPORTER_OTLP_ENDPOINT, else none: spans are only kept for the text waterfall)")
    a("--otlp-protocol", help="grpc or http/protobuf (default OTEL_EXPORTER_OTLP_PROTOCOL or grpc)")
    a("--sample-ratio", help="fraction of calls traced, 0..1 (default from OTEL_TRACES_SAMPLER(_ARG), else 1)")
    a("--spans-file", help="also write spans as OTLP-JSON lines to this file")
    a("--mask-call-id", help=f"Call-IDs in logs and spans: {', '.join(CALL_ID_MODES)} (default digits, none with --mask-numbers none): digits masks runs of 6+ digits and appends a keyed hash so Call-IDs stay joinable; hash shows only the keyed hash")
    a("--allow-next-hop", help="CIDR[,CIDR...]: networks requests from signaling may be sent to, besides the gateway-side sources seen")
    a("--secret", help="key for the MACs in Via branches and Record-Route and for Call-ID hashes; keep it across restarts so calls set up before one still pass (prefer SIPWATCH_SECRET or --secret-file: a flag is visible in the process list)")
    a("--secret-file", help="read the key from this file (surrounding whitespace stripped)")
    a("--drain-timeout", help="on SIGTERM, seconds to keep forwarding in-dialog requests until calls end (default 25); a second SIGTERM stops at once")
    a("--no-huge-heap", action="store_true", default=None, help="keep CPython's own arenas for the Python heap (by default the proxy and its span worker carve them from transparent huge pages)")
    a("--alive-file", help="a file the event loop touches every second, for `sipwatch alive FILE` as a liveness probe that no connection flood on the metrics ports can hold up (default none)")
    a("--timer-c", help="seconds an INVITE may ring after a provisional response before it counts as timed out (RFC 3261 Timer C, default 180)")
    add_hep_arguments(p)
    return p


def _pick(args, env, name: str):
    v = getattr(args, name.replace("-", "_"))
    if v is not None:
        return v, "--" + name
    ename = "SIPWATCH_" + name.upper().replace("-", "_")
    if ename in env:
        return env[ename], ename
    return None, "--" + name


def _number(value, what, kind=float, minimum=0, maximum=None):
    """``value`` as a ``kind`` in ``minimum..maximum``: ASCII digits only (``int``/``float``
    also take other scripts' digits), finite."""
    word = "number" if kind is float else "whole number"
    text = value if isinstance(value, str) else repr(value)
    if not isinstance(value, (int, float)) and not (isinstance(text, str) and text.isascii()):
        raise ConfigError(f"{what}: {value!r} is not a {word}")
    try:
        n = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{what}: {value!r} is not a {word}") from None
    if kind is float and not math.isfinite(n):
        raise ConfigError(f"{what}: {value!r} is not a finite number")
    if n < minimum or (maximum is not None and n > maximum):
        limits = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{what}: {value!r} must be {limits}")
    return n


DAY = 86400
YEAR = 365 * DAY
# the ranges of the numeric flags: wide (a value that started the proxy before still does, "never"
# spelled as a huge number included), but finite and bounded (inf/1e300 overflowed later, and a
# 23-digit count did not fit the tables' 64-bit arithmetic)
TIMER_B_RANGE = (0.1, DAY)
MAX_CALL_DURATION_RANGE = (1, YEAR)
TCP_IDLE_RANGE = (1, 100 * YEAR)
OVERLOAD_AFTER_RANGE = (0.01, DAY)
DRAIN_RANGE = (0, DAY)
TIMER_C_RANGE = (1, DAY)
TABLE_RANGE = (1, 1 << 40)  # --max-transactions, --max-calls (memory bounds them long before)
TCP_MAX_RANGE = (1, 1 << 40)  # (the descriptor limit lowers it, with a warning)
# values that may hold any bytes: a key (used as bytes) and file names (the OS takes them as
# they came); everything else must be text (os.environ/argv keep undecodable bytes as surrogates)
_BYTES_OK = {"secret", "secret-file", "spans-file", "alive-file"}
# OTEL_* variables the proxy (and the SDK it uses) reads as text
_OTEL_TEXT = ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES")
_OTEL_TEXT_PREFIXES = ("OTEL_EXPORTER_OTLP_", "OTEL_TRACES_")


def _check_text(value, where: str) -> None:
    """ConfigError if ``value`` holds bytes that are not UTF-8 (decoded as lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{where}: {value!r} is not valid UTF-8 text") from None


def check_otel_env(env) -> None:
    for name, value in env.items():
        if name in _OTEL_TEXT or name.startswith(_OTEL_TEXT_PREFIXES):
            _check_text(value, name)


def check_otlp_endpoint(value: str, where: str) -> None:
    """An OTLP endpoint as :func:`sipwatch.tracing.resolve_endpoint` reads it: ``[http[s]://]HOST[:PORT][/PATH]``."""
    from urllib.parse import urlsplit
    ep = value.strip()
    if "://" not in ep:
        ep = "http://" + ep
    try:
        u = urlsplit(ep)
        host, _port = u.hostname, u.port
    except ValueError as exc:
        raise ConfigError(f"{where}: {value!r} is not a URL ({exc})") from None
    if u.scheme.lower() not in ("http", "https"):
        raise ConfigError(f"{where}: {value!r}: scheme {u.scheme!r} is not http or https")
    if not host:
        raise ConfigError(f"{where}: {value!r} has no host")
    if any(c in ep for c in " \t\r\n") or not ep.isprintable():
        raise ConfigError(f"{where}: {value!r} holds spaces or control characters")
    if _port == 0:
        raise ConfigError(f"{where}: port 0 in {value!r} is not 1-65535")


def check_appendable(path: str, where: str) -> None:
    """The spans file must open for appending now (later write failures are logged at run time)."""
    try:
        with open(path, "ab"):
            pass
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"{where}: cannot open {path!r} for appending ({reason})") from None


def settings_from(argv: list[str] | None = None, env=None) -> ProxySettings:
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)

    def get(name, default=None):
        v, where = _pick(args, env, name)
        if v is None:
            return default, where
        if name not in _BYTES_OK:
            _check_text(v, where)
        return v, where

    listen_s, w = get("listen", "0.0.0.0:5060")
    listen = parse_hostport(listen_s, w)
    resolve_ip(listen[0], w)  # (a name that does not resolve would stop the start later)
    up_s, w = get("upstream")
    if not up_s:
        raise ConfigError("--upstream (or SIPWATCH_UPSTREAM) is required: the sip-signaling HOST:PORT")
    up_transport, up_s = split_transport(up_s, w)
    up_host, up_port = parse_hostport(up_s, w, default_port=5060)
    upstream = (resolve_ip(up_host, w), up_port)
    adv_s, w = get("advertise")
    advertise = parse_hostport(adv_s, w, default_port=listen[1]) if adv_s else default_advertise(listen)

    def endpoint(name, default):
        v, w = get(name, default)
        if str(v).lower() in ("off", "none", "0", ""):
            return None
        addr = parse_hostport(v, w)
        resolve_ip(addr[0], w)
        return addr

    gw = endpoint("gateway-metrics", "0.0.0.0:13012")
    sig = endpoint("signaling-metrics", "0.0.0.0:13022")
    if gw and sig and gw == sig:
        raise ConfigError(f"--gateway-metrics and --signaling-metrics are both {gw[0]}:{gw[1]}")

    def flag(name):
        v, w = _pick(args, env, name)
        if v is None:
            return False
        return v if isinstance(v, bool) else _env_bool(w, v)

    header, w = get("trace-header", "traceparent")
    names = [n.strip() for n in str(header).split(",") if n.strip()]
    if not names or len(names) > 8:
        raise ConfigError(f"{w}: {header!r}: give 1 to 8 header names")
    for n in names:
        if not all(c.isascii() and (c.isalnum() or c in "-_") for c in n):
            raise ConfigError(f"{w}: {n!r} is not a valid SIP header name")
    header = ",".join(names)
    corr, w = get("correlation-headers", DEFAULT_CORRELATION)
    try:
        parse_kinds(str(corr))
    except ValueError as exc:
        raise ConfigError(f"{w}: {exc}") from None
    mask, w = get("mask-numbers", "partial")
    if mask not in MASK_MODES:
        raise ConfigError(f"{w}: {mask!r} is not one of {', '.join(MASK_MODES)}")
    level, w = get("log-level", "info")
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{w}: {level!r} is not one of debug, info, warning, error")
    timer_b = _number(*get("timer-b", 32.0), float, *TIMER_B_RANGE)
    max_tx = _number(*get("max-transactions", 200_000), int, *TABLE_RANGE)
    max_calls = _number(*get("max-calls", 100_000), int, *TABLE_RANGE)
    max_dur = _number(*get("max-call-duration", 14400.0), float, *MAX_CALL_DURATION_RANGE)
    service, w = get("service-name", env.get("OTEL_SERVICE_NAME") or "sipwatch")
    _check_text(service, w if _pick(args, env, "service-name")[0] is not None else "OTEL_SERVICE_NAME")
    ratio_s, w = get("sample-ratio")
    ratio = None
    if ratio_s is not None:
        ratio = _number(ratio_s, w, maximum=1)
    proto, w = get("otlp-protocol")
    if proto is not None and proto not in ("grpc", "http/protobuf"):
        raise ConfigError(f"{w}: {proto!r} is not grpc or http/protobuf")
    ep, w = get("otlp-endpoint")
    tracing = not flag("no-tracing")
    if ep:
        check_otlp_endpoint(str(ep), w)
    elif tracing:
        for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            if env.get(name):
                _check_text(env[name], name)
                check_otlp_endpoint(env[name], name)
                break
    if tracing:
        check_otel_env(env)
    spans_file, w = get("spans-file")
    if spans_file and tracing:
        check_appendable(spans_file, w)
    cid_mode, w = get("mask-call-id", default_call_id_mode(mask))
    if cid_mode not in CALL_ID_MODES:
        raise ConfigError(f"{w}: {cid_mode!r} is not one of {', '.join(CALL_ID_MODES)}")
    allow = parse_networks(*get("allow-next-hop", ""))
    secret = read_secret(get("secret"), get("secret-file"))
    drain = _number(*get("drain-timeout", 25.0), float, *DRAIN_RANGE)
    timer_c = _number(*get("timer-c", 180.0), float, *TIMER_C_RANGE)
    tcp_on = not flag("no-tcp")
    if flag("upstream-tcp"):
        if up_transport == "udp":
            up_transport = "udp+tcp"
    if up_transport != "udp" and not tcp_on:
        raise ConfigError(f"--no-tcp: the upstream is reached over TCP ({up_transport})")
    tcp_max = _number(*get("tcp-max-connections", 4096), int, *TCP_MAX_RANGE)
    tcp_idle = _number(*get("tcp-idle-timeout", 300.0), float, *TCP_IDLE_RANGE)
    overload_after = _number(*get("overload-after", 0.05), float, *OVERLOAD_AFTER_RANGE)
    alive_file, _ = get("alive-file", "")
    try:
        hep = hep_options(get, flag)
    except EndpointError as exc:
        raise ConfigError(str(exc)) from None
    return ProxySettings(
        listen=listen, upstream=upstream, advertise=advertise, gateway_metrics=gw,
        signaling_metrics=sig, trace_header=header, record_route=not flag("no-record-route"),
        mask_numbers=mask, timer_b=timer_b, max_transactions=max_tx, max_calls=max_calls,
        max_call_duration=max_dur, service_name=service, log_level=level,
        tracing=tracing, otlp_endpoint=ep, otlp_protocol=proto,
        sample_ratio=ratio, spans_file=spans_file, allow_next_hop=allow, secret=secret,
        drain_timeout=drain, timer_c=timer_c, mask_call_id=cid_mode, correlation_headers=str(corr),
        upstream_transport=up_transport, tcp=tcp_on, tcp_max_connections=tcp_max,
        tcp_idle_timeout=tcp_idle, overload_after=overload_after, huge_heap=not flag("no-huge-heap"),
        alive_file=str(alive_file or ""), **hep,
    )


def split_transport(text: str, what: str) -> tuple[str, str]:
    """``udp:HOST:PORT`` / ``tcp:HOST:PORT`` (Kamailio's form) → (transport, ``HOST:PORT``);
    without a prefix, UDP."""
    t = text.strip()
    proto, sep, rest = t.partition(":")
    if sep and proto.lower() in ("udp", "tcp"):
        return proto.lower(), rest
    if sep and proto.lower() in ("tls", "sctp", "ws", "wss"):
        raise ConfigError(f"{what}: transport {proto!r} in {text!r} is not supported (udp or tcp)")
    return "udp", t


MAX_NETWORKS = 1024


def parse_networks(text, what: str) -> tuple:
    """``CIDR[,CIDR...]`` (host bits allowed: 10.1.2.3/8 means 10.0.0.0/8) as ip_network objects."""
    out = []
    for part in str(text or "").replace(" ", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise ConfigError(f"{what}: {part!r} is not an IP network (expected CIDR such as 10.0.0.0/8)") from None
        if net not in out:
            out.append(net)
    if len(out) > MAX_NETWORKS:
        raise ConfigError(f"{what}: {len(out)} networks, at most {MAX_NETWORKS}")
    return tuple(out)


MAX_SECRET = 4096


def read_secret(inline, from_file) -> bytes:
    """The key from ``--secret``/SIPWATCH_SECRET or ``--secret-file`` (not both), stripped."""
    (value, w_value), (path, w_path) = inline, from_file
    if value and path:
        raise ConfigError(f"{w_value} and {w_path} are both set: give the key one way")
    if path:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SECRET + 1)
        except OSError as exc:
            raise ConfigError(f"{w_path}: cannot read {path!r} ({exc.strerror or exc})") from None
        if len(data) > MAX_SECRET:
            raise ConfigError(f"{w_path}: {path!r} is longer than {MAX_SECRET} bytes")
        data = data.strip()
        if not data:
            raise ConfigError(f"{w_path}: {path!r} is empty")
        return data
    if value:
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
        data = data.strip()
        if len(data) > MAX_SECRET:
            raise ConfigError(f"{w_value}: longer than {MAX_SECRET} bytes")
        return data
    return b""


def call_id_masker(args, env=None) -> CallIdMasker:
    """The masker :func:`~sipwatch.masking.add_call_id_mask_arguments`' flags (or SIPWATCH_MASK_CALL_ID,
    SIPWATCH_SECRET, SIPWATCH_SECRET_FILE) ask for; ConfigError on a bad key."""
    env = os.environ if env is None else env
    mode, w = _pick(args, env, "mask-call-id")
    if mode is None:
        mode = default_call_id_mode(args.mask_numbers)
    elif mode not in CALL_ID_MODES:
        raise ConfigError(f"{w}: {mode!r} is not one of {', '.join(CALL_ID_MODES)}")
    return CallIdMasker(mode, read_secret(_pick(args, env, "secret"), _pick(args, env, "secret-file")))
