"""Masking (issue 8 item 7) and the log writer that must survive any value (item 4).

Property tests build header values from known parts (numbers with visual separators, URI and
user parameters, display names) and check the output against those parts, never against the
masking code's own idea of a number.
"""
from __future__ import annotations

import io
import re

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from sipwatch.hep_sender import summary_record
from sipwatch.logs import ErrorReporter, JsonLog, call_summary_fields, dumps
from sipwatch.masking import SHOWN_MAX, CallIdMasker, mask_uri

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


def test_a_huge_value_is_masked_over_its_first_shown_max_characters_only(monkeypatch):
    """A hostile From/To/Request-URI of up to 64 KB cost up to 9 ms to mask (compiled; ~150x its
    datagram's forwarding), on the loop under --no-tracing: only the first SHOWN_MAX characters
    are masked and shown, cut before the digits and separators reaching the cut, then how many
    were left out. Numbers in the shown part are masked as ever; the rest is never shown."""
    from sipwatch import masking
    seen = []
    real = masking._mask_text
    interpreted = masking.__file__.endswith(".py")  # (compiled, the module's own calls are not patched)
    monkeypatch.setattr(masking, "_mask_text", lambda text, mode: seen.append(len(text)) or real(text, mode))
    shapes = [b'"' + b"12345 " * 12_000 + b'" <sip:+4930123456@h>', b"<sip:+4930" + b"1" * 60_000 + b"@h>",
              b"<sip:+49301234@h>" + b",<sip:+4930123456@h>" * 3000, b"tel:+1-212-555-0100" * 3000,
              b"<sip:+4930123456" + b";x=1" * 15_000 + b"@h>;tag=1", "\u00e9".encode() * 30_000]
    for value in shapes:
        for mode in ("partial", "full"):
            seen.clear()
            out = mask_uri(value, mode)
            text = value.decode("utf-8", "replace")
            assert not interpreted or (seen and max(seen) <= masking.SHOWN_MAX), (value[:40], seen)
            shown, _, rest = out.rpartition("...[+")
            left = int(rest.removesuffix(" chars]"))
            assert len(text) - left <= masking.SHOWN_MAX and left > 0
            assert text[len(text) - left - 1] not in "0123456789 -.()+" or len(text) - left == 0
            assert not re.search(r"[0-9]{5}", re.sub(r"[ \-.()+]", "", shown)), (value[:40], shown[-60:])
            if mode == "full":
                assert not re.search(r"[0-9]", shown.replace("@h", "")), shown[-60:]
    assert mask_uri(b"x" * masking.SHOWN_MAX) == "x" * masking.SHOWN_MAX  # up to the mark: all of it
    assert mask_uri("é" * 2000, "none") == "é" * 2000  # no masking asked: as it is


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


def test_error_texts_are_masked_as_the_log_says_before_they_are_cut():
    """An exception's text can quote peer input: masked in the log's mode (it was always
    "partial", so --mask-numbers full showed four digits), and masked before the 300-character
    cut (a number the cut reached showed its middle digits as if they were its last four)."""
    from sipwatch.logs import masked_error_text
    exc = ValueError("invalid literal: b'sip:+4930123456789@gw.example'")
    buf = io.BytesIO()
    rep = ErrorReporter(JsonLog("svc", stream=buf, mask_mode="full"), {"tick": 0}, interval=10.0)
    rep.report("tick", exc)
    line = orjson.loads(buf.getvalue())
    assert not any(d in line["error"] for d in ("6789", "4930")), line["error"]
    cut = "x" * 280 + " sip:+4930123456789@gw"
    shown = masked_error_text(cut, "partial")
    assert len(shown) <= 300 and "1234" not in shown and "3012" not in shown, shown
    assert masked_error_text("sip:+4930123456789@gw", "partial").endswith("6789@gw")


