"""The span worker alone, fed the proxy's hand-off at full speed: its CPU per call, without the
noise of a live run (SIPp, the proxy and the worker sharing two CPUs swing a live step's figure by
±10%; this one repeats within a few %).

The stream is what the proxy's :class:`sipwatch.span_worker.WorkerPipeline` writes for answered
calls shaped like SIPp's (INVITE 100/180/200, ACK, BYE: four spans and one summary a call), framed
as it frames them (DUMP_RECORDS span tuples, DUMP_SUMMARIES summaries a frame). Each run starts
``python -m``-style the worker of a source tree (``--tree``, default this checkout; give several
to compare them, runs alternate), exporting over OTLP/HTTP to a local collector process, writing a
spans file and the summary lines; the worker's start-up (imports) is measured alone and taken off.

    python tests/worker_replay.py [--calls 40000] [--rounds 5] [--tree DIR ...]
"""
from __future__ import annotations

import argparse
import marshal
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_net  # noqa: E402


def calls(n: int) -> list:
    """Finished records of ``n`` answered calls with SIPp's Call-IDs, and From (its number and tag
    the call's, as the bench's caller sends them) and To."""
    from span_micro import answered_calls
    return answered_calls(n, lambda i: (
        b"%d-4242@127.0.0.1" % (i + 1), b'"Caller" <sip:+493012345%d@127.0.0.1:5061>;tag=4242SIPpTag00%d' % (i + 1, i + 1),
        b"<sip:service@127.0.0.1:5060>", b"sip:service@127.0.0.1:5060"))


def stream(records: list, config: dict) -> bytes:
    """The bytes the proxy writes to its worker for ``records``: the config frame, then frames of
    span tuples and of summaries as WorkerPipeline gathers them over 8-call slices, each framed
    as it frames them (packed, or marshal where the C module is not built)."""
    from collections import deque

    from sipwatch import span_worker as sw
    from sipwatch.handoff import span_tuples, summary_tuples, take_slice
    out = bytearray()

    def frame(kind: int, payload: bytes) -> None:
        out.extend(sw._LEN.pack(len(payload) + 1) + bytes((kind,)) + payload)

    frame(sw.F_CONFIG, pickle.dumps(config))
    backlog, spans, summaries, seq = deque(records), [], [], 0
    while backlog:
        chunk, done = take_slice(backlog, False, 8, 64, lambda *a: None)
        summaries += summary_tuples(done, None)
        spans += span_tuples(chunk, False, 1.0, None)
        if len(summaries) >= sw.DUMP_SUMMARIES or not backlog:
            seq += len(summaries)
            out.extend(sw.summaries_frame(seq, summaries))
            summaries = []
        if len(spans) >= sw.DUMP_RECORDS or not backlog:
            out.extend(sw.records_frame(spans))
            spans = []
    frame(sw.F_STOP, marshal.dumps(30.0))
    return bytes(out)


def config(endpoint: str | None, spans_file: str | None) -> dict:
    from sipwatch import __version__
    from sipwatch.masking import CallIdMasker
    from sipwatch.tracing import make_resource
    res = make_resource("sipwatch", "proxy", {})
    mask = CallIdMasker("digits", b"replay")
    return {"resource": dict(res.attributes), "schema_url": res.schema_url or "", "version": __version__,
            "mask_mode": "partial", "call_id_mask": mask, "endpoint": endpoint, "protocol": "http/protobuf",
            "spans_file": spans_file, "env": {},
            "log": {"service_name": "sipwatch", "mask_mode": "partial", "level": "info", "call_id_mask": mask,
                    "fd": 3}}


def run(tree: str, data_path: str, log_path: str) -> tuple[float, float]:
    """(user + system CPU seconds, wall seconds) of one worker of ``tree`` reading ``data_path``."""
    env = dict(os.environ, PYTHONPATH=tree)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with open(data_path, "rb") as inp:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-P", "-c", "from sipwatch.span_worker import main; main()"],
                           stdin=inp, stdout=subprocess.DEVNULL, env=env, check=True, close_fds=False,
                           preexec_fn=lambda: os.dup2(log_fd, 3))  # the summaries' descriptor (config)
            wall = time.monotonic() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        os.close(log_fd)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=40_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tree", action="append", help="a source tree to run the worker from (repeatable)")
    args = ap.parse_args()
    trees = args.tree or [str(HERE.parent)]
    with tempfile.TemporaryDirectory() as tmp, bench_net.OtlpCollector(Path(tmp)) as col:
        spans_file = os.path.join(tmp, "spans.jsonl")
        cfg = config(col.url + "/v1/traces", spans_file)
        records = calls(args.calls)
        full, empty = os.path.join(tmp, "stream"), os.path.join(tmp, "start-up")
        data = stream(records, cfg)
        Path(full).write_bytes(data)
        Path(empty).write_bytes(stream([], cfg))
        print(f"{args.calls} calls, {len(data) / args.calls:.0f} bytes a call over the pipe", flush=True)
        per_call: dict = {t: [] for t in trees}
        for r in range(args.rounds):
            for tree in trees if r % 2 == 0 else trees[::-1]:
                start_cpu, _ = run(tree, empty, os.path.join(tmp, "log0"))
                if os.path.exists(spans_file):
                    os.unlink(spans_file)
                cpu, wall = run(tree, full, os.path.join(tmp, "log"))
                lines = sum(1 for _ in open(os.path.join(tmp, "log"), "rb"))
                us = (cpu - start_cpu) / args.calls * 1e6
                per_call[tree].append(us)
                print(f"  {tree}: {us:.2f} µs a call (CPU {cpu:.2f} s, start-up {start_cpu:.2f} s, wall {wall:.2f} s, "
                      f"{lines} summary lines)", flush=True)
        got = col.stats()
        print(f"collector: {got['spans']} spans in {got['requests']} requests")
        for tree in trees:
            print(f"{tree}: median {statistics.median(per_call[tree]):.2f} µs a call "
                  f"({' '.join(f'{x:.2f}' for x in per_call[tree])})")


if __name__ == "__main__":
    main()
