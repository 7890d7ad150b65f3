"""Run a real Prometheus and a real Alertmanager on loopback for tests.

Both run from their Debian binaries (``prometheus``; ``prometheus-alertmanager`` or
``alertmanager``) in a private temporary directory, on free loopback ports, with Alertmanager
clustering disabled (no gossip port). Every wait is bounded; :meth:`stop` terminates and reaps
the process it started (and only that one).

Typical use::

    with Alertmanager(tmp / "am", am_config) as am, \\
         Prometheus(tmp / "prom", scrape_configs, rules, alertmanager=am.address) as prom:
        wait_until(lambda: prom.alerts("SignalerRTTHigh", state="firing"), 30)

:func:`fast_rules` turns ``deploy/prometheus/alert_rules.yml`` into the variant the end-to-end
tests load: same expressions, test-sized ``for:``.
"""
from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from sipwatch.demo import free_port  # noqa: F401  (a port outside the ephemeral range)

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
ALERT_RULES = DEPLOY / "prometheus" / "alert_rules.yml"
RECORDING_RULES = DEPLOY / "prometheus" / "recording_rules.yml"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"

LOOPBACK = "127.0.0.1"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def alertmanager_binary() -> str | None:
    # Debian installs it as prometheus-alertmanager; upstream tarballs as alertmanager.
    return shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ValueError, urllib.error.URLError, http.client.HTTPException) as exc:  # server not up yet
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s (last error: {last_exc})")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def http_json(url: str, data=None, timeout: float = 5.0):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def fast_rules(text: str, for_: str = "10s") -> str:
    """The alert rules with every ``for:`` replaced by ``for_`` (end-to-end test variant).

    Expressions, labels and annotations are untouched, so the variant fires for exactly the same
    data as production, only sooner.
    """
    doc = yaml.safe_load(text)
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = for_
    return yaml.safe_dump(doc, sort_keys=False, width=1000)


def fast_alertmanager(text: str, wait: str = "1s") -> str:
    """The Alertmanager configuration with test-sized grouping timers (routing and inhibition untouched)."""
    doc = yaml.safe_load(text)

    def shrink(route: dict):
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = wait
        for child in route.get("routes", []):
            shrink(child)

    doc["route"]["group_wait"] = doc["route"]["group_interval"] = wait
    shrink(doc["route"])
    return yaml.safe_dump(doc, sort_keys=False, width=1000)


class WebhookReceiver:
    """A loopback HTTP server recording every Alertmanager webhook POST as (path, payload)."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append((self.path, json.loads(body or b"null")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def alerts(self, path: str) -> list[dict]:
        return [a for p, payload in list(self.received) if p == path for a in payload.get("alerts", [])]


def render_alertmanager_config(text: str, critical_url: str, warning_url: str) -> str:
    """Substitute the placeholder receiver URLs, as the compose service does from its environment."""
    placeholders = {"http://critical-webhook.invalid/alerts": critical_url,
                    "http://warning-webhook.invalid/alerts": warning_url}
    for old, new in placeholders.items():
        if old not in text:
            raise ValueError(f"placeholder {old} not found in the Alertmanager configuration")
        text = text.replace(old, new)
    return text


class _Server:
    name = "server"
    ready_path = "/-/ready"

    def __init__(self, workdir: Path, startup_timeout: float = 30.0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.url = f"http://{self.address}"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / f"{self.name}.log"

    def command(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def start(self):
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_until(self._ready, self.startup_timeout, what=f"{self.name} ready on {self.address}")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
        http_get(self.url + self.ready_path, timeout=2)
        return True

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0):
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Alertmanager(_Server):
    name = "alertmanager"

    def __init__(self, workdir: Path, config_text: str, **kw):
        super().__init__(workdir, **kw)
        self.binary = alertmanager_binary()
        if not self.binary:
            raise FileNotFoundError("alertmanager binary not found (Debian package prometheus-alertmanager)")
        self.config_path = self.workdir / "alertmanager.yml"
        self.config_path.write_text(config_text)

    def command(self):
        return [self.binary, f"--config.file={self.config_path}", f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address={self.address}", "--cluster.listen-address=",
                "--log.level=warn"]

    def alerts(self, alertname: str | None = None, active_only: bool = False) -> list[dict]:
        q = {"active": "true", "silenced": "true", "inhibited": "true", "unprocessed": "true"}
        if active_only:
            q["inhibited"] = "false"
        if alertname:
            q["filter"] = f'alertname="{alertname}"'
        return http_json(f"{self.url}/api/v2/alerts?{urllib.parse.urlencode(q)}")

    def post_alerts(self, alerts: list[dict]):
        return http_json(f"{self.url}/api/v2/alerts", data=alerts)


class Prometheus(_Server):
    name = "prometheus"

    def __init__(self, workdir: Path, scrape_configs: list[dict], rule_files: dict[str, str] | None = None,
                 alertmanager: str | None = None, scrape_interval: str = "1s",
                 evaluation_interval: str = "1s", **kw):
        super().__init__(workdir, **kw)
        self.binary = prometheus_binary()
        if not self.binary:
            raise FileNotFoundError("prometheus binary not found (Debian package prometheus)")
        names = []
        for name, text in (rule_files or {}).items():
            (self.workdir / name).write_text(text)
            names.append(name)
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval,
                       "scrape_timeout": scrape_interval},
            "rule_files": names,
            "scrape_configs": scrape_configs,
        }
        if alertmanager:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def command(self):
        return [self.binary, f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={self.address}", "--enable-feature=exemplar-storage",
                "--log.level=warn"]

    def query(self, expr: str) -> list[dict]:
        r = http_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        if r.get("status") != "success":
            raise ValueError(f"query {expr!r} failed: {r}")
        return r["data"]["result"]

    def alerts(self, alertname: str | None = None, state: str | None = None) -> list[dict]:
        r = http_json(f"{self.url}/api/v1/alerts")
        out = r["data"]["alerts"]
        if alertname:
            out = [a for a in out if a["labels"].get("alertname") == alertname]
        if state:
            out = [a for a in out if a["state"] == state]
        return out

    def targets_up(self) -> list[dict]:
        r = http_json(f"{self.url}/api/v1/targets?state=active")
        return [t for t in r["data"]["activeTargets"] if t["health"] == "up"]


def scrape_config(job: str, targets: dict[str, str], **labels) -> dict:
    """A static scrape job; ``targets`` maps each ``host:port`` to its ``instance`` label."""
    return {"job_name": job,
            "static_configs": [{"targets": [addr], "labels": {"instance": inst, **labels}}
                               for addr, inst in targets.items()]}


def require_binaries() -> str | None:
    """None when both servers can run here, else the reason they cannot."""
    missing = [n for n, b in (("prometheus", prometheus_binary()),
                              ("prometheus-alertmanager", alertmanager_binary())) if not b]
    return f"missing Debian package(s): {', '.join(missing)}" if missing else None