def test_error_reporter_catches_up_on_failures_counted_elsewhere_once_per_interval():
    """``Stats.failed`` counts where no line may be written; ``catch_up`` writes them, under the
    same one-line-per-interval limit as ``report``, and never a failure ``report`` covered."""
    from sipwatch.stats import Stats
    buf = io.BytesIO()
    now = [100.0]
    stats = Stats(ring_size=0)
    rep = ErrorReporter(JsonLog("svc", stream=buf), stats.internal_errors, interval=10.0, clock=lambda: now[0])
    lines = lambda: [orjson.loads(x) for x in buf.getvalue().splitlines()]  # noqa: E731
    rep.report("tick", ValueError("logged by report"))
    rep.catch_up(stats.internal_error_text)
    assert len(lines()) == 1  # report's failure is not written twice
    for i in range(4):
        stats.failed("datagram", KeyError(f"sip:+4930123456{i}@gw"))
    rep.catch_up(stats.internal_error_text)
    rep.catch_up(stats.internal_error_text)
    stats.failed("datagram", KeyError("later"))
    rep.catch_up(stats.internal_error_text)  # within the interval: waits
    assert [(r["component"], r.get("new")) for r in lines()] == [("tick", None), ("datagram", 4)]
    assert "KeyError" in lines()[1]["error"] and "4930123456" not in lines()[1]["error"]
    now[0] += 10.0
    rep.catch_up(stats.internal_error_text)
    last = lines()[-1]
    assert (last["component"], last["new"], last["total"]) == ("datagram", 1, 5) and "later" in last["error"]
    assert stats.internal_errors["datagram"] == 5 and stats.internal_errors["tick"] == 1


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


# -- the shortcuts of the call summary: each one against values worked out by hand --------------
def test_plain_from_and_to_shapes_masked_as_the_rules_say():
    cases = {
        # SIPp's From: 15 digits, the last four kept; the display name has no number, the tag stays
        b'"Caller" <sip:+493012345000000@127.0.0.1:5062>;tag=1000000SIPpTag001':
            '"Caller" <sip:+***********0000@127.0.0.1:5062>;tag=1000000SIPpTag001',
        b"<sip:+4930999888@127.0.0.1:5070>": "<sip:+******9888@127.0.0.1:5070>",
        b"<SIPS:4930123456@gw.example.com>": "<SIPS:******3456@gw.example.com>",
        # digits in hosts and IPv6 literals are hosts, not numbers
        b"<sip:4930123456@123456789>;tag=98765": "<sip:******3456@123456789>;tag=98765",
        b"<sip:+4930123456@[2001:db8::1]:5060>;tag=1": "<sip:+******3456@[2001:db8::1]:5060>;tag=1",
        b"<sip:alice@10.20.30.40:5060>": "<sip:alice@10.20.30.40:5060>",
        # short user parts: 3-4 digits all masked, fewer kept
        b"<sip:12@gw>": "<sip:12@gw>",
        b"<sip:+123@gw>": "<sip:+***@gw>",
        b"<sip:1234@gw>;tag=x": "<sip:****@gw>;tag=x",
        b"<sip:12345@gw>": "<sip:*2345@gw>",
        b"<sip:@gw>": "<sip:@gw>",
        # not UTF-8: replaced, the rest masked as usual
        b'"M\xfcller" <sip:+4930123456@gw>;tag=\xff1': '"M\ufffdller" <sip:+******3456@gw>;tag=\ufffd1',
    }
    for value, want in cases.items():
        for _ in range(2):  # the second time from what the first remembered
            assert mask_uri(value) == want, value
        assert mask_uri(value.decode("utf-8", "replace")) == want, value  # the same text as str
    assert mask_uri(b'"Caller" <sip:+493012345000000@127.0.0.1:5062>;tag=1', "full") == \
        '"Caller" <sip:***@127.0.0.1:5062>;tag=1'
    assert mask_uri(b"<sip:+4930999888@127.0.0.1:5070>", "none") == "<sip:+4930999888@127.0.0.1:5070>"


