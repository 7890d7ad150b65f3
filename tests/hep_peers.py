"""The real HEP peers the HEP tests drive: sngrep (receiver, writes what it got as pcap), Kamailio
``sipcapture`` with ``db_text`` storage (receiver) and Kamailio ``siptrace`` in front of SIPp
(sender), plus the npm ``hep-js`` decoder as an independent reading of every chunk."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench_net import KAMAILIO, KAMAILIO_MODULES, Kamailio, kamailio_modules, kamailio_route
from harness import free_port, stop_process

SNGREP = shutil.which("sngrep")
NPM = shutil.which("npm")
NODE = shutil.which("node")

SIPTRACE_CFG = """#!KAMAILIO
debug=1
log_stderror=yes
children=1
auto_aliases=no
listen=udp:127.0.0.1:{port}
listen=tcp:127.0.0.1:{port}
mpath="{mpath}"
""" + KAMAILIO_MODULES + """loadmodule "siptrace.so"
modparam("siptrace", "duplicate_uri", "sip:127.0.0.1:{hep_port};transport={hep_transport}")
modparam("siptrace", "hep_mode_on", 1)
modparam("siptrace", "hep_version", {hep_version})
modparam("siptrace", "hep_capture_id", {capture_id})
modparam("siptrace", "trace_to_database", 0)
modparam("siptrace", "trace_on", 1)
modparam("siptrace", "trace_mode", 1)
{auth}

""" + kamailio_route('    forward("127.0.0.1", {upstream});')

# every column sipcapture may write (Kamailio 5.x); db_text matches values to columns by name
SIP_CAPTURE_COLUMNS = (
    "id(int,auto) date(int,null) micro_ts(int,null) method(str,null) reply_reason(str,null) "
    "ruri(str,null) ruri_user(str,null) ruri_domain(str,null) from_user(str,null) "
    "from_domain(str,null) from_tag(str,null) to_user(str,null) to_domain(str,null) "
    "to_tag(str,null) pid_user(str,null) contact_user(str,null) auth_user(str,null) "
    "callid(str,null) callid_aleg(str,null) via_1(str,null) via_1_branch(str,null) "
    "cseq(str,null) diversion(str,null) reason(str,null) content_type(str,null) auth(str,null) "
    "user_agent(str,null) source_ip(str,null) source_port(int,null) destination_ip(str,null) "
    "destination_port(int,null) contact_ip(str,null) contact_port(int,null) "
    "originator_ip(str,null) originator_port(int,null) expires(int,null) "
    "correlation_id(str,null) custom_field1(str,null) custom_field2(str,null) "
    "custom_field3(str,null) proto(int,null) family(int,null) rtp_stat(str,null) type(int,null) "
    "node(str,null) msg(str,null)")

SIPCAPTURE_CFG = """#!KAMAILIO
debug=1
log_stderror=yes
children=1
auto_aliases=no
listen=udp:127.0.0.1:{port}
{tcp_core}
mpath="{mpath}"
loadmodule "pv.so"
loadmodule "db_text.so"
loadmodule "sipcapture.so"
modparam("db_text", "db_mode", 1)
modparam("sipcapture", "db_url", "text://{db}")
modparam("sipcapture", "capture_on", 1)
modparam("sipcapture", "hep_capture_on", 1)
{tcp_hook}
modparam("sipcapture", "capture_node", "homer01")
modparam("sipcapture", "table_name", "sip_capture")

