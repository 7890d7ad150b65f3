"""The spans file's pages leave the page cache a little behind its end (sipwatch.pagecache), as the
kernel itself reports it (``fincore``: mincore(2) over the file), and nothing about a file that
cannot do this makes a write fail."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from sipwatch.pagecache import DropBehind
from sipwatch.stats import Stats
from sipwatch.tracing import SpanPipeline

FINCORE = shutil.which("fincore")
LAG, EVERY, LINE = 1 << 20, 256 << 10, 64 << 10


def cached(path) -> int:
    """Bytes of ``path`` in the page cache, as the kernel says."""
    out = subprocess.run([FINCORE, "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def droppable(path) -> bool:
    """Whether the file system holding ``path`` keeps file pages it can drop (not tmpfs/ramfs)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            mnt, fstype = line.split()[1:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fstype
    return kind not in ("tmpfs", "ramfs")


needs_fincore = pytest.mark.skipif(FINCORE is None, reason="needs fincore (util-linux)")


def _pipeline(path) -> SpanPipeline:
    p = SpanPipeline(Stats(ring_size=16), None, spans_file=str(path), threaded=False)
    p._drop.lag, p._drop.every = LAG, EVERY
    return p


@needs_fincore
def test_the_spans_file_keeps_only_its_tail_cached(tmp_path):
    """4 MB of lines through the pipeline's writer, each on disk before the next (fsync: what the
    kernel's writeback does a few seconds later), leave at most the last lag plus two steps
    cached, and the last lag bytes still cached (a shipper tailing the file reads memory). Without
    the drop the whole file stays cached (the test's own control)."""
    if not droppable(tmp_path):
        pytest.skip("the test directory is on tmpfs: its pages cannot be dropped")
    line = b"x" * (LINE - 1) + b"\n"
    p = _pipeline(tmp_path / "spans.jsonl")
    for _ in range(64):
        assert p._write_file(line)
        os.fsync(p._file.fileno())
    size = (tmp_path / "spans.jsonl").stat().st_size
    assert size == 64 * LINE
    got = cached(tmp_path / "spans.jsonl")
    assert LAG <= got <= LAG + 2 * EVERY + LINE, (got, size)
    assert p.failures == 0 and not p.file_failing

    # the control: the same writes with the drop off stay cached whole
    q = _pipeline(tmp_path / "control.jsonl")
    q._drop.fd = None
    for _ in range(64):
        assert q._write_file(line)
        os.fsync(q._file.fileno())
    assert cached(tmp_path / "control.jsonl") == size


@needs_fincore
def test_a_rotated_or_cut_file_is_followed(tmp_path):
    """A re-open (SIGHUP after a rename) drops behind in the new file; a file cut to nothing under
    the writer (copytruncate) is dropped behind again once it has grown past the lag."""
    if not droppable(tmp_path):
        pytest.skip("the test directory is on tmpfs: its pages cannot be dropped")
    line = b"y" * (LINE - 1) + b"\n"
    path = tmp_path / "spans.jsonl"
    p = _pipeline(path)
    for _ in range(48):
        p._write_file(line)
        os.fsync(p._file.fileno())
    os.truncate(path, 0)  # copytruncate: the writer's O_APPEND writes start again at 0
    for _ in range(48):
        p._write_file(line)
        os.fsync(p._file.fileno())
    assert path.stat().st_size == 48 * LINE
    assert LAG <= cached(path) <= LAG + 2 * EVERY + LINE
    path.rename(tmp_path / "spans.jsonl.1")
    p._reopen_file()
    p._drop.lag, p._drop.every = LAG, EVERY
    for _ in range(48):
        p._write_file(line)
        os.fsync(p._file.fileno())
    assert LAG <= cached(path) <= LAG + 2 * EVERY + LINE


def test_a_pipe_or_a_closed_descriptor_turns_it_off_quietly():
    """No position (a pipe: ESPIPE) or no descriptor (EBADF): off at the first try, nothing raised,
    and the writes themselves go on."""
    r, w = os.pipe()
    try:
        d = DropBehind(w, lag=0, every=1)
        os.write(w, b"abc")
        d.wrote(3)
        assert d.fd is None
        d.wrote(10)  # off: nothing more is tried
        assert os.read(r, 10) == b"abc"
    finally:
        os.close(r)
        os.close(w)
    d = DropBehind(w, lag=0, every=1)  # closed now
    d.wrote(5)
    assert d.fd is None
