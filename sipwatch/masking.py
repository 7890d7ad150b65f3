"""Masking of phone numbers in SIP URIs, header values and Call-IDs before they reach logs or spans.

Modes for numbers (``--mask-numbers``): ``none`` (as is), ``partial`` (default: every digit of a
number but the last 4 becomes ``*``, so support staff can still tell calls apart), ``full`` (the
whole user part becomes ``***``, every digit of a parameter ``*``).

What counts as a number:

* the user part of every ``sip:``/``sips:``/``tel:`` URI, user parameters and password included,
  also when it holds spaces or visual separators (``sip:+49 30 1234567@``, ``tel:+1-212-555-0100``);
  of a URI of another scheme in a name-addr's brackets (``<h323:+4930...@gw>``,
  ``<fax:+49-30-...>``, ``<im:...@host>``): its user, userinfo or bare number, and in its other
  parts but hosts, numbers of 5 or more digits (a URI of another scheme without brackets is text,
  masked as a display name is);
* the value of every URI or header parameter (``;cpc=``, ``;isub=``, ``;phone-context=``,
  ``;rn=``, ...) except the ones that carry hosts or protocol tokens (``tag``, ``branch``,
  ``maddr``, ``received``, ``transport``, ...);
* a number of 5 or more digits (separators allowed) in a display name.

Hosts and ports are never touched. Call-IDs (``--mask-call-id``) are masked apart, so that they
stay joinable: see :class:`CallIdMasker`. Everything here runs off the hot path, on finished
records, and costs time linear in the input (no regex backtracking on adversarial text).
"""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from typing import Callable, Final

from .sipmsg import _sipscan

MODES = ("none", "partial", "full")
CALL_ID_MODES = ("none", "digits", "hash")

# start of a URI: scheme, case-insensitive
_SCHEME = re.compile(r"(?i)\b(sips?:|tel:)")
# any other scheme (RFC 3986), where a name-addr's brackets open or a value starts: h323:, im:,
# fax:, callto: ... carry numbers as well
_OTHER_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
# a bare number where an opaque URI's host would be: digits and visual separators only
_BARE_NUMBER = re.compile(r"\+?[0-9\-. ()/]+")
# what a host[:port] may look like (with _looks_like_host: a letter, or an IPv4 address)
_HOSTPORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::[0-9]{1,5})?")
# a number in a display name: optional +, digits, visual separators between digits (on a text
# whose digits, spaces and dashes of any script were made ASCII first: see _fold)
_DISPLAY_NUMBER = re.compile(r"\+?\d(?:[\-. ()/_\[\]]*\d)*")
_NO_DIGITS = str.maketrans("", "", "0123456789")
# separators of URI/header parameters and URI headers, kept in the split
_PARAM_SEPARATORS = re.compile(r"([;?&])")
# bytes that end a ``;tag=`` value's safe shape (another parameter, a URI header, another value)
_NOT_IN_TAG = re.compile(rb"[;?&,]")
# the usual From/To: a display name without digits or ':', ``<sip:user@host[:port]>``, at most a
# tag after it (no quantifier overlaps the next one: one pass, no backtracking)
_PLAIN_NAME_ADDR = re.compile(rb"([^:<0-9]*)<((?i:sips?):)([^;@>]*)@([^;?@>]*)>(;tag=[^;?&,]*)?")
_STARS = str.maketrans("0123456789", "**********")
# that shape, all ASCII, masked in one C pass (sipwatch/_sipscan.c): a caller's From is new with
# every call, and the regex, decode and slices were most of its masking. None without the C helper.
_c_mask_name_addr: Final[Callable[[bytes, bool], tuple[str, int] | None] | None] = \
    getattr(_sipscan, "mask_name_addr", None)
