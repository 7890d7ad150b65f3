"""The OTLP export flags shared by the proxy and the capture-side commands, kept apart from
:mod:`sipwatch.tracing` so that a command which exports nothing does not import the exporters
(``sipwatch analyze`` starts about a third faster without them)."""
from __future__ import annotations

DEFAULT_PORTS = {"grpc": 4317, "http/protobuf": 4318}


def add_otlp_arguments(ap) -> None:
    """The proxy's span export flags, for the capture-side commands' argument parsers."""
    ap.add_argument("--otlp-endpoint", help="OTLP endpoint (default OTEL_EXPORTER_OTLP_ENDPOINT; "
                                             "none: no export)")
    ap.add_argument("--otlp-protocol", choices=tuple(DEFAULT_PORTS),
                    help="grpc or http/protobuf (default OTEL_EXPORTER_OTLP_PROTOCOL or grpc)")
    ap.add_argument("--spans-file", help="also write spans as OTLP-JSON lines to this file")
