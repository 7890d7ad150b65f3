"""Masking (issue 8 item 7) and the log writer that must survive any value (item 4).

Property tests build header values from known parts (numbers with visual separators, URI and
user parameters, display names) and check the output against those parts, never against the
masking code's own idea of a number.
"""
from __future__ import annotations

import io
import re

import orjson
from hypothesis import given, settings, strategies as st

from sipwatch.logs import ErrorReporter, JsonLog, call_summary_fields, dumps
from sipwatch.masking import CallIdMasker, mask_uri

SEPARATORS = " -.()"
# five digits in a row, visual separators between them allowed
FIVE_DIGITS = re.compile(r"\d(?:[ \-.()/]*\d){4}")
# parameters that carry numbers of people (RFC 3966, RFC 4694, RFC 4904, ...)
NUMBER_PARAMS = ("cpc", "isub", "phone-context", "rn", "npdi-x", "ext", "postd", "oli", "x-number")


@st.composite
def number(draw, min_digits=5, max_digits=15):
    digits = draw(st.text(alphabet="0123456789", min_size=min_digits, max_size=max_digits))
    out = "+" if draw(st.booleans()) else ""
    for i, d in enumerate(digits):
        if i and draw(st.integers(0, 3)) == 0:
            out += draw(st.sampled_from(SEPARATORS))
        out += d
    return out, digits


@st.composite
def header_value(draw):
    """A From/To/R-URI-like value and the digits of every number in it."""
    scheme = draw(st.sampled_from(["sip:", "sips:", "tel:"]))
    user, user_digits = draw(number())
    numbers = [user_digits]
    params = ""
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(NUMBER_PARAMS))
        value, digits = draw(number())
        params += f";{name}={value}"
        numbers.append(digits)
    host = draw(st.sampled_from(["example.com", "gw.example.net", "sip-gateway"]))
    port = draw(st.sampled_from(["", ":5060", ":5070", ":7"]))
    if scheme == "tel:":
        uri = f"tel:{user}{params}"
    elif draw(st.booleans()):
        uri = f"{scheme}{user}{params}@{host}{port};user=phone"  # user parameters
    else:
        uri = f"{scheme}{user}@{host}{port}{params}"  # URI parameters
    display = ""
    if draw(st.booleans()):
        d, digits = draw(number())
        display = f'"Caller {d}" '
        numbers.append(digits)
    header_params = ""
    if draw(st.booleans()):
        value, digits = draw(number())
        header_params = f";cpc={value}"
        numbers.append(digits)
    return f"{display}<{uri}>{header_params};tag=abc", numbers, user_digits, host + port


@settings(max_examples=300, deadline=None)
@given(header_value())
def test_partial_masking_leaves_no_five_digit_run_in_user_part_params_or_display(case):
    value, numbers, user_digits, hostport = case
    out = mask_uri(value, "partial")
    assert not FIVE_DIGITS.search(out), (value, out)
    # the last four digits of the caller's number stay, so calls can be told apart
    assert user_digits[-4:] in re.sub(r"[ \-.()]", "", out)
    # hosts, ports and the tag are left alone
    if not value.split("<", 1)[1].startswith("tel:"):
        assert "@" + hostport in out
    assert out.endswith(";tag=abc")


@settings(max_examples=200, deadline=None)
@given(header_value())
def test_full_masking_leaves_no_digit_outside_host_and_port(case):
    value, numbers, user_digits, hostport = case
    out = mask_uri(value, "full")
    without_host = out.replace(hostport, "")
    assert not re.search(r"\d", without_host), (value, out)


def test_issue_examples():
    cases = {
        "<sip:+49 30 1234567@gw.example.com>": "1234567",
        "<tel:+1-212-555-0100>": "2125550100",
        "<sip:alice@example.com;cpc=+4930123456>": "4930123456",
        "<sip:+4930123456;isub=987654;phone-context=+49@example.com;user=phone>": "987654",
        "<tel:+4930123456;phone-context=+4930123456>": "4930123456",
    }
    for value, digits in cases.items():
        out = mask_uri(value, "partial")
        assert digits not in re.sub(r"[ \-.()+]", "", out), (value, out)
    # hosts and ports stay, IP literals included
    assert mask_uri("<sip:+4930123456@10.1.2.3:5060;maddr=192.168.100.200>", "partial") == \
        "<sip:+******3456@10.1.2.3:5060;maddr=192.168.100.200>"


def test_masking_cost_is_linear_in_adversarial_shapes():
    """Counted, not timed: every regex/scan runs over each character a bounded number of times,
    so doubling the input at most doubles the number of URI parts processed."""
    for piece in ("<>,", "sip:", ";a=123456", "<sip:1@a>,", "1 ", '"12345" '):
        small, big = mask_uri(piece * 2000), mask_uri(piece * 4000)
        assert len(big) <= 2 * len(small) + len(piece) * 4


# -- Call-IDs --------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=80), st.binary(min_size=1, max_size=80))
def test_call_id_masking_is_stable_and_keeps_different_call_ids_apart(a, b):
    for mode in ("digits", "hash"):
        m1 = CallIdMasker(mode, b"key-1")
        m2 = CallIdMasker(mode, b"key-1")  # another process (a restart) with the same secret
        assert m1(a) == m1(a) == m2(a)
        if a != b:
            assert m1(a) != m1(b)