# a Call-ID with a run of 6+ digits (SIPp's from the 100,000th call on; most random hex ones) masked
# and its keyed hash appended in one C pass: ~3 µs a Call-ID in the regex and hashlib calls below,
# paid once by the call summary and once by the span worker
_c_mask_call_id: Final[Callable[[bytes, bytes, bytes, bool], str | None] | None] = \
    getattr(_sipscan, "mask_call_id", None)
_c_hmac_state: Final[Callable[[bytes], bytes] | None] = getattr(_sipscan, "hmac_state", None)
# on a reversed text: up to and including its fourth digit, then the non-digits before the digit
# that precedes it (the digits are ASCII 0-9 here, as in _NO_DIGITS; ``\d`` would take others)
_LAST_FOUR = re.compile(r"(?:[^0-9]*[0-9]){4}[^0-9]*")
# parameters whose values are hosts, ports or protocol tokens, never numbers of a person
_KEEP_PARAMS = frozenset((
    "tag", "branch", "maddr", "received", "rport", "ttl", "transport", "lr", "user", "method",
    "comp", "sigcomp-id", "ob", "lr", "q", "expires",
))


# str.translate table of the non-ASCII characters met so far: a decimal digit of any script to
# its ASCII digit, any space to SP, a dash to '-', the rest to itself. A number written in
# Arabic-Indic digits or grouped with no-break or thin spaces was shown as is: the rules below
# read ASCII. Bounded; past the bound a text's new characters are looked up for it alone.
_FOLD_TABLE: dict[int, int] = {}
_FOLD_MAX = 8192


def _fold_char(c: str) -> int:
    d = unicodedata.decimal(c, -1)
    if d >= 0:
        return 48 + d
    if c.isspace():
        return 32
    if unicodedata.category(c) == "Pd":
        return 45
    return ord(c)


def _fold(text: str) -> str:
    """``text`` (not ASCII) with its digits, spaces and dashes made ASCII (see _FOLD_TABLE)."""
    table = _FOLD_TABLE
    extra: dict[int, int] | None = None
    for c in set(text):
        cp = ord(c)
        if cp > 127 and cp not in table:
            if len(table) < _FOLD_MAX:
                table[cp] = _fold_char(c)
            else:
                if extra is None:
                    extra = dict(table)
                extra[cp] = _fold_char(c)
    return text.translate(table if extra is None else extra)


def _as_masked(kept: str) -> str:
    """A part kept as it is (a tag), as the general path shows it: folded (see _fold)."""
    return kept if kept.isascii() else _fold(kept)


def _digit_count(s: str) -> int:
    return len(s) - len(s.translate(_NO_DIGITS))


def _mask_digits(s: str) -> str:
    """All digits but the last four become '*'; 3-4 digits are all masked, fewer left alone."""
    if s.isascii():
        # the common number, ASCII digits with an optional '+': no scan for the cut needed
        body = s[1:] if s.startswith("+") else s
        if body.isdigit():
            n = len(body)
            if n < 3:
                return s
            if n <= 4:
                return s[:len(s) - n] + "*" * n
            return s[:len(s) - n] + "*" * (n - 4) + body[n - 4:]
    n = _digit_count(s)
    if n < 3:
        return s
    if n <= 4:
        return s.translate(_STARS)
    # the cut: just before the non-digits that precede the fourth digit from the end, which is
    # just after the digit that leaves four (one C-level match over the reversed text)
    m = _LAST_FOUR.match(s[::-1])  # (always matches here: there are more than four digits)
    cut = len(s) - (m.end() if m is not None else 0)
    return s[:cut].translate(_STARS) + s[cut:]


def _mask_value(s: str, mode: str) -> str:
    """A parameter value: digits masked like a number (``full``: every digit)."""
    if mode == "full":
        return s.translate(_STARS)
    return _mask_digits(s)


