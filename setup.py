"""Build hook.

Every build compiles ``sipwatch/_sipscan.c`` (the C scan of the common message head that
``sipmsg.parse`` tries first, see that file for why it exists). It is optional: without a C
compiler the install still succeeds and the parser takes its Python path.

With ``SIPWATCH_MYPYC=1`` the per-datagram modules listed in pyproject.toml
(``[tool.sipwatch.mypyc]``) are compiled to C extensions by mypyc as well; without it they stay pure
Python. Compiling them needs mypy and a C compiler in the build environment:
``pip install mypy && SIPWATCH_MYPYC=1 pip install --no-build-isolation .``."""
import os
import tomllib

from setuptools import Extension, setup

SIPSCAN = Extension("sipwatch._sipscan", ["sipwatch/_sipscan.c"], optional=True)

ext_modules = [SIPSCAN]
if os.environ.get("SIPWATCH_MYPYC") == "1":
    from mypyc.build import mypycify

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["sipwatch"]["mypyc"]
    ext_modules += mypycify([*cfg["flags"], *cfg["modules"]], opt_level="3")

setup(ext_modules=ext_modules)
