"""The C masking of a plain From/To (``_sipscan.mask_name_addr``) changes nothing but the cost.

``masking._mask_remembered`` asks the C helper first for the usual From/To shape and takes its
Python path (one regex match, then ``_mask_digits``) without it. Values are built from pieces that
sit on every edge of that shape (digits, ':' and '<' in display names, other schemes, separators
and parameters in user parts, hosts with ';', '?' or '@', tags with and without what ends their
safe shape, CR/LF, bytes that are not ASCII) and each is masked both ways. The rule for the digits
of a user part is checked on its own against the rule as the masking documents it.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from sipwatch import masking
from sipwatch.sipmsg import _sipscan

c_mask = masking._c_mask_name_addr
needs_c = pytest.mark.skipif(_sipscan is None, reason="the C extension sipwatch._sipscan is not built")

# each part of a name-addr: pieces that keep the plain shape, pieces that may break it, and how
# many pieces at most
PARTS = [
    ([b'"Caller"', b"Caller", b" ", b'"', b",", b";", b"@", b">", b"\r\n", b"\t"],
     [b"7", b"+49 30 123", b":", b"<", b"sip:x", b"\xc3\xbc", b"\xff"], 3),  # display name
    ([b"<"], [b"", b"<<"], 1),
    ([b"sip:", b"SIPS:", b"sIp:", b"sips:"], [b"tel:", b"sipx:", b"si:", b"sip", b"sips;", b"\xc5\xbfip:"], 1),
    ([b"+", b"49", b"30", b"1234", b"4930123451234", b"5", b"-", b".", b" ", b"(", b")", b"alice", b"%20",
      b":pw", b"\r\n", b"<", b"?", b"&", b","], [b";isub=1", b">", b"\x80", b"@"], 6),  # user part
    ([b"@"], [b"", b"@@"], 1),
    ([b"127.0.0.1", b":5061", b"gw.example.com", b"[2001:db8::1]", b"\r", b"1", b"<", b","],
     [b";transport=udp", b"?h=1", b"@", b"\xc3\xa9", b">"], 3),  # host and port
    ([b">"], [b"", b">>"], 1),
    ([b";tag=", b"abc", b"1SIPpTag001", b"123", b"\r\n", b" ", b"=", b">", b"<sip:4930123456@b>"],
     [b";TAG=", b";tag", b";", b"?", b"&", b",", b"\xff", b";cpc=123"], 4),  # tag
]


@st.composite
def name_addr(draw):
    """A From/To-like value in the plain shape, or with one piece that may break it put into one
    or two of its parts (or any bytes at all, now and then)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=40))
    # the parts with most edges (user part, host and port, tag) more often
    edgy = draw(st.one_of(st.just(set()), st.sets(st.sampled_from([*range(len(PARTS)), 3, 5, 7, 7, 7]),
                                                  min_size=1, max_size=2)))
    out = []
    for i, (fit, edge, most) in enumerate(PARTS):
        if most == 1:
            out.append(draw(st.sampled_from(edge if i in edgy else fit)))
            continue
        if i == len(PARTS) - 1:  # no tag, or one ';tag=' and what a tag may hold
            part = [draw(st.sampled_from([b";tag=", b""]))] + draw(st.lists(st.sampled_from(fit[1:]), max_size=most))
        else:
            part = draw(st.lists(st.sampled_from(fit), max_size=most))
        if i in edgy:
            part.insert(len(part) - draw(st.integers(0, len(part))), draw(st.sampled_from(edge)))
        out.extend(part)
    return b"".join(out)


def python_branch(value: bytes, full: bool):
    """What ``_mask_remembered`` makes of the shape without the C helper: the regex, then
    ``_mask_digits`` of the user part; None where that branch does not apply."""
    m = masking._PLAIN_NAME_ADDR.fullmatch(value)
    if m is None or not value.isascii():
        return None
    text = value.decode("ascii")
    start, end = m.span(3)
    return text[:start] + ("***" if full else masking._mask_digits(text[start:end])) + text[end:], m.start(5)


def digits_as_documented(s: str) -> str:
    """The number rule of the masking's docs for an ASCII text: fewer than 3 digits stay, 3-4 are
    all masked, of more every digit but the last four becomes '*'."""
    n = sum(c in "0123456789" for c in s)
    hide = 0 if n < 3 else n if n <= 4 else n - 4
    out = []
    for c in s:
        if hide and c in "0123456789":
            out.append("*")
            hide -= 1
        else:
            out.append(c)
    return "".join(out)


def forget():
    for memos in (masking._MEMOS, masking._HEAD_MEMOS):
        for memo in memos.values():
            memo.clear()