@settings(max_examples=200, deadline=None)
@given(number(min_digits=6, max_digits=15), st.sampled_from(["@gw.example.com", "-1@10.0.0.1", ""]))
def test_call_id_digits_mode_hides_numbers(num, suffix):
    _, digits = num
    call_id = (digits + suffix).encode()
    out = CallIdMasker("digits", b"k")(call_id)
    assert digits not in out and not re.search(r"\d{6}", out.split("~")[0])
    out_hash = CallIdMasker("hash", b"k")(call_id)
    assert re.fullmatch(r"h-[0-9a-f]{32}", out_hash)


def test_call_id_hash_is_keyed():
    cid = b"4930123456-77@gw"
    assert CallIdMasker("hash", b"one")(cid) != CallIdMasker("hash", b"two")(cid)
    assert CallIdMasker("digits", b"one")(cid) != CallIdMasker("digits", b"two")(cid)
    # no secret: a random key per process, still stable within it
    m = CallIdMasker("hash", b"")
    assert m(cid) == m(cid) != CallIdMasker("hash", b"")(cid)
    # short digit runs (SIPp's "1-12345@host") and none mode are left as they are
    assert CallIdMasker("digits", b"one")(b"1-12345@127.0.0.1") == "1-12345@127.0.0.1"
    assert CallIdMasker("none", b"one")(cid) == cid.decode()


# -- the log writer survives any value ------------------------------------------------------
class _Tx:
    method = b"INVITE"
    status = 200
    t_sent, t_first, t_final = 1.0, 1.01, 1.02
    retrans = 0
    timed_out = False

    def __init__(self, cseq):
        self.cseq = cseq


class _Call:
    is_call = True
    trace_id = 0x1234
    t_start, t_setup, t_answer, t_end = 1.0, 1.01, 1.02, 3.0
    status = 200
    outcome = 0
    retrans = 0
    from_uri = b'"A" <sip:+4930123456@gw>'
    to_uri = b"<sip:svc@sig>"
    ruri = b"sip:svc@sig"

    def __init__(self, call_id=b"c1@gw", cseq=1):
        self.call_id = call_id
        self.transactions = [_Tx(cseq)]


@given(st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 80), max_value=1 << 80)
    | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.one_of(st.text(max_size=5), st.integers(), st.binary(max_size=5)), inner, max_size=4),
    max_leaves=20))
def test_dumps_never_raises_and_always_writes_json(value):
    line, _ = dumps({"event": "x", "value": value})
    assert orjson.loads(line)["event"] == "x"


def test_call_summary_with_a_cseq_past_64_bits_is_written_and_counted():
    buf, errors = io.BytesIO(), []
    log = JsonLog("svc", stream=buf, on_error=lambda c, e: errors.append(c))
    log.call_summary(_Call(cseq=18446744073709551616))
    rec = orjson.loads(buf.getvalue())
    assert rec["event"] == "call_summary"
    assert str(rec["transactions"][0]["cseq"]) == "18446744073709551616"
    assert errors == ["log"]
    assert rec["ended_by"] is None


def test_call_summary_masks_the_call_id_when_asked():
    buf = io.BytesIO()
    log = JsonLog("svc", stream=buf, call_id_mask=CallIdMasker("digits", b"k"))
    log.call_summary(_Call(call_id=b"4930123456@gw"))
    rec = orjson.loads(buf.getvalue())
    assert "4930123456" not in rec["call_sid"] and rec["call_sid"].startswith("******3456@gw~")
    assert call_summary_fields(_Call(call_id=b"4930123456@gw"))["call_sid"] == "4930123456@gw"


def test_error_reporter_counts_every_failure_and_logs_one_line_per_interval():
    buf = io.BytesIO()
    now = [100.0]
    counters = {"tick": 0}
    rep = ErrorReporter(JsonLog("svc", stream=buf), counters, interval=10.0, clock=lambda: now[0])
    for _ in range(5):
        rep.report("tick", ValueError("bad +4930123456"))
    now[0] += 10.0
    rep.report("tick", ValueError("again"))
    lines = [orjson.loads(x) for x in buf.getvalue().splitlines()]
    assert counters["tick"] == 6
    assert [r["suppressed"] for r in lines] == [0, 4]
    assert all(r["event"] == "internal_error" and r["component"] == "tick" for r in lines)
    assert "4930123456" not in lines[0]["error"]  # peer input quoted in an error is masked too


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-. ()/;=abc\u0663", max_size=30))
def test_partial_masking_of_a_number_keeps_exactly_its_last_four_digits(number):
    """The rule, stated digit by digit: of n >= 5 ASCII digits the first n-4 become '*' and every
    other character stays where it was; 3-4 digits are all masked; fewer stay as they are."""
    from sipwatch.masking import _mask_digits
    digits = [i for i, c in enumerate(number) if c in "0123456789"]
    n = len(digits)
    masked = set(digits if 3 <= n <= 4 else digits[:n - 4] if n >= 5 else [])
    want = "".join("*" if i in masked else c for i, c in enumerate(number))
    assert _mask_digits(number) == want