def test_values_with_a_tag_that_takes_part_in_the_masking():
    cases = {
        # a number in the display name (most gateways put the caller's number there)
        b'"+49 30 1234567" <sip:+49301234567@gw>;tag=77': '"+** ** ***4567" <sip:+*******4567@gw>;tag=77',
        # a parameter after the tag, and one before it
        b"<sip:+4930123456@gw>;tag=12;cpc=4930123456": "<sip:+******3456@gw>;tag=12;cpc=******3456",
        b"<sip:+4930123456@gw>;cpc=4930123456;tag=abc": "<sip:+******3456@gw>;cpc=******3456;tag=abc",
        # a second value after a comma in the tag
        b"<sip:1@a>;tag=1234567,<sip:4930123456@b>": "<sip:1@a>;tag=1234567,<sip:******3456@b>",
        # no name-addr: a URI parameter, or plain text where a number is a number
        b"sip:+4930123456@gw;tag=123456789": "sip:+******3456@gw;tag=123456789",
        b"junk;tag=1234567": "junk;tag=***4567",
        b"<sip:4930123456@gw;tag=1234567": "<sip:******3456@gw;tag=1234567",
        # a URI in the display name, tel: URIs, user parameters
        b'"sip:x" <sip:4930123456@gw>;tag=55555': '"sip:x" <sip:******3456@gw>;tag=55555',
        b"<tel:+1-212-555-0100>;tag=x": "<tel:+*-***-***-0100>;tag=x",
        b"<sip:+4930123456;isub=987654@gw;user=phone>;tag=1": "<sip:+******3456;isub=**7654@gw;user=phone>;tag=1",
        # an invalid UTF-8 sequence cut short by the ';' of the tag: one replacement character
        b"<sip:4930123456@gw>\xe2\x82;tag=1": "<sip:******3456@gw>\ufffd;tag=1",
        b"<sip:4930123456@gw>;tag=": "<sip:******3456@gw>;tag=",
        b"<sip:4930123456@gw>;tag=;tag=99999": "<sip:******3456@gw>;tag=;tag=99999",
    }
    for value, want in cases.items():
        for _ in range(2):
            assert mask_uri(value) == want, value
        assert mask_uri(value.decode("utf-8", "replace")) == want, value
    # a "URI" inside a quoted display name is display-name text: the tag after the '>' is a tag
    assert mask_uri(b'"sip:x" <a>;tag=1@b', "full") == '"sip:x" <a>;tag=1@b'
    assert mask_uri(b'"Sip:x" <a>;tag=1@b', "full") == '"Sip:x" <a>;tag=1@b'


@pytest.mark.parametrize("mode,shown", [("partial", "+******3456"), ("full", "***")])
def test_a_quoted_display_name_holding_brackets_or_commas_does_not_hide_the_uri(mode, shown):
    """'<', '>' or ',' inside a quoted display name are text, not the name-addr's structure: the
    URI after it was shown unmasked in every mode (``"Smith <Sales>" <sip:+4930123456@gw>``)."""
    for display in (b'"Smith <Sales>"', b'"a<b"', b'"<"', b'"VIP <3"', b'"x\\"<sip:y@z>"', b'"a>b"',
                    b'"Smith, John"', b'"Smith, John <Sales>"'):
        for tail in (b"", b";tag=x1"):
            value = display + b" <sip:+4930123456@gw>" + tail
            for v in (value, value.decode()):
                got = mask_uri(v, mode)
                assert "30123456" not in got and "<sip:" + shown + "@gw>" in got, (value, got)


@given(num=number(), scheme=st.sampled_from(["h323", "im", "pres", "mailto", "fax", "callto", "modem", "H323"]),
       at_host=st.booleans(), bracketed=st.booleans(), mode=st.sampled_from(["partial", "full"]))
@settings(max_examples=300, deadline=None)
def test_a_number_in_a_uri_of_another_scheme_is_masked(num, scheme, at_host, bracketed, mode):
    """Only sip:, sips: and tel: URIs were masked: ``<h323:+4930123456@gw>``, ``<fax:+49 30 1234>``,
    ``<im:4930123456@host>`` reached logs and spans as they came. The host stays as it was."""
    uri = f"{scheme}:{num[0]}" + ("@gw.example.com" if at_host else "")
    value = f'"Bob" <{uri}>;tag=a1' if bracketed else uri
    got = mask_uri(value.encode(), mode)
    assert FIVE_DIGITS.search(got) is None, (value, got)
    assert got.startswith(f'"Bob" <{scheme}:' if bracketed else f"{scheme}:"), got
    if at_host:
        assert "@gw.example.com" in got, got


