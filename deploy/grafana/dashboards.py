"""Generates the sipwatch Grafana dashboards (classic dashboard JSON) into ./dashboards/.

Run ``python deploy/grafana/dashboards.py`` after editing; the test suite fails when the
committed JSON differs from what this script produces, type-checks every dashboard and panel
against ``@grafana/schema`` (pinned in deploy/schemas/node/package.json, same version as the
Grafana image in deploy/compose.yaml) and runs every PromQL expression through promtool.

Datasources are referenced by the fixed uids provisioned in
deploy/grafana/provisioning/datasources/datasources.yml: ``prometheus``, ``loki``, ``jaeger``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"
SCHEMA_VERSION = 41
PROM = {"type": "prometheus", "uid": "prometheus"}
LOKI = {"type": "loki", "uid": "loki"}
SEL = 'node=~"$node", instance=~"$instance"'  # every sipwatch query is filtered by the variables


class Layout:
    """Places panels left to right on the 24-column grid, wrapping rows."""

    def __init__(self):
        self.x = self.y = self.row_h = 0
        self.next_id = 1

    def place(self, panel: dict, w: int, h: int) -> dict:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel["id"] = self.next_id
        self.next_id += 1
        self.x += w
        self.row_h = max(self.row_h, h)
        return panel

    def row(self, title: str) -> dict:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel = {"type": "row", "title": title, "collapsed": False, "panels": [],
                 "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "id": self.next_id}
        self.next_id += 1
        self.y += 1
        return panel


def prom(expr: str, legend: str = "__auto", ref: str = "A", **extra) -> dict:
    return {"datasource": PROM, "refId": ref, "expr": expr, "legendFormat": legend,
            "range": True, "editorMode": "code", **extra}


def thresholds(*steps: tuple[float | None, str]) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def field_defaults(unit: str, steps=None, minimum=None, maximum=None, custom=None) -> dict:
    d = {"unit": unit, "color": {"mode": "palette-classic" if steps is None else "thresholds"},
         "thresholds": steps or thresholds((None, "green")), "mappings": []}
    if minimum is not None:
        d["min"] = minimum
    if maximum is not None:
        d["max"] = maximum
    if custom is not None:
        d["custom"] = custom
    return d


def graph_custom(stack: bool = False, draw: str = "line", fill: int = 10, threshold_line: bool = False) -> dict:
    return {
        "drawStyle": draw, "lineWidth": 1, "fillOpacity": fill, "showPoints": "never",
        "spanNulls": False, "lineInterpolation": "linear", "pointSize": 4,
        "gradientMode": "none", "axisPlacement": "auto", "axisBorderShow": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "thresholdsStyle": {"mode": "line+area" if threshold_line else "off"},
        "hideFrom": {"legend": False, "tooltip": False, "viz": False},
    }


def timeseries(title: str, targets: list[dict], unit: str, description: str, stack=False,
               steps=None, minimum=None, maximum=None, calcs=("mean", "max")) -> dict:
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": PROM,
        "targets": targets,
        "fieldConfig": {"defaults": field_defaults(unit, steps, minimum, maximum,
                                                   graph_custom(stack, threshold_line=steps is not None)),
                        "overrides": []},
        "options": {
            "legend": {"showLegend": True, "displayMode": "table", "placement": "bottom",
                       "calcs": list(calcs)},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title: str, expr: str, unit: str, description: str, steps=None, decimals: int | None = None) -> dict:
    defaults = field_defaults(unit, steps or thresholds((None, "green")))
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat", "title": title, "description": description, "datasource": PROM,
        "targets": [prom(expr, legend="{{instance}}", instant=True)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "auto", "textMode": "auto", "colorMode": "value", "graphMode": "area",
            "justifyMode": "auto", "wideLayout": True, "showPercentChange": False,
            "percentChangeColorMode": "standard",
        },
    }


def logs(title: str, expr: str, description: str) -> dict:
    return {
        "type": "logs", "title": title, "description": description, "datasource": LOKI,
        "targets": [{"datasource": LOKI, "refId": "A", "expr": expr, "queryType": "range"}],
        "options": {"showTime": True, "wrapLogMessage": False, "sortOrder": "Descending",
                    "enableLogDetails": True, "dedupStrategy": "none", "prettifyLogMessage": False,
                    "showCommonLabels": False, "showLabels": False, "showLogContextToggle": True},
    }


def heatmap(title: str, expr: str, description: str) -> dict:
    return {
        "type": "heatmap", "title": title, "description": description, "datasource": PROM,
        "targets": [prom(expr, legend="{{le}}", format="heatmap", exemplar=True)],
        "fieldConfig": {"defaults": {"custom": {"hideFrom": {"legend": False, "tooltip": False, "viz": False},
                                                "scaleDistribution": {"type": "linear"}}},
                        "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5,
                      "steps": 64, "reverse": False, "fill": "dark-orange"},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "filterValues": {"le": 1e-9},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto", "value": "requests"},
            "showValue": "never",
            "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": False},
            "yAxis": {"axisPlacement": "left", "unit": "ms", "reverse": False},
        },
    }


def variables() -> dict:
    def query_var(name: str, label: str, query: str) -> dict:
        return {
            "type": "query", "name": name, "label": label, "datasource": PROM,
            "query": {"query": query, "refId": f"{name}-var", "qryType": 1},
            "refresh": 2, "includeAll": True, "multi": True,
            "allValue": ".*", "current": {"text": ["All"], "value": ["$__all"]},
            "options": [], "sort": 1, "hide": 0, "skipUrlSync": False,
        }
    return {"list": [
        query_var("node", "Node", 'label_values(up{job="sipwatch-gateway"}, node)'),
        query_var("instance", "Sidecar", 'label_values(up{job="sipwatch-gateway", node=~"$node"}, instance)'),
    ]}


def dashboard(uid: str, title: str, description: str, panels: list[dict], tags: list[str]) -> dict:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["sipwatch", *tags],
        "editable": True, "graphTooltip": 1, "timezone": "browser", "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION, "version": 1, "fiscalYearStartMonth": 0, "liveNow": False,
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "templating": variables(),
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
            "type": "dashboard",
        }]},
        "links": [{"title": "sipwatch dashboards", "type": "dashboards", "tags": ["sipwatch"],
                   "asDropdown": True, "includeVars": True, "keepTime": True, "icon": "external link",
                   "targetBlank": False, "tooltip": "", "url": ""}],
        "panels": panels,
    }


def overview() -> dict:
    L = Layout()
    p = [L.row("Health")]
    p.append(L.place(stat("Sidecar endpoints up", 'sum(up{job=~"sipwatch-gateway|sipwatch-signaling", ' + SEL + '})',
                          "none", "Scrape targets answering (two per sidecar: :13012 and :13022). "
                          "SidecarDown fires when one stays down for 1 minute.",
                          thresholds((None, "red"), (1, "green"))), 4, 4))
    p.append(L.place(stat("Calls/s", f'sum(rate(sip_calls_processed_total{{{SEL}}}[$__rate_interval]))', "reqps",
                          "INVITE dialogs finished per second (any outcome)."), 4, 4))
    p.append(L.place(stat("Active calls", f"sum(sip_active_calls{{{SEL}}})", "none",
                          "Answered calls not yet ended by BYE."), 4, 4))
    p.append(L.place(stat("Sidecar CPU (one core)", f"max(instance:sipwatch_process_cpu:ratio_rate2m{{{SEL}}})",
                          "percentunit", "Share of one CPU core used by the busiest sidecar. The proxy runs one "
                          "event loop: 100% is its ceiling. SidecarCPUHigh fires above 90% for 5 minutes.",
                          thresholds((None, "green"), (0.7, "orange"), (0.9, "red"))), 4, 4))
    p.append(L.place(stat("Parse errors (5m)", f"sum(increase(sip_parse_errors_total{{{SEL}}}[5m]))", "none",
                          "Datagrams that were not SIP, dropped. SIPParseErrors fires above 10 per 5 minutes.",
                          thresholds((None, "green"), (10, "red")), decimals=0), 4, 4))
    p.append(L.place(stat("Spans dropped/s", f"sum(rate(sipwatch_spans_dropped_total{{{SEL}}}[$__rate_interval]))",
                          "short", "Spans lost because the OTLP backend is slow or unreachable (SpanExportDropping).",
                          thresholds((None, "green"), (1e-9, "red"))), 4, 4))
    p.append(L.row("Traffic"))
    p.append(L.place(timeseries("Requests/s by method and direction", [prom(
        f"sum by (method, direction) (rate(sip_requests_total{{{SEL}}}[$__rate_interval]))",
        "{{method}} {{direction}}")], "reqps",
        "SIP requests received per second, retransmissions included; from_gateway = towards sip-signaling.",
        stack=True), 12, 8))
    p.append(L.place(timeseries("Responses/s by class and direction", [prom(
        f"sum by (status_class, direction) (rate(sip_responses_total{{{SEL}}}[$__rate_interval]))",
        "{{status_class}} {{direction}}")], "reqps",
        "SIP responses per second by status class; from_signaling = answers of sip-signaling.", stack=True), 12, 8))
    p.append(L.place(timeseries("Retransmissions/s", [prom(
        f"sum by (kind) (rate(sip_retransmissions_total{{{SEL}}}[$__rate_interval]))", "{{kind}}")], "reqps",
        "Retransmitted requests/responses forwarded. Growth means answers arrive later than Timer A (500 ms) "
        "or datagrams are lost."), 8, 8))
    p.append(L.place(timeseries("Anomalies/s", [
        prom(f"sum(rate(sip_stray_responses_total{{{SEL}}}[$__rate_interval]))", "stray responses", "A"),
        prom(f"sum(rate(sip_unroutable_requests_total{{{SEL}}}[$__rate_interval]))", "unroutable requests", "B"),
        prom(f"sum(rate(sip_loops_detected_total{{{SEL}}}[$__rate_interval]))", "loops (482)", "C"),
        prom(f"sum(rate(sip_too_many_hops_total{{{SEL}}}[$__rate_interval]))", "too many hops (483)", "D"),
        prom(f"sum(rate(sip_upstream_send_errors_total{{{SEL}}}[$__rate_interval]))", "upstream send errors", "E"),
        prom(f"sum(rate(sip_traceparent_invalid_total{{{SEL}}}[$__rate_interval]))", "invalid traceparent", "F"),
    ], "reqps", "Traffic the sidecar could not handle normally. Any steady non-zero line deserves a look."), 8, 8))
    p.append(L.place(timeseries("Refused by the sidecar/s", [
        prom(f"sum(rate(sip_overload_rejected_total{{{SEL}}}[$__rate_interval]))", "503 overloaded (new calls)", "A"),
        prom(f"sum(rate(sip_drain_rejected_total{{{SEL}}}[$__rate_interval]))", "503 draining (new calls)", "B"),
        prom(f"sum by (reason) (rate(sip_dropped_total{{{SEL}}}[$__rate_interval]))", "dropped: {{reason}}", "C"),
        # (exported on both ports, counted once: the gateway side's job)
        prom(f"sum by (component) (rate(sipwatch_internal_errors_total{{job=\"sipwatch-gateway\", {SEL}}}[$__rate_interval]))",
             "internal error: {{component}}", "D"),
        prom(f"max(sipwatch_overloaded{{{SEL}}})", "shedding (1 = on)", "E"),
    ], "reqps", "What the sidecar refused itself: new calls answered 503 while overloaded (SidecarShedding) or "
       "draining, datagrams not forwarded by reason, and internal errors survived. Refused calls are not in "
       "sip_calls_processed_total, so ASR/NER and CallFailureRatioHigh do not show them."), 8, 8))
    p.append(L.place(timeseries("State pressure", [
        prom(f"sum by (table) (rate(sip_state_evictions_total{{{SEL}}}[$__rate_interval]))", "evicted {{table}}", "A"),
        prom(f"sum(rate(sipwatch_records_dropped_total{{{SEL}}}[$__rate_interval]))", "records dropped", "B"),
        prom(f"sum(rate(sip_keepalives_total{{{SEL}}}[$__rate_interval]))", "keep-alives", "C"),
    ], "reqps", "Evictions mean the in-flight tables are full (raise --max-transactions / --max-calls); "
       "dropped records mean exporters lag behind."), 8, 8))
    p.append(L.place(timeseries("Gateway-side timeouts (per 5m)", [prom(
        f"sum by (method) (increase(sip_gateway_timeouts_total{{{SEL}}}[5m]))", "{{method}}")], "none",
        "Requests sip-signaling sent toward the gateway side (BYE, OPTIONS pings to a gateway or phone) with no "
        "final response within Timer B/F: the gateway side's silence, not sip-signaling's (its own timeouts are on "
        "the signaling dashboard). GatewayTimeoutsRising fires above 3 per 5 minutes for one method.",
        steps=thresholds((None, "transparent"), (3, "red"))), 8, 8))
    p.append(L.row("Process and node"))
    p.append(L.place(timeseries("Sidecar CPU (share of one core)", [prom(
        f"instance:sipwatch_process_cpu:ratio_rate2m{{{SEL}}}", "{{instance}}")], "percentunit",
        "CPU used by the sidecar process; the red line is the SidecarCPUHigh threshold.",
        steps=thresholds((None, "transparent"), (0.9, "red")), minimum=0), 8, 8))
    p.append(L.place(timeseries("Sidecar memory", [prom(
        f'process_resident_memory_bytes{{job="sipwatch-gateway", {SEL}}}', "{{instance}}")], "bytes",
        "Resident memory of the sidecar process."), 8, 8))
    p.append(L.place(timeseries("Node CPU busy", [prom(
        'sum by (node) (1 - rate(node_cpu_seconds_total{mode="idle", node=~"$node"}[$__rate_interval]))'
        ' / count by (node) (node_cpu_seconds_total{mode="idle", node=~"$node"})', "{{node}}")], "percentunit",
        "Whole-node CPU from node-exporter: tells a busy node apart from a busy sidecar.", minimum=0,
        maximum=1), 8, 8))
    p.append(L.row("Logs"))
    p.append(L.place(logs("Warnings and errors", '{service="sipwatch", node=~"$node", level=~"warning|error"}',
                          "The sidecar's JSON log lines at warning level and above (Loki). Expand a line and "
                          "follow its trace_id to Jaeger."), 24, 8))
    return dashboard("sipwatch-overview", "sipwatch overview",
                     "Health of the sipwatch sidecars: scrape health, traffic, anomalies, CPU and logs.", p,
                     ["overview"])


def signaling() -> dict:
    L = Layout()
    rtt = f"signaler_rtt_milliseconds_bucket{{{SEL}, method=~\"$method\"}}"
    p = [L.row("Round trip to sip-signaling")]
    p.append(L.place(heatmap("RTT distribution (all methods)",
                             f"sum by (le) (increase({rtt}[$__rate_interval]))",
                             "Time from forwarding a request to sip-signaling to its first response "
                             "(100 Trying included), as a heatmap of the signaler_rtt_milliseconds buckets. "
                             "Exemplar dots carry the trace_id of a real request: click one to open the trace "
                             "in Jaeger."), 24, 9))
    pct = []
    for ref, q in (("A", "0.50"), ("B", "0.95"), ("C", "0.99")):
        pct.append(prom(f"histogram_quantile({q}, sum by (method, le) (rate({rtt}[$__rate_interval])))",
                        f"p{q[2:]} {{{{method}}}}", ref, exemplar=ref == "B"))
    p.append(L.place(timeseries("RTT percentiles by method", pct, "ms",
                                "p50/p95/p99 of the round trip per SIP method. The red band is the SignalerRTTHigh "
                                "threshold (p95 above 200 ms for 1 minute). Exemplars on the p95 query link to "
                                "Jaeger.", steps=thresholds((None, "transparent"), (200, "red")), minimum=0), 16, 9))
    p.append(L.place(timeseries("RTT samples/s by method", [prom(
        f"sum by (method) (rate(signaler_rtt_milliseconds_count{{{SEL}, method=~\"$method\"}}[$__rate_interval]))",
        "{{method}}")], "reqps", "Requests whose round trip was measured (first copy only; retransmissions "
        "are not timed twice)."), 8, 9))
    p.append(L.row("Failures on the signaling hop"))
    p.append(L.place(timeseries("Transaction timeouts (per 5m)", [prom(
        f"sum by (method) (increase(sip_transaction_timeouts_total{{{SEL}, method=~\"$method\"}}[5m]))",
        "{{method}}")], "none", "Transactions with no final response within Timer B/F. "
        "TransactionTimeoutsRising fires above 3 per 5 minutes for one method.",
        steps=thresholds((None, "transparent"), (3, "red"))), 8, 8))
    p.append(L.place(timeseries("Upstream send errors/s", [prom(
        f"sum by (instance) (rate(sip_upstream_send_errors_total{{{SEL}}}[$__rate_interval]))", "{{instance}}")],
        "reqps", "Datagrams the OS refused to send to sip-signaling (ICMP port unreachable: it is down)."), 8, 8))
    p.append(L.place(timeseries("Spans exported and dropped/s", [
        prom(f"sum(rate(sipwatch_spans_exported_total{{{SEL}}}[$__rate_interval]))", "exported", "A"),
        prom(f"sum(rate(sipwatch_spans_dropped_total{{{SEL}}}[$__rate_interval]))", "dropped", "B"),
    ], "short", "OTLP span export. Dropped spans mean incomplete traces in Jaeger (SpanExportDropping)."), 8, 8))
    d = dashboard("sipwatch-signaling", "sipwatch signaling performance",
                  "Round trip between the sidecar and sip-signaling per SIP method, with exemplars linked to "
                  "Jaeger traces.", p, ["signaling"])
    d["templating"]["list"].append({
        "type": "custom", "name": "method", "label": "Method",
        "query": "INVITE,ACK,BYE,CANCEL,REGISTER,OPTIONS,PRACK,UPDATE,INFO,SUBSCRIBE,NOTIFY,REFER,MESSAGE,PUBLISH,OTHER",
        "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"text": ["All"], "value": ["$__all"]}, "options": [], "hide": 0, "skipUrlSync": False,
    })
    return d


def calls() -> dict:
    L = Layout()
    p = [L.row("RFC 6076 KPIs")]
    ratio = thresholds((None, "red"), (0.9, "orange"), (0.95, "green"))
    p.append(L.place(stat("ASR (5m)", f"avg(instance:sip_asr:ratio_rate5m{{{SEL}}})", "percentunit",
                          "Answer-seizure ratio: answered / attempted INVITEs (3xx redirects excluded), "
                          "RFC 6076 SER.", thresholds((None, "red"), (0.5, "orange"), (0.7, "green"))), 6, 5))
    p.append(L.place(stat("NER (5m)", f"avg(instance:sip_ner:ratio_rate5m{{{SEL}}})", "percentunit",
                          "Network effectiveness ratio: calls not failed by the network (5xx or timeout) / attempts. "
                          "User rejections (486, 603) and cancels count as effective. RFC 6076 SEER. "
                          "CallFailureRatioHigh fires when it drops below 95% for 5 minutes.", ratio), 6, 5))
    p.append(L.place(stat("SRD p95 (5m)", f"max(instance:sip_call_setup_seconds:p95_rate5m{{{SEL}}})", "s",
                          "Session request delay, 95th percentile: INVITE forwarded to first 18x or final response.",
                          thresholds((None, "green"), (2, "orange"), (5, "red"))), 6, 5))
    p.append(L.place(stat("Mean call duration (5m)", f"avg(instance:sip_call_duration_seconds:mean_rate5m{{{SEL}}})",
                          "s", "Mean duration of answered calls that ended in the last 5 minutes (2xx to BYE)."), 6, 5))
    p.append(L.row("Calls"))
    p.append(L.place(timeseries("Calls/s by outcome", [prom(
        f"sum by (outcome) (rate(sip_calls_processed_total{{{SEL}}}[$__rate_interval]))", "{{outcome}}")],
        "reqps", "INVITE dialogs counted once at their final response or timeout.", stack=True), 12, 8))
    p.append(L.place(timeseries("ASR and NER", [
        prom(f"instance:sip_asr:ratio_rate5m{{{SEL}}}", "ASR {{instance}}", "A"),
        prom(f"instance:sip_ner:ratio_rate5m{{{SEL}}}", "NER {{instance}}", "B"),
    ], "percentunit", "5-minute ASR and NER per sidecar (recording rules).", minimum=0, maximum=1), 12, 8))
    setup = []
    for ref, q in (("A", "0.50"), ("B", "0.95"), ("C", "0.99")):
        setup.append(prom(f"histogram_quantile({q}, sum by (le) (rate(sip_call_setup_seconds_bucket{{{SEL}}}"
                          f"[$__rate_interval])))", f"p{q[2:]}", ref))
    p.append(L.place(timeseries("Call setup time (SRD)", setup, "s",
                                "INVITE forwarded to the first 18x or final response: p50/p95/p99."), 8, 8))
    dur = []
    for ref, q in (("A", "0.50"), ("B", "0.95")):
        dur.append(prom(f"histogram_quantile({q}, sum by (le) (rate(sip_call_duration_seconds_bucket{{{SEL}}}"
                        f"[$__rate_interval])))", f"p{q[2:]}", ref))
    p.append(L.place(timeseries("Call duration", dur, "s", "Answered calls, 2xx to the response to BYE."), 8, 8))
    p.append(L.place(timeseries("Active calls", [prom(f"sum by (instance) (sip_active_calls{{{SEL}}})",
                                                      "{{instance}}")], "none",
                                "Answered calls not yet ended by BYE, per sidecar."), 8, 8))
    p.append(L.row("RTP quality"))
    lost = f"sum by (codec) (rate(rtp_packets_lost_total{{{SEL}}}[5m]))"
    got = f"sum by (codec) (rate(rtp_packets_total{{{SEL}}}[5m]))"
    p.append(L.place(timeseries("RTP packet loss ratio by codec", [prom(f"{lost} / ({got} + {lost})", "{{codec}}")],
                                "percentunit", "Lost / expected RTP packets per codec over 5 minutes, from "
                                "`sipwatch capture` (streams are counted when they end: call end plus a grace, "
                                "idle timeout or eviction). Loss as Wireshark's rtp,streams counts it.",
                                minimum=0), 8, 8))
    jit = []
    for ref, q in (("A", "0.50"), ("B", "0.95")):
        jit.append(prom(f"histogram_quantile({q}, sum by (le) (rate(rtp_jitter_milliseconds_bucket{{{SEL}}}[5m])))",
                        f"p{q[2:]}", ref))
    p.append(L.place(timeseries("RTP jitter (per-stream maximum)", jit, "ms",
                                "p50/p95 over finished streams of each stream's maximum RFC 3550 interarrival "
                                "jitter (sipwatch capture).", minimum=0), 8, 8))
    mos = []
    for ref, q in (("A", "0.50"), ("B", "0.05")):
        mos.append(prom(f"histogram_quantile({q}, sum by (le) (rate(rtp_mos_bucket{{{SEL}}}[5m])))",
                        f"p{q[2:]}", ref))
    p.append(L.place(timeseries("RTP MOS (median and worst 5%)", mos, "none",
                                "E-model MOS per finished stream (ITU-T G.107 without the delay term, from packet "
                                "loss; G.711 and G.729 only): median and 5th percentile (sipwatch capture). "
                                "Clean G.711 scores 4.41.",
                                steps=thresholds((None, "red"), (3.6, "transparent")), minimum=1, maximum=5), 8, 8))
    p.append(L.row("Call logs"))
    p.append(L.place(logs("Call summaries", '{service="sipwatch", node=~"$node"} | json | event="call_summary"',
                          "One JSON record per finished call (Loki). trace_id links to the call's trace in Jaeger."),
                     24, 8))
    return dashboard("sipwatch-calls", "sipwatch call KPIs",
                     "Calls by outcome, ASR, NER, session request delay and call duration (RFC 6076); RTP "
                     "quality from sipwatch capture.", p,
                     ["calls", "kpi"])


DASHBOARDS = {"sipwatch-overview.json": overview, "sipwatch-signaling.json": signaling,
              "sipwatch-calls.json": calls}


def render() -> dict[str, str]:
    return {name: json.dumps(make(), indent=2, sort_keys=True) + "\n" for name, make in DASHBOARDS.items()}


def main(out: Path = OUT) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (out / name).write_text(text)
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
