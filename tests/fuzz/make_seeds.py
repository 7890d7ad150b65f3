"""Write the fuzz seeds into tests/fuzz/seeds/: every UDP call in pcaps/ replayed through the
core (requests from the gateway side, responses as the upstream's answers), plus hand-written
adversarial shapes from issue 8. Run from the repository root: python -m tests.fuzz.make_seeds
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from capture.pcapfile import read_packets  # noqa: E402
from tests.fuzz.target import SEP, SEP_TCP, ADVERTISE  # noqa: E402

ADV = b"%s:%d" % (ADVERTISE[0].encode(), ADVERTISE[1])
OUT = Path(__file__).resolve().parent / "seeds"


def rec(op: int, payload: bytes) -> bytes:
    return bytes([op]) + payload


def response_spec(payload: bytes) -> bytes:
    """A captured response without the lines ``answer`` copies from the forwarded request."""
    head, sep, body = payload.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    copied = (b"via", b"v", b"from", b"f", b"to", b"t", b"call-id", b"i", b"cseq", b"record-route")
    keep = [ln for ln in lines[1:] if ln.partition(b":")[0].strip().lower() not in copied]
    # the To tag comes from the callee: keep it as an extra To line would duplicate To; drop it
    return b"\r\n".join([lines[0], *keep]) + b"\r\n\r\n" + body


def from_pcap(path: Path) -> bytes | None:
    recs = []
    for p in read_packets(path):
        if p.transport != "udp" or not p.payload[:3].isalpha() and not p.payload.startswith(b"SIP/2.0"):
            continue
        if p.payload.startswith(b"SIP/2.0 "):
            recs.append(rec(0x14, response_spec(p.payload)))
        else:
            recs.append(rec(0x10, p.payload))
    return SEP.join(recs) if recs else None


def invite(extra: bytes = b"", body: bytes = b"v=0\r\n", cl: bytes | None = None, via: bytes | None = None,
           method: bytes = b"INVITE", cseq: bytes = b"1") -> bytes:
    via = via or b"Via: SIP/2.0/UDP 127.0.0.3:5070;branch=z9hG4bK-seed-1;rport"
    cl = b"%d" % len(body) if cl is None else cl
    return (b"%s sip:+4930123456@127.0.0.1:5060 SIP/2.0\r\n%s\r\n"
            b"From: <sip:+4930999@127.0.0.3>;tag=a1\r\nTo: <sip:+4930123456@127.0.0.3>\r\n"
            b"Call-ID: seed-%s@127.0.0.1\r\nCSeq: %s %s\r\nMax-Forwards: 70\r\n"
            b"Contact: <sip:a@127.0.0.3:5070>\r\n%sContent-Length: %s\r\n\r\n%s"
            % (method, via, method, cseq, method, extra, cl, body))


def hand_written() -> dict[str, bytes]:
    route = b"<sip:" + ADV + b";lr>"
    tcp_via = b"Via: SIP/2.0/TCP 127.0.0.3:5070;branch=z9hG4bK-seed-t;rport"
    victim_via = b"Via: SIP/2.0/UDP 127.0.0.3:5070;branch=z9hG4bK-v;received=127.0.0.9;rport=9999"
    seeds = {
        "route_flood_one_header": rec(0, invite(b"Route: " + b", ".join([route] * 300) + b"\r\n")),
        "route_flood_many_headers": rec(0, invite(b"".join(b"Route: " + route + b"\r\n" for _ in range(200)))),
        "via_flood": rec(0, invite(via=b"Via: " + b", ".join(
            b"SIP/2.0/UDP 10.0.0.%d:5060;branch=z9hG4bK%d" % (i % 250, i) for i in range(300)))),
        # found by the live fuzz test: the Via limit counted only the top Via line's values
        "via_flood_second_line": rec(0, invite(via=b"Via: SIP/2.0/UDP 127.0.0.3:5070;branch=z9hG4bK-s;rport\r\nVia: " +
                                         b", ".join(b"SIP/2.0/UDP 10.0.%d.%d:5060;branch=z9hG4bK%d"
                                                    % (i // 250, i % 250, i) for i in range(1000)), method=b"INFO")),
        # found by the fuzzer: a status line "SIP/2.0.0 100 Trying" is relayed as it came
        "response_bad_version": SEP.join([
            rec(0, invite(method=b"OPTIONS", body=b"")),
            rec(4, b"SIP/2.0.0 200 OK\r\nContent-Length: 0\r\n\r\n")]),
        # a folded Content-Length is one value, 0 (RFC 3261 §7.3.1)
        "response_folded_content_length": SEP.join([
            rec(0, invite(method=b"OPTIONS", body=b"")),
            rec(4, b"SIP/2.0 200 OK\r\nContent-Length:\r\n 0\r\n\r\n")]),
        # found by make fuzz: a request line ending in a TAB is forwarded with it (RFC 3261 §25.1:
        # Method SP Request-URI SP SIP-Version CRLF, nothing else)
        "request_line_trailing_tab": rec(0, invite(method=b"OPTIONS", body=b"").replace(b" SIP/2.0\r\n", b" SIP/2.0\t\r\n", 1)),
        "comma_flood": rec(0, invite(b"Contact: " + b"," * 3000 + b"\r\n")),
        "folded_flood": rec(0, invite(b"Subject: x" + b"\r\n y" * 1000 + b"\r\n")),
        "nested_angles": rec(0, invite(b"Route: " + b"<" * 2000 + b"sip:a" + b">" * 2000 + b"\r\n")),
        "nested_quotes": rec(0, invite(b"Route: " + b'"a,' * 2000 + b"\r\n")),
        "cseq_2_64": SEP.join([rec(0, invite(cseq=b"18446744073709551616")),
                               rec(0x14, b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")]),
        "cl_conflict": rec(0, invite(b"Content-Length: 2\r\n")),
        "cl_short": rec(0, invite(cl=b"2")),
        "cl_long": rec(0, invite(cl=b"999")),
        # bare-LF headers, no Content-Length, a CRLFCRLF inside the body: the body starts at the
        # first empty line (the LF LF), so "X-Injected" is body, not a header
        "bare_lf_crlfcrlf_body": rec(0, invite(body=b"X-Injected: 1\r\n\r\nv=0\r\n").replace(
            b"Content-Length: 22\r\n", b"").replace(b"\r\n", b"\n", 8)),
        "nul_in_header": rec(0, invite(b"X-Nul: a\x00b\r\n")),
        "no_colon_line": rec(0, invite(b"NoColonHere\r\n")),
        "forged_received": SEP.join([rec(0, invite(via=victim_via)),
                                     rec(0x14, b"SIP/2.0 180 Ringing\r\nContent-Length: 0\r\n\r\n")]),
        "forged_response_our_via": rec(1, b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP " + ADV +
                                       b";branch=z9hG4bKsw0123456789ab.0123456789ab;rport\r\n"
                                       b"Via: SIP/2.0/UDP 127.0.0.9:9999;received=127.0.0.9;rport=9999\r\n"
                                       b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\n"
                                       b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"),
        "response_next_via_ipv6": rec(3, b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP " + ADV +
                                      b";branch=z9hG4bKsw0.0;rport\r\nVia: SIP/2.0/UDP [::1]:5060;rport=99999999999999999999;received=::1\r\n"
                                      b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\n"
                                      b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"),
        "request_from_upstream_to_name": rec(3, invite(method=b"BYE").replace(
            b"sip:+4930123456@127.0.0.1:5060", b"sip:x@victim.example.com:9999")),
        "near_max_size": rec(0, invite(b"X-Pad: " + b"p" * 64900 + b"\r\n")),
        "max_forwards_zero": rec(0, invite().replace(b"Max-Forwards: 70", b"Max-Forwards: 0")),
        "huge_numbers": rec(0, invite(b"Expires: 99999999999999999999999\r\n", cseq=b"4294967296").replace(
            b"Max-Forwards: 70", b"Max-Forwards: 99999999999999999999")),
        "options_then_answer": SEP.join([rec(0, invite(method=b"OPTIONS", body=b"")),
                                         rec(0x24, b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")]),
        "keepalive": rec(0, b"\r\n\r\n"),
        # found by the fuzzer: a response from upstream with a header name that is not a token
        "response_bad_header_name": SEP.join([
            rec(0, invite(method=b"OPTIONS", body=b"")),
            rec(4, b"SIP/2.0 200 OK\r\nF|om: <sip:x@127.0.0.3>\r\nContent-Length: 0\r\n\r\n")]),
        "response_nul_in_value": SEP.join([
            rec(0, invite(method=b"OPTIONS", body=b"")),
            rec(4, b"SIP/2.0 200 OK\r\nServer: a\x00b\r\nContent-Length: 0\r\n\r\n")]),
        # over TCP (records after SEP_TCP): a call whose answers come back on the connection, a
        # new INVITE refused while shedding and its ACK, a Via naming another IP (no alias)
        "tcp_invite_then_answer": b"".join([
            SEP_TCP, rec(0, invite(via=tcp_via)), SEP_TCP, rec(4, b"SIP/2.0 180 Ringing\r\nContent-Length: 0\r\n\r\n"),
            SEP_TCP, rec(4, b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")]),
        "tcp_refused_invite_and_ack": b"".join([
            SEP_TCP, rec(8, invite(via=tcp_via)), SEP_TCP,
            rec(0, invite(method=b"ACK", body=b"", via=tcp_via).replace(b"To: <sip:+4930123456@127.0.0.3>",
                                                                       b"To: <sip:+4930123456@127.0.0.3>;tag=x"))]),
        "tcp_via_of_another_ip": SEP_TCP + rec(1, invite(
            method=b"OPTIONS", body=b"", via=b"Via: SIP/2.0/TCP 127.0.0.3:5070;branch=z9hG4bK-seed-2;rport")),
    }
    return seeds


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for p in sorted((ROOT / "pcaps").glob("*.pcap")):
        data = from_pcap(p)
        if data:
            (OUT / f"pcap_{p.stem}.bin").write_bytes(data)
    for name, data in hand_written().items():
        (OUT / f"{name}.bin").write_bytes(data)
    print(f"{len(list(OUT.glob('*.bin')))} seeds in {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