@pytest.mark.parametrize("value", [
    # a review's finds: a number the first version of that change left readable, in brackets ...
    "<callto://+4930123456>", "<h323://+49/30/4930123456@gw>", "<fax:+49%204930123456>",
    "<fax:+4930123456#12>", "<http://gw/call/4930123456>", "<fax:+4930123456 ext 12>",
    "<im:alice@4930123456>", "<h323:+4930123456@gw.example.com:1720;maddr=10.0.0.1>",
    # ... and without them, where the general path had masked it (exception text too: the error
    # reporter masks it)
    "callto://+4930123456", "fax:+4930123456 ext 12", "KeyError: '4930123456'", "im:alice@4930123456",
    "http://gw/call/4930123456", "im:4930123456:pw", "fax:+49_30_4930123456"])
@pytest.mark.parametrize("mode", ["partial", "full"])
def test_numbers_in_uris_of_other_schemes_in_any_part_are_masked(value, mode):
    got = mask_uri(value.encode(), mode)
    assert "30123456" not in got and "4930123" not in got, got


@pytest.mark.parametrize("value", [
    # lax shapes some peers send: a bare number in brackets, blanks after '<', a second name-addr
    # with no comma before it (read as the first one's parameters); each kept its number
    "<4930123456>", '"Bob" <+4930123456>;tag=1', "< sip:+4930123456@gw>", "<\tsip:+4930123456@gw>;tag=1",
    "< tel:+4930123456 >", "<sip:alice@gw><sip:+4930123456@gw>", "<sip:a@b><sip:+4930123456@gw>;tag=9",
    "<a:><fax:+4930123456>", '<sip:a@b> <sip:+4930123456@gw>, "C" <sip:c@d>'])
@pytest.mark.parametrize("mode", ["partial", "full"])
def test_numbers_in_lax_name_addrs_are_masked(value, mode):
    got = mask_uri(value.encode(), mode)
    assert "30123456" not in got and "4930123" not in got, got
    assert mask_uri(value, mode) == got


def test_uris_of_other_schemes_keep_what_is_not_a_number():
    """Words, hosts, ports and IP addresses in URIs of other schemes are not numbers: kept."""
    for value in (b"<urn:service:sos>", b"<http://10.0.0.1:8080/x>", b"<im:alice@example.com>;tag=1",
                  b"urn:service:sos", b"<h323:10.0.0.123>", b"<im:192.168.100.20>", b"<h323:[::1]:1720>",
                  b"<im:alice@gw-1.example.com:5222>"):
        assert mask_uri(value) == value.decode(), value
    assert mask_uri(b"<http://4930123456:pw@10.0.0.1/x?id=12345678>") == \
        "<http://******3456:pw@10.0.0.1/x?id=****5678>"
    assert mask_uri(b"<h323:+4930123456@gw.example.com:1720;maddr=10.0.0.1>", "full") == \
        "<h323:***@gw.example.com:1720;maddr=10.0.0.1>"


def test_a_remembered_value_is_remembered_per_mode():
    value = b"<sip:+4930123456@gw>;cpc=4930123456;tag=a"
    assert mask_uri(value, "partial") == "<sip:+******3456@gw>;cpc=******3456;tag=a"
    assert mask_uri(value, "full") == "<sip:***@gw>;cpc=**********;tag=a"
    assert mask_uri(value, "partial") == "<sip:+******3456@gw>;cpc=******3456;tag=a"


def test_hostile_values_do_not_raise_and_memory_stays_bounded():
    from sipwatch import masking
    huge = b"<sip:4930123456@gw>;tag=" + b"7" * 100_000
    assert mask_uri(huge) == "<sip:******3456@gw>;tag=...[+100000 chars]"  # (shown up to SHOWN_MAX)
    assert mask_uri(b"<" * 50_000) == "<" * 1024 + "...[+%d chars]" % (50_000 - 1024)
    assert mask_uri(b"<sip:1@a>" + b";" * 50_000 + b"tag=1") == "<sip:1@a>" + ";" * 1015 + "...[+%d chars]" % (50_014 - 1024)
    # (cut just after the last delimiter before the mark: ';' or '=')
    assert mask_uri(b";tag=" * 10_000) == (";tag=" * 205)[:1021] + "...[+%d chars]" % (50_000 - 1021)
    for i in range(10_000):  # every caller new: what is remembered stays bounded
        assert mask_uri(b"<sip:%d@gw>;tag=%d" % (4930100000 + i, i)) == \
            "<sip:******%04d@gw>;tag=%d" % ((4930100000 + i) % 10_000, i)
        mask_uri(b'"%d" <sip:%d@gw>;tag=x' % (i, i))
    assert all(len(memo) <= 4097 for memo in masking._MEMOS.values())