def _mask_params(s: str, mode: str, bare: bool = False) -> str:
    """``;name=value;...`` (and ``?h=v&...`` URI headers): each value masked on its own; with
    ``bare``, the numbers of five digits or more in the parts without a value too (what follows
    the head of a URI of another scheme: a path, ``;params``, ``?headers``)."""
    if not s or len(s.translate(_NO_DIGITS)) == len(s):  # no digit, nothing to mask
        return s
    out = []
    for part in _PARAM_SEPARATORS.split(s):
        name, eq, value = part.partition("=")
        if eq and value and name.strip().lower() not in _KEEP_PARAMS:
            part = name + eq + _mask_value(value, mode)
        elif bare and not eq:
            part = _mask_display(part, mode)
        out.append(part)
    return "".join(out)


def _cut_at(s: str, chars: str, start: int = 0) -> int:
    """Where the first of ``chars`` is in ``s`` from ``start`` on, else its length."""
    cut = len(s)
    for ch in chars:
        i = s.find(ch, start)
        if 0 <= i < cut:
            cut = i
    return cut


def _mask_user(user: str, mode: str) -> str:
    """The user part of a URI with its user parameters (``+4930123;isub=55;phone-context=+49``)."""
    if mode == "full":
        number, sep, params = user.partition(";")
        return "***" + (sep + _mask_params(params, mode) if sep else "")
    number, sep, params = user.partition(";")
    return _mask_digits(number) + (sep + _mask_params(params, mode) if sep else "")


def _mask_hostport_params(rest: str, mode: str) -> str:
    """``host[:port][;params][?headers]``: host and port kept, parameter values masked."""
    cut = _cut_at(rest, ";?")
    return rest[:cut] + _mask_params(rest[cut:], mode)


def _mask_one_uri(scheme: str, uri: str, mode: str) -> str:
    """One URI without its scheme (``uri``), up to its end ('>' or the end of the value)."""
    if scheme.lower() == "tel:":
        return _mask_user(uri, mode)
    at = uri.rfind("@")
    if at >= 0:
        return _mask_user(uri[:at], mode) + "@" + _mask_hostport_params(uri[at + 1:], mode)
    # no user part: a host, or a bare number some peers put where the host goes
    head = uri[:_cut_at(uri, ";?")]
    host = head.strip()
    if host.startswith("+") or (_digit_count(host) >= 5 and not _looks_like_host(host)):
        return _mask_user(head, mode) + _mask_params(uri[len(head):], mode)
    return _mask_hostport_params(uri, mode)


def _looks_like_host(h: str) -> bool:
    """An IP literal or a name with a letter: not a number."""
    if h.startswith("["):
        return True
    name = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    if any(c.isalpha() for c in name):
        return True
    parts = name.split(".")
    return len(parts) == 4 and all(p.isdigit() and len(p) <= 3 for p in parts)


def _mask_display(display: str, mode: str) -> str:
    if _digit_count(display) < 5:  # no number of five digits or more can be in it
        return display

    def number(m):
        s = m.group(0)
        if _digit_count(s) < 5:
            return s
        return "***" if mode == "full" else _mask_digits(s)
    return _DISPLAY_NUMBER.sub(number, display)


# masked values of recent header values, per mode: the To and Request-URI of a service repeat from
# call to call, and so does a caller's From up to its tag. Bounded: emptied when full; values
# longer than _MEMO_MAX_KEY bytes are never kept.
_MEMO_SIZE = 4096
_MEMO_MAX_KEY = 256
_MEMOS: dict[str, dict[bytes, str]] = {"partial": {}, "full": {}}
# masked heads of values that end in a ``;tag=`` (everything before the last one), for which the
# value masks to the masked head plus the tag as it is whenever the tag holds none of ``;?&,`` (see
# _mask_remembered): a caller's From comes back with a new tag every call. Bounded as _MEMOS.
_HEAD_MEMOS: dict[str, dict[bytes, str]] = {"partial": {}, "full": {}}