def test_the_c_helper_is_the_one_in_use_when_the_extension_is_built():
    # a stale build of the extension (without mask_name_addr) would silently take the long way
    assert (c_mask is not None) == (_sipscan is not None)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-. ()/;=abc*", max_size=24))
def test_the_digits_of_an_ascii_user_part_are_masked_as_documented(user):
    assert masking._mask_digits(user) == digits_as_documented(user)


@needs_c
def test_plain_values_masked_as_worked_out_by_hand():
    cases = {
        b'"Caller" <sip:+4930123451234@127.0.0.1:5061>;tag=1SIPpTag01':
            ('"Caller" <sip:+*********1234@127.0.0.1:5061>;tag=1SIPpTag01', 44),
        b"<SIPS:4930123456@gw>": ("<SIPS:******3456@gw>", -1),
        b"<sip:1-2-3-4-5-6@gw>;tag=": ("<sip:*-*-3-4-5-6@gw>;tag=", 20),
        b"<sip:123@gw>": ("<sip:***@gw>", -1),
        b"<sip:12@gw>": ("<sip:12@gw>", -1),
        b"<sip:@gw>": ("<sip:@gw>", -1),
        b"\r\n<sip:a\r\nb@g\r\n>;tag=\r\n": ("\r\n<sip:a\r\nb@g\r\n>;tag=\r\n", 16),
    }
    for value, want in cases.items():
        assert c_mask(value, False) == want, value
    assert c_mask(b"<sip:+4930123456@gw>;tag=1", True) == ("<sip:***@gw>;tag=1", 20)
    for other in (b"<tel:+4930123456@gw>", b"<sip:1@gw>;TAG=1", b"<sip:1@gw>;tag=1;x", b"<sip:1@gw>;tag=1,",
                  b"1 <sip:1@gw>", b"a:b <sip:1@gw>", b"<sip:1;x@gw>", b"<sip:1@gw;lr>", b"<sip:1@gw?h=1>",
                  b"<sip:1@g@w>", b"<sip:1@gw", b"<sip:1@gw>>", b"<sip:1@gw> ", b'"M\xc3\xbcller" <sip:1@gw>',
                  b"<sip:1@gw>;tag=\xff", b"", b"<", b"<sip", b"<sips", b"<sip:", b"<sip:1"):
        assert c_mask(other, False) is None, other
        assert c_mask(other, True) is None, other


@needs_c
@settings(max_examples=400, deadline=None)
@given(name_addr())
def test_the_c_helper_answers_as_the_python_branch(value):
    for full in (False, True):
        got = c_mask(value, full)
        assert got == python_branch(value, full), (value, full)
        if got is not None and not full:
            # the user part with every digit but the last four hidden, the rest as it is
            m = masking._PLAIN_NAME_ADDR.fullmatch(value)
            start, end = m.span(3)
            assert got[0][start:end] == digits_as_documented(value[start:end].decode("ascii"))


@needs_c
def test_the_c_helper_answers_as_the_python_branch_on_many_mixed_values():
    """The same comparison on many more values, every piece equally likely (hypothesis favours
    the first ones): a fixed seed, so a failure shows again."""
    rng = random.Random(7)
    for _ in range(20_000):
        value = b""
        for fit, edge, most in PARTS:
            count = 1 if most == 1 else rng.randint(0, most)
            edgy = rng.random() < 0.15
            value += b"".join(rng.choice(fit + edge if edgy else fit) for _ in range(count))
        if rng.random() < 0.5 and value.count(b";tag=") == 1:  # a tag that comes with an odd byte
            value += rng.choice(PARTS[-1][1])
        for full in (False, True):
            assert c_mask(value, full) == python_branch(value, full), (value, full)


@needs_c
@pytest.mark.pure_python
@settings(max_examples=250, deadline=None)
@given(name_addr(), st.binary(max_size=6))
def test_mask_uri_answers_the_same_with_and_without_the_c_helper(value, new_tag):
    """Both ways through the memos: the value, the same again (remembered), and the value with
    another tag after it (a caller's next call, from the remembered head when there is one)."""
    calls = [(mode, v) for mode in ("partial", "full") for v in (value, value, value + b";tag=" + new_tag)]
    answers = []
    for helper in (c_mask, None):
        masking._c_mask_name_addr = helper  # (module-level; restored below)
        try:
            forget()
            answers.append([masking.mask_uri(v, mode) for mode, v in calls])
        finally:
            masking._c_mask_name_addr = c_mask
            forget()
    assert answers[0] == answers[1]
    # and each answer is what the general path makes of the whole text, memos or not
    assert answers[0] == [masking._mask_text(v.decode("utf-8", "replace"), mode) for mode, v in calls]
