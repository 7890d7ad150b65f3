"""B2BUA leg correlation: which headers tie a new dialog to a call already seen, read off bytes.

A B2BUA (sip-signaling) takes a call in as leg A and places the outbound leg B as a new dialog with
a new Call-ID. Peers carry the link in headers; each one is read here into an index key:

* ``X-CID`` (Homer's convention, set in Asterisk/FreeSWITCH dialplans): leg A's Call-ID. The key is
  the Call-ID itself, looked up in the call table (no index of its own).
* ``Session-ID`` (RFC 7989): ``<local-uuid>;remote=<remote-uuid>``, 32 hex each, the null UUID
  (all zeros) while the remote end is unknown. Its value changes along one call (the UAS's UUID is
  added once it answers), so it is matched as a pair: the key is the set of non-null UUIDs, sorted,
  lowercase. A B2BUA passes it unchanged (RFC 7989 §6), so leg B's initial INVITE carries leg A's.
* ``P-Charging-Vector`` (RFC 7315, IMS): the ``icid-value`` parameter, one value for the whole
  charging session across B2BUAs.

Anything that does not have that shape is ``MALFORMED`` (counted, never indexed); every key is
short and bounded (``MAX_VALUE``), so no header can grow the index beyond one key per call and kind.
Nothing here runs for in-dialog requests: the core reads these headers for initial INVITEs only.
"""
from __future__ import annotations

# the kinds, in the order of the ``header`` label of ``sip_correlation_total``
XCID, SESSION_ID, ICID = 0, 1, 2
KINDS = ("x-cid", "session-id", "icid")  # flag spelling, lowercase header names
HEADER_NAMES = (b"x-cid", b"session-id", b"p-charging-vector")
DEFAULT = "X-CID,Session-ID"
MAX_VALUE = 256  # bytes: longer values are malformed
MALFORMED = b""
_HEX = frozenset(b"0123456789abcdef")
_NULL_UUID = b"0" * 32
_CONTROL = bytes(range(0, 33)) + b"\x7f"


def parse_kinds(text: str) -> tuple[int, ...]:
    """``--correlation-headers``: a comma list of X-CID, Session-ID, P-Charging-Vector (or icid),
    case-insensitive; ``none`` or empty for none. Raises ValueError naming an unknown one."""
    out: list[int] = []
    for part in text.replace(" ", ",").split(","):
        p = part.strip().lower()
        if not p or p == "none":
            continue
        if p in ("p-charging-vector", "icid", "icid-value"):
            k = ICID
        elif p in KINDS:
            k = KINDS.index(p)
        else:
            raise ValueError(f"{part.strip()!r} is not one of X-CID, Session-ID, P-Charging-Vector")
        if k not in out:
            out.append(k)
    return tuple(out)


def add_correlation_argument(parser) -> None:
    """``--correlation-headers`` for ``sipwatch capture`` / ``analyze`` (the proxy's is in config)."""
    def kinds(text: str) -> str:
        try:
            parse_kinds(text)
        except ValueError as exc:
            import argparse
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    parser.add_argument("--correlation-headers", type=kinds, default=DEFAULT, metavar="NAMES",
                        help="headers that tie a B2BUA's new leg to a call seen before: X-CID, Session-ID, "
                             f"P-Charging-Vector, comma-separated, or none (default {DEFAULT})")


def xcid_key(value: bytes) -> bytes:
    """The Call-ID an X-CID names (surrounding blanks removed), or MALFORMED."""
    v = value.strip()
    if not v or len(v) > MAX_VALUE or v.translate(None, _CONTROL) != v:
        return MALFORMED
    return v


def _uuid(text: bytes) -> bytes | None:
    u = text.strip().lower()
    if len(u) != 32 or not _HEX.issuperset(u):
        return None
    return u


def session_id_key(value: bytes) -> bytes:
    """The RFC 7989 Session-ID as an order-free pair: ``s:`` + the non-null UUIDs sorted and joined
    by ``-``; MALFORMED when the local UUID is missing, null or not 32 hex, or ``remote`` is bad."""
    if len(value) > MAX_VALUE:
        return MALFORMED
    parts = value.split(b";")
    local = _uuid(parts[0])
    if local is None or local == _NULL_UUID:
        return MALFORMED
    remote = _NULL_UUID
    for p in parts[1:]:
        name, eq, v = p.partition(b"=")
        if name.strip().lower() == b"remote":
            r = _uuid(v) if eq else None
            if r is None:
                return MALFORMED
            remote = r
            break
    if remote == _NULL_UUID or remote == local:
        return b"s:" + local
    return b"s:" + b"-".join(sorted((local, remote)))


def icid_key(value: bytes) -> bytes:
    """``i:`` + the ``icid-value`` of a P-Charging-Vector (quotes removed), or MALFORMED."""
    if len(value) > MAX_VALUE:
        return MALFORMED
    for p in value.split(b";"):
        name, eq, v = p.partition(b"=")
        if eq and name.strip().lower() == b"icid-value":
            v = v.strip()
            if len(v) >= 2 and v[:1] == b'"' and v[-1:] == b'"':
                v = v[1:-1]
            if not v or v.translate(None, _CONTROL) != v:
                return MALFORMED
            return b"i:" + v
    return MALFORMED


def key_of(kind: int, value: bytes) -> bytes:
    if kind == XCID:
        return xcid_key(value)
    if kind == SESSION_ID:
        return session_id_key(value)
    return icid_key(value)


__all__ = ["KINDS", "HEADER_NAMES", "DEFAULT", "XCID", "SESSION_ID", "ICID", "MALFORMED", "parse_kinds",
           "key_of", "xcid_key", "session_id_key", "icid_key"]
