"""Masking of phone numbers in SIP URIs and header values before they reach logs or spans.

Modes: ``none`` (as is), ``partial`` (default: every digit of a number-like user part but the
last 4 becomes ``*``, so support staff can still tell calls apart), ``full`` (the whole user
part becomes ``***``). Only runs off the hot path, on finished-call records.
"""
from __future__ import annotations

import re

MODES = ("none", "partial", "full")

# the user part of a sip:/sips:/tel: URI: from the scheme up to '@' (sip) or ';'/'>' (tel)
_USER = re.compile(r"(?i)\b(sips?:|tel:)([^@;>\s,]+)")
# a number in a display name: 6+ digits, optional +, separators
_DISPLAY_NUMBER = re.compile(r"\+?\d[\d\-. ()]{4,}\d")
_NO_DIGITS = str.maketrans("", "", "0123456789")
_STARS = str.maketrans("0123456789", "**********")


def _mask_digits(s: str) -> str:
    """All digits but the last four become '*'; 3-4 digits are all masked, fewer left alone."""
    n = len(s) - len(s.translate(_NO_DIGITS))
    if n < 3:
        return s
    if n <= 4:
        return s.translate(_STARS)
    seen = 0
    for i, c in enumerate(s):  # cut after the digit that leaves four
        if "0" <= c <= "9":
            seen += 1
            if seen == n - 4:
                return s[:i + 1].translate(_STARS) + s[i + 1:]
    return s


def mask_uri(value: bytes | str | None, mode: str = "partial") -> str:
    """Mask the user part of every SIP/tel URI (and numbers in display names) in ``value``."""
    if value is None:
        return ""
    text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value
    if mode == "none":
        return text
    if mode == "full":
        user, number = (lambda m: m.group(1) + "***"), (lambda m: "***")
    elif mode == "partial":
        user, number = (lambda m: m.group(1) + _mask_digits(m.group(2))), (lambda m: _mask_digits(m.group(0)))
    else:
        raise ValueError(f"unknown masking mode {mode!r} (expected one of {', '.join(MODES)})")
    # a display name is whatever precedes '<'; host parts and parameters are left alone
    lt = text.find("<")
    display, rest = (text[:lt], text[lt:]) if lt > 0 else ("", text)
    return _DISPLAY_NUMBER.sub(number, display) + _USER.sub(user, rest)