def mask_uri(value, mode: str = "partial") -> str:  # bytes, str or None (anything else: str() of it)
    """Mask numbers in every SIP/tel URI of a header value (display name, user part, parameters)."""
    if type(value) is bytes and len(value) <= _MEMO_MAX_KEY:
        memo = _MEMOS.get(mode)
        if memo is not None:
            out = memo.get(value)
            return out if out is not None else _mask_remembered(value, mode, memo)
    if value is None:
        return ""
    text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
    if mode == "none":
        return text
    if mode not in MODES:
        raise ValueError(f"unknown masking mode {mode!r} (expected one of {', '.join(MODES)})")
    if len(text) > SHOWN_MAX:
        return _mask_cut(text, mode)
    return _mask_text(text, mode)


# characters of a header value that are masked and shown; the rest is counted, not shown. Masking
# is linear but costs 100-300 ns a character on hostile shapes: a 60 KB From of ';x=1' user
# parameters took 9 ms in the compiled build, ~150x what forwarding its datagram costs (0.06 ms),
# and a call summary masks From, To and Request-URI on the proxy's loop under --no-tracing (and
# whenever the span worker hands summaries back); cut here, 0.3 ms. Real values are well under.
SHOWN_MAX = 1024
# where a value may be cut: characters that end a user part, a parameter or a display name's
# token. A user part's number may hold any other character between its digits (they are all
# masked but the last four), so the cut goes back to one of these (see _mask_cut)
_CUT_AFTER: Final = frozenset('@;:<>,?&="\'')


def _mask_cut(text: str, mode: str) -> str:
    """A value longer than SHOWN_MAX: its first SHOWN_MAX characters masked, cut just after the
    last delimiter before the mark (a number that reaches the cut, its middle digits shown as if
    they were its last four, would be a leak: it was cut before the digits and ASCII separators
    only, so ``+1/212/...`` or a no-break space showed its head), then ``...`` and how many
    characters were left out."""
    cut = SHOWN_MAX
    while cut > 0 and text[cut - 1] not in _CUT_AFTER:
        cut -= 1
    return _mask_text(text[:cut], mode) + "...[+%d chars]" % (len(text) - cut)



def _mask_remembered(value: bytes, mode: str, memo: dict[bytes, str]) -> str:
    """``value`` masked, through ``memo`` (which does not hold it yet).

    The plain From/To shape is masked in one pass (the C helper, else one regex match).
    Otherwise a value that ends in ``;tag=`` (a From or a To with its dialog's tag) is remembered
    without its tag when the tag provably takes no part in the masking: it sits in the header
    parameters after the one name-addr (a display name without ':', then ``<...>``, no ',' after
    the '>') and holds none of ``;?&,``. The general path then masks the parameters after the
    '>' one by one and keeps a ``tag`` as it is, so the value masks to its masked head plus the
    tag. Each ASCII byte decodes to itself (an invalid UTF-8 sequence never takes one in), so
    searches on the bytes find what searches on the decoded text would, and the parts decode as
    the whole does."""
    heads = _HEAD_MEMOS[mode]
    cut = value.rfind(b";tag=")
    head = b""
    if cut > 0:
        head = value[:cut]  # (kept: its hash is not computed twice when the head is remembered below)
        masked = heads.get(head)
        if masked is not None and _NOT_IN_TAG.search(value, cut + 5) is None:
            return masked + _as_masked(value[cut:].decode("utf-8", "replace"))
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    if len(heads) >= _MEMO_SIZE:
        heads.clear()
    # the shape below, all ASCII: every part decodes to itself, so the value is its text with the
    # user part masked; and where the tag starts (-1: none)
    plain: tuple[str, int] | None = None
    m: re.Match[bytes] | None = None
    if _c_mask_name_addr is not None:
        plain = _c_mask_name_addr(value, mode != "partial")
    else:
        m = _PLAIN_NAME_ADDR.fullmatch(value)
        if m is not None and value.isascii():
            text = value.decode("ascii")
            start, end = m.span(3)
            plain = (text[:start] + (_mask_digits(text[start:end]) if mode == "partial" else "***") + text[end:],
                     m.start(5))
    if plain is not None:
        out, tag_at = plain
        # a value with its tag is remembered whole too: it comes back once more (the span worker
        # masks a call's From for its spans and again for its summary line), and a caller whose
        # number changes with every call never hits the heads
        memo[value] = out
        if tag_at >= 0:  # the tag is the last ";tag=" (no ';' in it: tag_at is cut) and stays as it is
            heads[head if tag_at == cut else value[:tag_at]] = out[:len(out) - (len(value) - tag_at)]
        return out
    if cut > 0 and _NOT_IN_TAG.search(value, cut + 5) is None:
        lt = value.find(b"<", 0, cut)
        gt = value.find(b">", lt + 1, cut) if lt >= 0 else -1
        if gt >= 0 and value.find(b":", 0, lt) < 0 and value.find(b",", gt + 1, cut) < 0:
            masked = heads[value[:cut]] = _mask_text(value[:cut].decode("utf-8", "replace"), mode)
            out = memo[value] = masked + _as_masked(value[cut:].decode("utf-8", "replace"))
            return out
    out = memo[value] = _mask_text(value.decode("utf-8", "replace"), mode)
    return out


