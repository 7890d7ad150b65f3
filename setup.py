"""Build hook: with ``SIPWATCH_MYPYC=1`` the per-datagram modules listed in pyproject.toml
(``[tool.sipwatch.mypyc]``) are compiled to C extensions by mypyc; without it the package is pure
Python. Compiling needs mypy and a C compiler in the build environment:
``pip install mypy && SIPWATCH_MYPYC=1 pip install --no-build-isolation .``."""
import os
import tomllib

from setuptools import setup

ext_modules = []
if os.environ.get("SIPWATCH_MYPYC") == "1":
    from mypyc.build import mypycify

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["sipwatch"]["mypyc"]
    ext_modules = mypycify([*cfg["flags"], *cfg["modules"]], opt_level="3")

setup(ext_modules=ext_modules)
