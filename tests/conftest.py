"""Shared test configuration.

With SIPWATCH_REQUIRE_TOOLS=1 (``.ci/run`` sets it) a skipped test counts as a failure: a
green CI run then always means SIPp, tshark, promtool and friends really ran.
"""
from __future__ import annotations

import os

import pytest

REQUIRE_TOOLS = os.environ.get("SIPWATCH_REQUIRE_TOOLS") == "1"


def pytest_sessionstart(session):
    """Under tests/test_compiled.py the core modules must really be the compiled ones, with the C
    header scan, the C span assembly and the C UDP pump in use; with SIPWATCH_NO_C=1 all must really be off."""
    if os.environ.get("SIPWATCH_EXPECT_COMPILED") == "1":
        from compiled import config, is_compiled
        import importlib
        for path in config()["modules"]:
            name = path.removesuffix(".py").replace("/", ".")
            mod = importlib.import_module(name)
            assert is_compiled(mod), f"{name} imported from {mod.__file__}, not the compiled build"
        if os.environ.get("SIPWATCH_NO_C") != "1":
            from sipwatch import _sipscan, sipmsg
            assert sipmsg._c_split is _sipscan.split, "the compiled build runs without its C header scan"
            assert os.path.dirname(_sipscan.__file__) == os.path.dirname(sipmsg.__file__), _sipscan.__file__
            from sipwatch import _otlpenc, otlp_encode
            assert otlp_encode._otlpenc is _otlpenc, "the compiled build runs without its C span assembly"
            from sipwatch import _udppump, transport
            assert transport._udppump is _udppump, "the compiled build runs without its C UDP pump"
    sanitized = os.environ.get("SIPWATCH_EXPECT_EXTENSIONS_FROM")
    # (tests/fuzz/sanitize.sh: the tests that call them in process load its build too; a pytest
    # started with SIPWATCH_NO_C=1 from one of them uses none of them, wherever they lie)
    if sanitized and os.environ.get("SIPWATCH_NO_C") != "1":
        from sipwatch import _hepenc, _otlpenc, _sipscan, _udppump
        for mod in (_sipscan, _otlpenc, _udppump, _hepenc):
            assert mod.__file__.startswith(sanitized), f"{mod.__name__} imported from {mod.__file__}, not {sanitized}"
    if os.environ.get("SIPWATCH_NO_C") == "1":
        from sipwatch import sipmsg
        assert sipmsg._c_split is None, "SIPWATCH_NO_C=1, yet the parser uses the C header scan"
        from sipwatch import otlp_encode
        assert otlp_encode._otlpenc is None, "SIPWATCH_NO_C=1, yet spans are assembled in C"
        from sipwatch import transport
        assert transport._udppump is None, "SIPWATCH_NO_C=1, yet the UDP edge uses the C pump"
        from sipwatch import masking
        assert masking._c_mask_name_addr is None, "SIPWATCH_NO_C=1, yet masking uses the C helper"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if REQUIRE_TOOLS and rep.skipped and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else rep.longrepr
        rep.longrepr = f"skipped, but SIPWATCH_REQUIRE_TOOLS=1 forbids skips: {reason}"
