"""The compiled build of sipwatch for the tests and the bench.

``build()`` copies ``sipwatch/`` into a directory under ``build/mypyc/`` and compiles there the
modules pyproject.toml lists under ``[tool.sipwatch.mypyc]``, with the same flags setup.py uses for
the image, next to the C extensions every install builds (:data:`C_EXTENSIONS`: the header scan
``sipwatch/_sipscan.c``, the span assembly ``sipwatch/_otlpenc.c`` and the UDP pump
``sipwatch/_udppump.c``, and the HEP and heap modules). Put that directory first on ``PYTHONPATH`` to run the compiled build (the test harness
passes ``SIPWATCH_TREE`` on to the sidecars it starts). A build is reused while the sources, the
module list and the interpreter are unchanged.

``python -m tests.compiled`` builds it and prints the directory.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["sipwatch"]["mypyc"]


def _digest(cfg: dict) -> str:
    h = hashlib.sha256(repr((cfg, sys.version, sys.executable)).encode())
    for path in sorted((ROOT / "sipwatch").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".so":
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build(base: Path | None = None) -> Path:
    """The directory holding the compiled ``sipwatch`` package (built now if it is not there).

    One build at a time: ``make test`` starts one in the background while the fuzz run and the
    first tests go on (it takes over a minute), and a test that needs the build meanwhile waits
    for it here instead of building the same tree beside it."""
    cfg = config()
    top = base or ROOT / "build" / "mypyc"
    tree = top / _digest(cfg)
    if (tree / ".built").exists():
        return tree
    top.mkdir(parents=True, exist_ok=True)
    with open(top / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file is closed)
        if (tree / ".built").exists():
            return tree
        return _build(cfg, tree)


def _build(cfg: dict, tree: Path) -> Path:
    if tree.exists():
        shutil.rmtree(tree)
    shutil.copytree(ROOT / "sipwatch", tree / "sipwatch",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    r = subprocess.run([sys.executable, "-m", "mypyc", *cfg["flags"], *cfg["modules"]], cwd=tree,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"mypyc failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    build_c(tree)
    missing = [m for m in cfg["modules"] if not _extension_of(tree / m)]
    if missing:
        raise RuntimeError(f"mypyc built no extension for {missing}:\n{r.stdout[-2000:]}")
    (tree / ".built").write_text("ok\n")
    return tree


# the optional C extensions of setup.py: module name -> source
C_EXTENSIONS = {"sipwatch._sipscan": "sipwatch/_sipscan.c", "sipwatch._otlpenc": "sipwatch/_otlpenc.c",
                "sipwatch._udppump": "sipwatch/_udppump.c", "sipwatch._hepenc": "sipwatch/_hepenc.c",
                "sipwatch._hugeheap": "sipwatch/_hugeheap.c"}

_C_BUILD = """
import sys
from setuptools import Extension, setup
names, sources = sys.argv[3::2], sys.argv[4::2]
setup(name="sipwatch-c", script_args=["-q", "build_ext", "--build-lib", sys.argv[1], "--build-temp", sys.argv[2]],
      ext_modules=[Extension(n, [s]) for n, s in zip(names, sources)])
"""


def build_c(dest: Path) -> list[Path]:
    """Compile the C extensions (:data:`C_EXTENSIONS`) into ``dest/sipwatch/`` as setup.py does in
    an install (``CFLAGS`` from the environment apply, e.g. a sanitizer build). Runs outside the
    checkout so that setuptools does not read pyproject.toml. ``python -m tests.compiled --c``
    builds them into the checkout itself, for a run of the pure-Python tests with them."""
    args = [x for name, src in C_EXTENSIONS.items() for x in (name, str(ROOT / src))]
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", _C_BUILD, str(dest.resolve()), tmp, *args], cwd=tmp,
                           capture_output=True, text=True)
    exts = [_extension_of(dest / (name.replace(".", "/") + ".py")) for name in C_EXTENSIONS]
    if r.returncode != 0 or None in exts:
        raise RuntimeError(f"building the C extensions failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return exts  # type: ignore[return-value]


def _extension_of(source: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        ext = source.with_suffix(suffix)
        if ext.exists():
            return ext
    return None


def is_compiled(module) -> bool:
    return any(str(module.__file__).endswith(s) for s in importlib.machinery.EXTENSION_SUFFIXES)


if __name__ == "__main__":
    print(*build_c(ROOT), sep="\n") if sys.argv[1:] in (["--c"], ["--sipscan"]) else print(build())