def test_call_id_hash_is_hmac_blake2b_of_the_raw_call_id():
    """RFC 2104 HMAC over BLAKE2b, keyed as the docstring says (BLAKE2b of the secret,
    personalised): the stdlib's hmac is the reference."""
    import hashlib
    import hmac
    key = hashlib.blake2b(b"k", digest_size=32, person=b"sipwatch-callid").digest()

    def mac(raw):
        return hmac.new(key, raw, hashlib.blake2b).hexdigest()

    digits, hashed = CallIdMasker("digits", b"k"), CallIdMasker("hash", b"k")
    cases = {
        b"4930123456@gw": "******3456@gw",
        b"1234567-x-7654321@h": "***4567-x-***4321@h",
        b"123456": "**3456",
        "12345\u0663@h".encode(): "**3453@h",  # a run of 6 digits, one Arabic-Indic: read as ASCII
        ("\u0663" * 8).encode(): "****3333",  # other scripts' digits are digits too
        b"99999999999999999999999999999999999999": "*" * 34 + "9999",
        b"\xff4930123456": "\ufffd******3456",
        b"a\xff": "a\ufffd",  # nothing masked, but not as received: marked and hashed
    }
    for raw, shown in cases.items():
        assert digits(raw) == shown + "~" + mac(raw)[:16], raw
        assert digits(bytearray(raw)) == digits(raw)
        assert hashed(raw) == "h-" + mac(raw)[:32]
    # left as they are: no run of 6 digits
    for raw in (b"1-12345@127.0.0.1", b"a84bd38f-5c10-fa9c@x", b""):
        assert digits(raw) == raw.decode()
    assert digits("4930123456@gw") == "******3456@gw~" + mac(b"4930123456@gw")[:16]
    assert digits(None) is None and hashed(None) is None
    for i in range(10_000):  # every Call-ID new: what is remembered stays bounded
        raw = b"%d-1@h" % (4930100000 + i)
        assert digits(raw) == "******%04d-1@h~%s" % ((4930100000 + i) % 10_000, mac(raw)[:16])
    assert len(digits._memo) <= 4096
    long_id = b"4930123456" * 102  # (1,020 bytes: still shown; past 1,024 the hash alone)
    assert digits(long_id) == digits(long_id) == "*" * 1016 + "3456~" + mac(long_id)[:16]
    assert digits(long_id + b"12345") == "h-" + mac(long_id + b"12345")[:32]


def test_timestamps_of_log_lines():
    buf = io.BytesIO()
    log = JsonLog("svc", stream=buf)
    whens = [1764618411.123456, 1764618411.9999996, 1764618411.5, 1764618412.0000004, 1764618411, -0.5, "x"]
    for when in whens:
        log.info("m", "e", when=when)
    stamps = [orjson.loads(x)["timestamp"] for x in buf.getvalue().splitlines()]
    assert stamps[:6] == [
        "2025-12-01T19:46:51.123456Z",
        "2025-12-01T19:46:52.000000Z",  # rounded up into the next second
        "2025-12-01T19:46:51.500000Z",
        "2025-12-01T19:46:52.000000Z",
        "2025-12-01T19:46:51.000000Z",
        "1969-12-31T23:59:59.500000Z",
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamps[6])  # not a time: now