def _mask_bracketed(inner: str, mode: str) -> str:
    """``<`` and what a name-addr's brackets hold: a URI (after any blanks a lax peer put there),
    or something else, whose numbers of five digits or more are masked (``<+4930123456>``)."""
    lead = len(inner) - len(inner.lstrip(" \t"))
    if lead:
        return "<" + inner[:lead] + _mask_bracketed(inner[lead:], mode)[1:]
    sm = _SCHEME.match(inner)
    if sm:
        return "<" + sm.group(1) + _mask_one_uri(sm.group(1), inner[sm.end():], mode)
    om = _OTHER_SCHEME.match(inner)
    if om:
        return "<" + om.group(0) + _mask_other_uri(inner[om.end():], mode)
    return "<" + _mask_params(inner, mode, True)


def _mask_other_uri(uri: str, mode: str) -> str:
    """A URI of another scheme without its scheme (``h323:``, ``im:``, ``pres:``, ``mailto:``,
    ``fax:``, ``callto:``, ``http:``...): the user of its ``user@host`` (or the userinfo of its
    ``//authority``) masked as a SIP URI's user part is, a bare number (``fax:+49-30-1234567``)
    too, and in every other part (a host that is not one, a path, an opaque part) any number of
    five digits or more, as in a display name; hosts and IP addresses kept, parameter values
    masked as everywhere."""
    if uri.startswith("//"):
        end = _cut_at(uri, "/?#;", 2)
        at = uri.rfind("@", 2, end)
        auth = ("//" + _mask_user(uri[2:at], mode) + "@" + _mask_unless_host(uri[at + 1:end], mode) if at >= 0
                else "//" + _mask_unless_host(uri[2:end], mode))
        return auth + _mask_params(uri[end:], mode, True)
    cut = _cut_at(uri, ";?")
    head, rest = uri[:cut], _mask_params(uri[cut:], mode, True)
    at = head.rfind("@")
    if at >= 0:
        return _mask_user(head[:at], mode) + "@" + _mask_unless_host(head[at + 1:], mode) + rest
    bare = head.strip()
    if _digit_count(bare) >= 5 and _BARE_NUMBER.fullmatch(bare) and not _looks_like_host(bare):
        return _mask_user(head, mode) + rest
    return _mask_unless_host(head, mode) + rest


def _mask_unless_host(s: str, mode: str) -> str:
    """``s`` as it is when it is a host (an IP literal or a name with a letter, a port after it),
    else with its numbers of five digits or more masked."""
    return s if not s or (_HOSTPORT.fullmatch(s) and _looks_like_host(s)) else _mask_display(s, mode)


