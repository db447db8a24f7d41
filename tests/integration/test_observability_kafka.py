"""The dashboard and the alert rules against real data: `streamer run` fed by `streamer simulate`
through the real broker, scraped by a real Prometheus (Debian's `prometheus`, or one on PATH),
and every expression of deploy/grafana/dashboards/*.json and deploy/prometheus/alerts.yml asked
of it through its HTTP API."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import promql_parser as promql
import pytest
import yaml

from tests.integration.conftest import REPO, free_port
from tests.integration.helpers import create_topic, produce
from tests.integration.test_pipeline_kafka import BAD_MESSAGES, write_model

pytestmark = pytest.mark.kafka

DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")
SCRAPE_S = 1
# Grafana's variables, as Grafana would set them for this run: $__rate_interval is at least four
# scrape intervals; the variables select the one job and every instance.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5s", "$__interval": "1s", "$__range": "20s", "$job": "streamer", "$instance": ".*",
}
COMPARISONS = {">", "<", ">=", "<=", "==", "!="}
SET_OPERATORS = {"and", "or", "unless"}


def grafana_substitute(expr: str) -> str:
    """``expr`` with Grafana's variables ($name and ${name}) replaced; every one must be known."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):  # longest first: none inside another
        expr = expr.replace("${" + name[1:] + "}", GRAFANA_VARIABLES[name]).replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"a Grafana variable this test does not set: {expr}"
    return expr


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, expr) of every query target of every dashboard, rows' nested panels included."""
    found = []
    for path in DASHBOARDS:
        stack = list(json.loads(path.read_text())["panels"])
        while stack:
            panel = stack.pop()
            stack.extend(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((f"{path.name}: {panel['title']} / {target['refId']}", target["expr"]))
    return found


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _unparen(node):
    while isinstance(node, promql.ParenExpr):
        node = node.expr
    return node


def alert_quantities(expr: str) -> list[str]:
    """The quantities an alert compares with its thresholds: ``A > 1000 and B > 0`` -> [A, B].
    They must return data on a healthy run, where the alert itself (rightly) returns none."""
    node = _unparen(promql.parse(expr))
    if isinstance(node, promql.BinaryExpr):
        op = str(node.op)
        lhs, rhs = _unparen(node.lhs), _unparen(node.rhs)
        if op in SET_OPERATORS:
            return alert_quantities(str(lhs)) + alert_quantities(str(rhs))
        if op in COMPARISONS and isinstance(rhs, promql.NumberLiteral):
            return [str(lhs)]
        if op in COMPARISONS and isinstance(lhs, promql.NumberLiteral):
            return [str(rhs)]
    return [str(node)]


def test_alert_quantities_split_at_thresholds_and_set_operators():
    assert alert_quantities("a > 1 and (b{x=\"y\"} == 0)") == ["a{}", 'b{x="y"}']
    assert alert_quantities("1 < rate(c[5m])") == ["rate(c{}[5m])"]
    assert alert_quantities("a / b") == ["a{} / b{}"]


class Prometheus:
    """A Prometheus process scraping ``target`` every SCRAPE_S with the alert rules loaded."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "streamer", "static_configs": [{"targets": [target]}]}],
        }))
        self.log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the error as JSON; 503 starting up
            body = exc.read()
            try:
                return json.loads(body)
            except ValueError:
                return {"status": "error", "error": f"HTTP {exc.code}: {body[:200]!r}"}
        except OSError as exc:  # not listening yet
            return {"status": "error", "error": repr(exc)}

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def finite_values(answer: dict) -> list[float]:
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    values = [sample["value"][1] for sample in result] if answer["data"]["resultType"] == "vector" else []
    return [float(v) for v in values if math.isfinite(float(v))]


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def streamer_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary on PATH (Debian: apt-get install prometheus)")
def test_every_dashboard_and_alert_expression_returns_data(
    kafka_bootstrap: str, kafka_client: str, unique: str, tmp_path: Path
):
    assert DASHBOARDS, "no dashboard JSON under deploy/grafana/dashboards"
    topics = {"in": f"obs-in-{unique}", "out": f"obs-out-{unique}", "dlq": f"obs-dlq-{unique}"}
    create_topic(kafka_bootstrap, topics["in"], partitions=3)
    model = tmp_path / "model.pt"
    write_model(model, seed=5, version="obs-v1")  # two values per reading
    metrics_port = free_port()
    kafka_flags = ["--kafka-bootstrap-servers", kafka_bootstrap, "--kafka-input-topic", topics["in"]]
    run_log = (tmp_path / "run.log").open("w")
    run = subprocess.Popen(
        [sys.executable, "-m", "streamer", "run", *kafka_flags, "--kafka-output-topic", topics["out"],
         "--kafka-dead-letter-topic", topics["dlq"], "--kafka-group-id", f"obs-{unique}", "--kafka-client", kafka_client,
         "--model-path", str(model), "--model-device", "cpu", "--state-capacity", "1000",
         "--batch-max-records", "256", "--checkpoint-directory", str(tmp_path / "checkpoints"),
         "--checkpoint-interval-s", "1", "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
         "--run-status-interval-s", "0"],
        cwd=REPO, env=streamer_env(), stdout=run_log, stderr=subprocess.STDOUT,
    )
    simulator = subprocess.Popen(
        [sys.executable, "-m", "streamer", "simulate", *kafka_flags, "--devices", "60", "--features", "2",
         "--rate", "600", "--duration", "300", "--anomaly-rate", "0.02", "--seed", "3", "--progress-interval", "0"],
        cwd=REPO, env=streamer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    prometheus = Prometheus(PROMETHEUS, f"127.0.0.1:{metrics_port}", tmp_path)
    try:
        produce(kafka_bootstrap, topics["in"], [(k, v, None) for k, v, _ in BAD_MESSAGES])  # dead letters too
        rate = GRAFANA_VARIABLES["$__rate_interval"]

        def flowing() -> bool:
            assert run.poll() is None, f"streamer run exited {run.returncode}: {(tmp_path / 'run.log').read_text()[-3000:]}"
            answer = prometheus.query(f"min_over_time(rate(streamer_predictions_total[{rate}])[{rate}:1s]) > 0"
                                      f" and on() rate(streamer_checkpoints_total[{rate}]) > 0")
            return answer.get("status") == "success" and bool(answer["data"]["result"])

        # Predictions flowing for a whole rate window, so that every rate() and quantile has samples.
        wait_for(flowing, 40, "predictions and checkpoints in Prometheus for a whole rate window")

        rules = alert_rules()
        for rule in rules:
            assert prometheus.query(rule["expr"])["status"] == "success", rule["alert"]
        asked = [(where, grafana_substitute(expr)) for where, expr in dashboard_expressions()]
        asked += [(f"alert {rule['alert']}", quantity) for rule in rules for quantity in alert_quantities(rule["expr"])]
        # Every expression has data within a few scrapes (a series born a scrape ago has one
        # sample, too few for rate() or deriv()), while the simulator still feeds the run.
        started = time.monotonic()
        deadline = started + 15
        while True:
            empty = [(where, expr, prometheus.query(expr)) for where, expr in asked]
            empty = [(where, expr, answer) for where, expr, answer in empty if not finite_values(answer)]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(SCRAPE_S)
        assert not empty, "expressions without data:\n" + "\n".join(f"{w}: {e} -> {a['data']}" for w, e, a in empty)
        assert simulator.poll() is None, "the simulator stopped before the expressions were asked"
        print(f"{len(asked)} expressions with data, {time.monotonic() - started:.1f}s after predictions flowed")

        # The variables' own queries (Grafana's label_values) find the job and the instance.
        assert prometheus.api("label/job/values", **{"match[]": "streamer_readings_total"})["data"] == ["streamer"]
        assert prometheus.api("label/instance/values", **{"match[]": 'streamer_readings_total{job=~"streamer"}'})[
            "data"] == [f"127.0.0.1:{metrics_port}"]
        # Prometheus evaluated every alert rule on this data without error.
        loaded = {r["name"]: r for g in prometheus.api("rules")["data"]["groups"] for r in g["rules"]}
        assert set(loaded) == {rule["alert"] for rule in rules}
        wait_for(lambda: all(r["health"] == "ok" for g in prometheus.api("rules")["data"]["groups"] for r in g["rules"]),
                 5, "every rule evaluated")
    finally:
        prometheus.stop()
        for process in (simulator, run):
            if process.poll() is None:
                process.terminate()
        for process in (simulator, run):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        run_log.close()