def test_call_summary_line_fields_in_order():
    buf = io.BytesIO()
    JsonLog("svc", stream=buf, clock=lambda: 0.0).call_summary(_Call(call_id=b"c1@gw"))
    rec = orjson.loads(buf.getvalue())
    assert list(rec) == [
        "timestamp", "log_level", "service_name", "call_sid", "trace_id", "message", "event", "outcome",
        "final_status", "setup_ms", "answer_ms", "duration_s", "retransmissions", "from", "to", "request_uri",
        "ended_by", "transactions"]
    assert rec["timestamp"] == "1970-01-01T00:00:03.000000Z"  # the call's end, not the clock
    assert rec["trace_id"] == "0" * 28 + "1234" and rec["call_sid"] == "c1@gw"
    assert (rec["setup_ms"], rec["answer_ms"], rec["duration_s"]) == (10.0, 20.0, 1.98)
    assert rec["from"] == '"A" <sip:+******3456@gw>' and rec["to"] == "<sip:svc@sig>"
    assert rec["transactions"] == [{"method": "INVITE", "cseq": 1, "status": 200, "rtt_ms": 10.0, "final_ms": 20.0,
                                    "retransmissions": 0, "timed_out": False, "transport": "udp"}]
    quiet = io.BytesIO()
    JsonLog("svc", stream=quiet, level="warning").call_summary(_Call())
    assert quiet.getvalue() == b""


def test_call_id_masking_in_c_matches_the_stdlib_hmac_and_the_python_path():
    """The C pass (``_sipscan.mask_call_id``) against ground truth: the stdlib's hmac over
    BLAKE2b and the regex masking, for random Call-IDs of every length around BLAKE2b's 128-byte
    blocks, digit runs of 5 to 12, non-ASCII bytes (left to the Python path) and empty ones."""
    import hashlib
    import hmac
    import random

    from sipwatch import masking
    key = hashlib.blake2b(b"k", digest_size=32, person=b"sipwatch-callid").digest()
    digits, hashed = CallIdMasker("digits", b"k"), CallIdMasker("hash", b"k")
    rnd = random.Random(5)
    alphabet = b"0123456789abcdef-@.x \xc3\xa9"
    for i in range(3000):
        if i % 2:
            raw = bytes(rnd.choice(alphabet) for _ in range(rnd.choice((0, 1, 6, 63, 127, 128, 129, 255, 256, 300))))
        else:
            raw = b"%s-%d@10.0.0.%d" % (b"9" * rnd.randrange(5, 13), i, i % 250)
        mac = hmac.new(key, raw, hashlib.blake2b).hexdigest()
        text = raw.decode("utf-8", "replace")
        shown = re.sub(r"\d{6,}", lambda m: ("*" * (len(m[0]) - 4) + m[0][-4:]) if m[0].isascii() else m[0], text)
        if raw.isascii():
            assert digits._mask(raw) == (shown + "~" + mac[:16] if shown != text else text), raw
        assert digits._mask(raw) == digits._mask_py(raw), raw
        assert hashed._mask(raw) == "h-" + mac[:32] == hashed._mask_py(raw), raw
    if masking._c_mask_call_id is not None:  # (the C pass leaves empty and non-ASCII ones to Python)
        assert masking._c_mask_call_id(b"", hashed._inner_state, hashed._outer_state, True) is None
        assert masking._c_mask_call_id(b"\xc3\xa9123456", digits._inner_state, digits._outer_state, False) is None


def test_a_call_id_shows_as_the_regex_and_the_stdlib_hmac_say_whichever_pass_answers():
    """``CallIdMasker.__call__`` (which asks ``_sipscan.plain_call_id`` first whether the Call-ID
    is shown as it is) against ground truth, on random Call-IDs around the 6-digit edge: runs of
    5, 6 and 7 digits at the start, middle and end, non-ASCII bytes, empty ones; and the C check
    itself against its definition (ASCII with no run of six ASCII digits: the text, else None)."""
    import hashlib
    import hmac
    import random

    from sipwatch import masking
    from sipwatch.sipmsg import _sipscan
    key = hashlib.blake2b(b"k", digest_size=32, person=b"sipwatch-callid").digest()
    rnd = random.Random(11)
    pieces = [b"12345", b"123456", b"1234567", b"-", b"@", b"a", b"x.y", b"\xc3\xa9", b"\xff", b"\x00", b"9", b"\xd9\xa3" * 6]
    for _ in range(4000):
        raw = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 6)))
        text = raw.decode("utf-8", "replace")
        shown = re.sub(r"[0-9]{6,}", lambda m: "*" * (len(m[0]) - 4) + m[0][-4:], text)
        plain = raw.isascii() and re.search(rb"[0-9]{6}", raw) is None
        mac = hmac.new(key, raw, hashlib.blake2b).hexdigest()
        if raw.isascii():
            assert CallIdMasker("digits", b"k")(raw) == (text if shown == text else shown + "~" + mac[:16]), raw
        else:  # (the Python pass, ground-truthed above for ASCII; its non-ASCII digits are its own)
            masker = CallIdMasker("digits", b"k")
            assert masker(raw) == masker._mask_py(raw), raw
        if _sipscan is not None:
            assert _sipscan.plain_call_id(raw) == (text if plain else None), raw
        assert masking._plain_call_id_py(raw) == (text if plain else None), raw  # (without the C module)