request_route {{
    sip_capture();
    drop;
}}
onreply_route {{
    sip_capture();
    drop;
}}
{tcp_route}
"""

# HEP over TCP (Kamailio 5.6): the core must frame HEP3 (and not ask for Content-Length), and the
# frames reach sipcapture through its non-SIP hook, whose event route lets them through to be
# decoded and stored as over UDP. The hook would take UDP HEP away from sipcapture's own path.
SIPCAPTURE_TCP = {
    "tcp_core": "listen=tcp:127.0.0.1:{port}\ntcp_accept_hep3=yes\ntcp_accept_no_cl=yes",
    "tcp_hook": 'modparam("sipcapture", "nonsip_hook", 1)',
    "tcp_route": "event_route[sipcapture:request] {{\n    $var(hep) = 1;\n}}",
}


def have_kamailio_hep() -> bool:
    mods = kamailio_modules() if KAMAILIO else None
    return bool(mods and all((Path(mods) / m).exists()
                             for m in ("siptrace.so", "sipcapture.so", "db_text.so")))


class KamailioSiptrace(Kamailio):
    """Kamailio forwarding statelessly to ``upstream`` and tracing every message it receives and
    sends (``trace_mode`` 1) as HEPv3 to 127.0.0.1:``hep_port``."""

    name = "kamailio-siptrace"

    def __init__(self, workdir: Path, upstream_port: int, hep_port: int, capture_id: int = 2002,
                 hep_transport: str = "udp", auth_key: str = "", hep_version: int = 3):
        super().__init__(workdir, upstream_port)
        self.cfg.write_text(SIPTRACE_CFG.format(port=self.port, upstream=upstream_port,
                                                mpath=kamailio_modules(), hep_port=hep_port,
                                                capture_id=capture_id, hep_transport=hep_transport,
                                                hep_version=hep_version,
                                                auth=f'modparam("siptrace", "auth_key", "{auth_key}")'
                                                if auth_key else ""))


class KamailioSipcapture(Kamailio):
    """Kamailio storing every HEP packet it receives into a ``db_text`` table ``sip_capture``."""

    name = "kamailio-sipcapture"

    def __init__(self, workdir: Path, tcp: bool = False):
        super().__init__(workdir, 9)
        self.db = self.dir / "db"
        self.db.mkdir(exist_ok=True)
        (self.db / "sip_capture").write_text(SIP_CAPTURE_COLUMNS + "\n")
        (self.db / "version").write_text("table_name(str) table_version(int)\nsip_capture:5\n")
        extra = {k: (v.format(port=self.port) if tcp else "") for k, v in SIPCAPTURE_TCP.items()}
        self.cfg.write_text(SIPCAPTURE_CFG.format(port=self.port, mpath=kamailio_modules(),
                                                  db=self.db, **extra))

    def __enter__(self):
        # sipcapture answers nothing: wait until the log says the listener is up
        self._out = open(self.dir / "log.txt", "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        time.sleep(1.0)
        if self.proc.poll() is not None:
            raise RuntimeError(f"kamailio exited: {(self.dir / 'log.txt').read_text(errors='replace')[-2000:]}")
        return self

    def rows(self) -> list[dict]:
        """The stored rows as {column: text}. db_text escapes ':' and newlines in values."""
        lines = (self.db / "sip_capture").read_text(errors="replace").split("\n")
        cols = [c.split("(")[0] for c in lines[0].split()]
        out = []
        for line in lines[1:]:
            if not line:
                continue
            vals = _split_dbtext(line)
            out.append(dict(zip(cols, vals)))
        return out


def _split_dbtext(line: str) -> list[str]:
    """A db_text row: values separated by ':', with '\\:', '\\n', '\\r', '\\t', '\\\\' escaped."""
    vals, cur, i = [], [], 0
    esc = {"n": "\n", "r": "\r", "t": "\t", ":": ":", "\\": "\\", "0": "\0"}
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            cur.append(esc.get(line[i + 1], line[i + 1]))
            i += 2
            continue
        if c == ":":
            vals.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    vals.append("".join(cur))
    return vals


class Sngrep:
    """sngrep as a HEPv3 receiver writing what it receives to a pcap (stopped with SIGINT)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.pcap = workdir / f"sngrep-{self.port}.pcap"
        self.log = workdir / f"sngrep-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Sngrep":
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen([SNGREP, "-N", "-q", "-F", "-L", f"udp:127.0.0.1:{self.port}",
                                      "-O", str(self.pcap)], stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise RuntimeError(f"sngrep exited: {self.log.read_text(errors='replace')}")
        return self

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)
        self._out.close()

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.stop()


def tshark_sip(pcap: Path) -> list[dict]:
    """Every SIP packet in ``pcap`` as tshark reads it: time, addresses, ports, payload."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-Y", "sip", "-T", "fields", "-E", "separator=\t",
                          "-e", "frame.time_epoch", "-e", "ip.src", "-e", "udp.srcport", "-e", "ip.dst",
                          "-e", "udp.dstport", "-e", "sip.Call-ID", "-e", "udp.payload"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    rows = []
    for line in out.splitlines():
        f = line.split("\t")
        if len(f) < 7 or not f[6]:
            continue
        rows.append({"time": f[0], "src": (f[1], int(f[2])), "dst": (f[3], int(f[4])),
                     "call_id": f[5], "payload": bytes.fromhex(f[6].replace(":", ""))})
    return rows


HEPJS_DECODE = r"""
const hep = require('hep-js');
const fs = require('fs');
const out = [];
const data = fs.readFileSync(process.argv[2]);
let off = 0;
while (off + 4 <= data.length) {
  const n = data.readUInt32BE(off); off += 4;
  const pkt = data.subarray(off, off + n); off += n;
  const d = hep.decapsulate(pkt);
  // the chunk layout, walked here apart from hep-js: (vendor, type, length) until the end
  const chunks = [];
  let c = 6;
  while (c + 6 <= pkt.length) {
    const len = pkt.readUInt16BE(c + 4);
    chunks.push([pkt.readUInt16BE(c), pkt.readUInt16BE(c + 2), len]);
    if (len < 6) break;
    c += len;
  }
  out.push({decoded: d === false ? null : d, total: pkt.readUInt16BE(4), size: pkt.length,
            end: c, chunks: chunks});
}
process.stdout.write(JSON.stringify(out));
"""


def hepjs_install(directory: Path) -> Path | None:
    """``npm install hep-js`` into ``directory``; the directory, or None if npm cannot."""
    if not (NPM and NODE):
        return None
    directory.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([NPM, "install", "--silent", "--no-audit", "--no-fund", "--prefix",
                        str(directory), "hep-js"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or not (directory / "node_modules" / "hep-js").exists():
        return None
    return directory


def hepjs_decode(directory: Path, packets: list[bytes]) -> list[dict]:
    """What hep-js reads from each packet: its ``rcinfo`` fields and the payload."""
    blob = directory / "packets.bin"
    blob.write_bytes(b"".join(len(p).to_bytes(4, "big") + p for p in packets))
    script = directory / "decode.js"
    script.write_text(HEPJS_DECODE)
    r = subprocess.run([NODE, str(script), str(blob)], capture_output=True, text=True, timeout=120,
                       cwd=directory)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout)
