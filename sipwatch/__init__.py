"""sipwatch: SIP/RTP tracing sidecar (inline UDP proxy, W3C trace stamping, RTT metrics, OTLP spans)."""

__version__ = "0.1.0"
