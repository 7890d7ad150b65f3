"""Build hook.

Every build compiles ``sipwatch/_sipscan.c`` (the C scan of the common message head that
``sipmsg.parse`` tries first) and ``sipwatch/_otlpenc.c`` (the span worker's assembly of the common
spans, over ``otlp_encode.SpanEncoder``'s caches), ``sipwatch/_udppump.c`` (the UDP edge's
receive loop: recvmmsg, the core call, the sends) and ``sipwatch/_hepenc.c`` (the HEP sender's
packets and correlation ids) and ``sipwatch/_hugeheap.c`` (pymalloc's arenas on huge pages); see those files for why they exist. All are
optional: without a C compiler the install still succeeds and the Python paths do the work.

With ``SIPWATCH_MYPYC=1`` the per-datagram modules listed in pyproject.toml
(``[tool.sipwatch.mypyc]``) are compiled to C extensions by mypyc as well; without it they stay pure
Python. Compiling them needs mypy and a C compiler in the build environment:
``pip install mypy && SIPWATCH_MYPYC=1 pip install --no-build-isolation .``."""
import os
import tomllib

from setuptools import Extension, setup

C_EXTENSIONS = [Extension("sipwatch._sipscan", ["sipwatch/_sipscan.c"], optional=True),
                Extension("sipwatch._otlpenc", ["sipwatch/_otlpenc.c"], optional=True),
                Extension("sipwatch._udppump", ["sipwatch/_udppump.c"], optional=True),
                Extension("sipwatch._hepenc", ["sipwatch/_hepenc.c"], optional=True),
                Extension("sipwatch._hugeheap", ["sipwatch/_hugeheap.c"], optional=True)]

ext_modules = list(C_EXTENSIONS)
if os.environ.get("SIPWATCH_MYPYC") == "1":
    from mypyc.build import mypycify

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["sipwatch"]["mypyc"]
    ext_modules += mypycify([*cfg["flags"], *cfg["modules"]], opt_level="3")

setup(ext_modules=ext_modules)