def _unquoted(text: str) -> str:
    """``text`` with the inside of every quoted string (RFC 3261: backslash escapes) replaced by
    ``x``, the same length: where the structure (``<``, ``>``, ``,``, a scheme) is searched, so
    that a display name such as ``"Smith <Sales>"`` is not taken for the name-addr's brackets
    (the URI after it was then shown unmasked, in every mode). An unclosed quote is left as text,
    as the C pass (``_sipscan.mask_name_addr``) reads it. Linear: each quote is looked at once."""
    out: list[str] = []
    pos = 0  # text[pos:] is not copied yet
    start = 0  # where the next opening quote is looked for
    while True:
        q = text.find('"', start)
        if q < 0:
            break
        close = text.find('"', q + 1)
        while close >= 0:
            k = close
            while text[k - 1] == "\\":  # (stops at the opening quote at the latest)
                k -= 1
            if (close - k) % 2 == 0:  # an even run of backslashes before it: the closing quote
                break
            close = text.find('"', close + 1)
        if close < 0:
            break  # unclosed: left as it is
        after = close + 1
        while after < len(text) and text[after] in " \t":
            after += 1
        if not text.startswith("<", after):
            break  # not a display name (one is followed by its '<'): left as the C pass reads it
        out.append(text[pos:q + 1])
        out.append("x" * (close - q - 1))
        pos = close
        start = close + 1
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


def _mask_text(text: str, mode: str) -> str:
    """``mask_uri`` of a decoded value, ``mode`` being ``partial`` or ``full``."""
    if not text.isascii():
        text = _fold(text)
    n = len(text)
    # the searches for structure run on ``shape``: the text with quoted strings blanked
    shape = _unquoted(text) if '"' in text else text
    lt = shape.find("<")
    if lt >= 0:
        if shape.find(":", 0, lt) < 0:  # no URI before the '<': the loop below starts with this name-addr
            gt = shape.find(">", lt + 1)
            if gt >= 0 and shape.find(",", gt + 1) < 0:  # ... and ends with it: its one pass, inline
                return (_mask_display(text[:lt], mode) + _mask_bracketed(text[lt + 1:gt], mode) + ">"
                        + _mask_params(text[gt + 1:], mode, True))
    elif shape.find(",") < 0:
        sm = _SCHEME.match(shape)
        if sm:  # one addr-spec from the first character on: the loop's one pass, inline
            return sm.group(1) + _mask_one_uri(sm.group(1), text[sm.end():], mode)
    out = []
    pos = 0
    lt, m, m_done = -2, None, False
    while pos < n:
        # each search runs again only once the pos passed its hit: linear in the text
        if lt != -1 and lt < pos:
            lt = shape.find("<", pos)
        if not m_done and (m is None or m.start() < pos):
            m = _SCHEME.search(shape, pos)
            m_done = m is None
        if lt >= 0 and (m is None or lt < m.start()):
            # name-addr: display name, then <URI>, then header parameters up to ',' or the end
            out.append(_mask_display(text[pos:lt], mode))
            gt = shape.find(">", lt + 1)
            end = n if gt < 0 else gt
            out.append(_mask_bracketed(text[lt + 1:end], mode))
            if gt < 0:
                break
            out.append(">")
            pos = gt + 1
            comma = shape.find(",", pos)
            stop = n if comma < 0 else comma
            # (bare: a second name-addr without a comma before it, which a lax peer may send, is
            # read as parameters; its numbers are masked all the same)
            out.append(_mask_params(text[pos:stop], mode, True))
            pos = stop
            if comma >= 0:
                out.append(",")
                pos += 1
        elif m is not None:
            # addr-spec without brackets: the URI runs to ',' (or the end); its ';' parameters
            # are URI or header parameters alike, both masked
            out.append(_mask_display(text[pos:m.start()], mode))
            comma = shape.find(",", m.end())
            stop = n if comma < 0 else comma
            out.append(m.group(1) + _mask_one_uri(m.group(1), text[m.end():stop], mode))
            pos = stop
            if comma >= 0:
                out.append(",")
                pos += 1
        else:
            out.append(_mask_display(text[pos:], mode))
            break
    return "".join(out)