def test_call_id_masker_survives_pickling_for_the_span_worker_process():
    import pickle
    m = CallIdMasker("digits", b"k")
    copy = pickle.loads(pickle.dumps(m))
    assert copy.mode == "digits"
    assert copy(b"4930123456@gw") == m(b"4930123456@gw") != CallIdMasker("digits", b"j")(b"4930123456@gw")


def test_a_callers_head_is_remembered_and_every_new_tag_masks_as_the_whole_value_does():
    """A From comes back with a new tag every call: its head (what precedes the last ``;tag=``)
    is remembered once, and each value, the tag as it comes, masks exactly as the unremembered
    text does (a tag holding ``;?&,`` or odd bytes goes the long way)."""
    from sipwatch import masking
    heads = [b'"Caller" <sip:+4930123450000%02d@127.0.0.1:5062>' % i for i in range(3)]
    heads += [b"sipp <sip:sipp@127.0.0.1:5061>", b'"M\xfcller" <sip:+4930123456@gw>',
              b"<sip:+4930123456;isub=987654@gw;user=phone>", b"<tel:+1-212-555-0100>",
              b"<sip:4930123456@gw>;cpc=4930123456", b'"+49 30 1234567" <sip:+49301234567@gw>',
              b"sip:+4930123456@gw", b"junk"]
    tags = [b"1SIPpTag001", b"", b"\xff1", b"a;cpc=4930123456", b"1234567,<sip:4930123456@b>",
            b"x?h=4930123456", b"99&y=1", b"1234567"]
    for mode in ("partial", "full"):
        for head in heads:
            for tag in tags:
                value = head + b";tag=" + tag
                want = masking._mask_text(value.decode("utf-8", "replace"), mode)
                assert mask_uri(value, mode) == want, (mode, value)
    assert b"sipp <sip:sipp@127.0.0.1:5061>" in masking._HEAD_MEMOS["partial"]


def test_a_from_with_its_tag_masked_twice_is_masked_once():
    """The span worker masks each call's From for its spans and again for its summary line; a
    caller's number changes with every call, so the heads never hit: the whole value is
    remembered at the first mask and the second is that text, for each of the three shapes."""
    from sipwatch import masking
    values = [b'"Caller" <sip:+493012345%d@127.0.0.1:5061>;tag=77SIPpTag00%d' % (i, i) for i in range(5)]
    values += [b'"M\xfcller" <sip:+4930123456%d@gw>;tag=x%d' % (i, i) for i in range(3)]  # not ASCII
    values += [b"<sip:4930123456%d@gw>;cpc=4930123456;tag=q%d" % (i, i) for i in range(3)]  # parameters
    for mode in ("partial", "full"):
        for value in values:
            want = masking._mask_text(value.decode("utf-8", "replace"), mode)
            assert mask_uri(value, mode) == want
            assert masking._MEMOS[mode].get(value) == want, value
            assert mask_uri(value, mode) == want