# -- Call-IDs -------------------------------------------------------------------------------
_LONG_DIGITS = re.compile(r"\d{6,}")
# ASCII digits all become b"0" (nothing else does): a run of six or more is a find of b"000000"
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0000000000")


def _plain_call_id_py(raw: bytes) -> str | None:
    """The Call-ID as text when the digits mode shows it as it is (ASCII, no run of 6+ digits: an
    ASCII text has no other digits than 0-9), else None."""
    return raw.decode("ascii") if raw.isascii() and raw.translate(_DIGITS_AS_ZERO).find(b"000000") < 0 else None


# that check in one C scan: its two method calls in Python (translate, find) were ~5% of the live
# span worker, which shows each Call-ID twice (its spans', its summary's)
_plain_call_id: Final[Callable[[bytes], str | None]] = getattr(_sipscan, "plain_call_id", None) or _plain_call_id_py


def derive_key(secret: bytes | None, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose from the operator's secret (random when there is none)."""
    if not secret:
        return os.urandom(32)
    return hashlib.blake2b(secret, digest_size=32, person=purpose[:16]).digest()


class CallIdMasker:
    """Call-IDs as logs and spans show them, still joinable (equal in, equal out).

    * ``none``: as is.
    * ``digits`` (default with ``--mask-numbers partial/full``): runs of 6+ digits are masked like
      numbers (all but the last 4) and, only when something was masked, ``~`` plus a 16-hex keyed
      hash of the whole Call-ID is appended, so two Call-IDs that differ only in masked digits stay
      apart. Call-IDs without such runs (most UUID-style ones) are unchanged and still match the
      gateway's and signaling's own logs.
    * ``hash``: ``h-`` plus a 32-hex keyed hash of the Call-ID, nothing of it readable.

    The hash is keyed (BLAKE2b with a key derived from ``--secret``): stable across restarts with
    the same secret, per process without one, and not reversible by trying numbers without the key.
    """

    def __init__(self, mode: str = "digits", secret: bytes | None = None):
        if mode not in CALL_ID_MODES:
            raise ValueError(f"unknown Call-ID masking mode {mode!r} (expected one of {', '.join(CALL_ID_MODES)})")
        self.mode = mode
        self._key = derive_key(secret, b"sipwatch-callid")
        self._absorb_key()
        self._memo: dict[bytes, str] = {}  # raw Call-ID -> as shown, bounded as _MEMOS are

    def _absorb_key(self) -> None:
        """HMAC (RFC 2104) with the key already absorbed in its inner and outer hash: each
        Call-ID then costs copies of these two states, not a new key setup."""
        size = hashlib.blake2b().block_size
        key = self._key if len(self._key) <= size else hashlib.blake2b(self._key).digest()
        block = key.ljust(size, b"\0")
        ipad, opad = bytes(b ^ 0x36 for b in block), bytes(b ^ 0x5C for b in block)
        self._inner = hashlib.blake2b(ipad)
        self._outer = hashlib.blake2b(opad)
        # the same two states for the C pass (mask_call_id)
        self._inner_state = _c_hmac_state(ipad) if _c_hmac_state is not None else b""
        self._outer_state = _c_hmac_state(opad) if _c_hmac_state is not None else b""

    def __getstate__(self) -> dict:
        # the span worker process gets the masker pickled; hash states do not pickle, the key does
        # (and what was remembered stays behind)
        return {"mode": self.mode, "_key": self._key}

    def __setstate__(self, state: dict) -> None:
        self.mode = state["mode"]
        self._key = state["_key"]
        self._absorb_key()
        self._memo = {}

    def digest(self, call_id: bytes, size: int = 8) -> str:
        """HMAC-BLAKE2b of ``call_id`` under this masker's key, ``size`` bytes of it in hex."""
        inner = self._inner.copy()
        inner.update(call_id)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()[:size * 2]

    def __call__(self, call_id) -> str | None:  # bytes (or bytearray), str or None
        if type(call_id) is bytes:
            # the usual Call-ID, shown as it is: cheaper than remembering it (one past SHOWN_MAX
            # shows its hash alone, see _mask, even without a number in it)
            if self.mode == "digits" and len(call_id) <= SHOWN_MAX:
                shown = _plain_call_id(call_id)
                if shown is not None:
                    return shown
            # a Call-ID shows up more than once (a B2BUA leg's summary lists every leg's): remembered
            got = self._memo.get(call_id)
            if got is None:
                got = self._mask(call_id)
                if len(call_id) <= _MEMO_MAX_KEY:
                    if len(self._memo) >= _MEMO_SIZE:
                        self._memo.clear()
                    self._memo[call_id] = got
            return got
        if call_id is None:
            return None
        raw = call_id if isinstance(call_id, (bytes, bytearray)) else str(call_id).encode("utf-8", "replace")
        return self._mask(bytes(raw))

    def _mask(self, raw: bytes) -> str:
        if len(raw) > SHOWN_MAX and self.mode == "digits":
            # no real Call-ID is this long: its keyed hash alone, as ``hash`` shows it (masking
            # a 20-KB one cost 1.8 ms, ~120 summary lines' worth, twice a call)
            return "h-" + self.digest(raw, 16)
        if _c_mask_call_id is not None and self.mode != "none":
            got = _c_mask_call_id(raw, self._inner_state, self._outer_state, self.mode == "hash")
            if got is not None:
                return got
        return self._mask_py(raw)

    def _mask_py(self, raw: bytes) -> str:
        """:meth:`_mask` in Python: what the C pass does for plain ASCII, and the rest."""
        text = raw.decode("utf-8", "replace")
        mode = self.mode
        if mode == "digits":
            m = _LONG_DIGITS.search(text)
            if m is None:
                masked = text
            else:  # what _LONG_DIGITS.sub would do, without a Python callback per run
                parts = []
                pos = 0
                while m is not None:
                    parts.append(text[pos:m.start()])
                    parts.append(_mask_digit_run(m.group(0)))
                    pos = m.end()
                    m = _LONG_DIGITS.search(text, pos)
                parts.append(text[pos:])
                masked = "".join(parts)
            if masked == text and (text.isascii() or text.encode("utf-8", "replace") == raw):
                return text  # nothing masked, nothing lost in decoding: the Call-ID as is
            return masked + "~" + self.digest(raw)
        if mode == "none":
            return text
        return "h-" + self.digest(raw, 16)


def _mask_digit_run(run: str) -> str:
    """A run of 6+ digits (``\\d``: any script's) masked as a number (all but the last 4)."""
    if not run.isascii():
        run = _fold(run)  # (other scripts' digits made ASCII: _mask_digits masks those)
    return "*" * (len(run) - 4) + run[-4:]


def default_call_id_mode(mask_numbers: str) -> str:
    """``--mask-call-id`` when not given: follow ``--mask-numbers`` (``none`` keeps them as is)."""
    return "none" if mask_numbers == "none" else "digits"


def add_call_id_mask_arguments(ap) -> None:
    """``--mask-call-id`` and the key of its hash, for ``capture`` and ``analyze`` (the proxy has
    them among its own): their logs and spans show Call-IDs as the sidecar's do. The masker:
    :func:`sipwatch.config.call_id_masker`."""
    ap.add_argument("--mask-call-id", choices=CALL_ID_MODES, default=None,
                    help="Call-IDs in logs and spans: digits (default; none with --mask-numbers none), "
                         "hash or none, as the sidecar's --mask-call-id")
    ap.add_argument("--secret", default=None,
                    help="key of the Call-ID hash (prefer SIPWATCH_SECRET or --secret-file); the "
                         "sidecar's own gives the same masked Call-IDs")
    ap.add_argument("--secret-file", default=None, help="read that key from this file")