def test_numbers_in_other_scripts_and_with_unicode_separators_are_masked():
    """The rules read ASCII: a display-name number grouped with no-break or thin spaces, written
    in Arabic-Indic digits or with '_' between groups, and a user part in other digits, were shown
    as is. Digits of any script, spaces and dashes are read as their ASCII forms first."""
    nbsp, thin = "\u00a0", "\u2009"
    cases = {
        f'"06{nbsp}12{nbsp}34{nbsp}56{nbsp}78" <sip:a@h>': '"** ** ** 56 78" <sip:a@h>',
        f'"+49{thin}30{thin}123{thin}4567" <sip:a@h>': '"+** ** *** 4567" <sip:a@h>',
        '"\u0661\u0662\u0663\u0664\u0665\u0666\u0667" <sip:a@h>': '"***4567" <sip:a@h>',
        '"+1_212_555_0100" <sip:a@h>': '"+*_***_***_0100" <sip:a@h>',
        '<sip:\u0664\u0669\u0663\u0660\u0661\u0662\u0663\u0664\u0665\u0666@h>': '<sip:******3456@h>',
        '"+49\u201130\u2011123456" <sip:a@h>': '"+**-**-**3456" <sip:a@h>',
    }
    for value, shown in cases.items():
        out = mask_uri(value.encode())
        assert out == shown, (value, out)  # (before: each shown as is, or all but one group)


def test_a_cut_value_never_shows_the_head_of_a_number_that_reaches_the_cut():
    """Past SHOWN_MAX characters a value is cut. The cut went back over digits and ASCII number
    separators only, so a user part like ``+1/212/...`` reaching the mark showed its first digits
    as if they were a shorter number's last four. It goes back to a delimiter now."""
    for sep in ("/", "_", "\u00a0", "x"):
        user = sep.join(["1234"] * 400)
        out = mask_uri(("<sip:" + user + "@h>").encode())
        assert "1234" not in out, (sep, out[:80])


def test_a_call_id_past_the_shown_length_shows_its_hash_only():
    digits = CallIdMasker("digits", b"k")
    long_id = b"\xff12345678" * 3000  # 27 KB, not ASCII: the slow path before
    assert digits(long_id) == CallIdMasker("hash", b"k")(long_id)
    assert digits(b"4930123456@gw").startswith("******3456@gw~")
    # the usual shape (ASCII, no number in it), shown as it is up to the mark, was shown whole past it
    for n in (SHOWN_MAX + 1, 60_000):
        plain = (b"abc-" * n)[:n]
        assert digits(plain) == CallIdMasker("hash", b"k")(plain) and len(digits(plain)) < 40
    edge = (b"abc-" * 300)[:SHOWN_MAX]
    assert digits(edge) == edge.decode()


# What a terminal or log viewer acts on or reorders, written out here rather than taken from the
# code: DEL, the C1 controls (U+009B is an 8-bit CSI), the Arabic letter mark, LRM/RLM, the line
# and paragraph separators, the bidi embeddings/overrides and isolates.
_VIEWER_UNSAFE = {chr(c) for c in (0x7F, *range(0x80, 0xA0), 0x061C, 0x200E, 0x200F, 0x2028, 0x2029,
                                   0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069)}
_hostile_text = st.text(alphabet=st.sampled_from(sorted(_VIEWER_UNSAFE) + list("ab1@ é\"\\\x1b\n")), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_hostile_text, _hostile_text, _hostile_text, st.booleans())
def test_log_lines_carry_no_character_a_terminal_would_act_on(cid, name, msg, masked):
    """A Call-ID, a display name or an exception's text from the wire may hold C1 controls or
    bidi overrides; JSON encoders escape only C0, so they reached log lines as they were (an 8-bit
    CSI to a terminal, text shown in another order by a log viewer). Both writers of a line: the
    summary's C writer and the generic record."""
    buf = io.BytesIO()
    log = JsonLog("svc", stream=buf, call_id_mask=CallIdMasker("digits", b"k") if masked else None)
    call = _Call(call_id=cid.encode())
    call.from_uri = f'"{name}" <sip:alice@gw>'.encode()
    log.call_summary(call)
    log.info(msg, "e", detail={"k": name})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert not set(line.decode("utf-8")) & _VIEWER_UNSAFE, line
    summary, rec = orjson.loads(lines[0]), orjson.loads(lines[1])
    if not masked:
        assert summary["call_sid"] == cid
    assert rec["message"] == msg and rec["detail"] == {"k": name}
    hep_log = summary_record(call)  # the same summary, sent to Homer as a HEP LOG
    assert not set(hep_log.decode("utf-8")) & _VIEWER_UNSAFE and orjson.loads(hep_log)["call_sid"] == cid
