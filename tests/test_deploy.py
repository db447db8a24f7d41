"""deploy/ checked by the real parsers, no Docker engine or cluster: promtool (Prometheus config,
alert rules and their unit tests), compose-go (docker-compose.yml, through
deploy/tools/composecheck), kubeconform (deploy/k8s/ against the schemas the repo carries), and
streamer's own settings loader and CLI parser for the settings and commands they pass to it."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from streamer.cli import build_parser, settings_from_args
from streamer.settings import load_settings, unknown_env_vars

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml")) + sorted((K8S / "gpu").glob("*.yaml"))
SCHEMA_LOCATION = str(K8S / "schemas") + "/{{ .ResourceKind }}{{ .KindSuffix }}.json"
STREAMER_IMAGE = "streamer:"  # images built from deploy/Dockerfile, whose entrypoint is `streamer`

PROMTOOL = shutil.which("promtool")
GO = shutil.which("go") or next((p for p in ["/usr/local/go/bin/go"] if Path(p).is_file()), None)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="no promtool on PATH (Debian: apt-get install prometheus)")
needs_go = pytest.mark.skipif(GO is None, reason="no go toolchain (builds compose-go and kubeconform from the Go module proxy)")


def tool(module: str, package: str = ".") -> Path:
    """The binary of ``package`` built in deploy/tools/``module`` (its own go.mod), cached under
    ~/.cache/streamer/deploy-tools by a hash of the module's sources: rebuilt only when they change."""
    source = DEPLOY / "tools" / module
    digest = hashlib.sha256()
    for path in sorted(source.glob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamer" / "deploy-tools"
    binary = cache / f"{module}-{digest.hexdigest()[:16]}"
    if not binary.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOFLAGS": "-mod=mod", "PATH": f"{Path(GO).parent}:{os.environ.get('PATH', '')}"}
        built = subprocess.run([GO, "build", "-o", str(binary), package], cwd=source, env=env,
                               capture_output=True, text=True, timeout=600)
        assert built.returncode == 0, f"go build in {source} failed:\n{built.stderr[-4000:]}"
    return binary


def run(*argv: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=300)


# --- Prometheus ---------------------------------------------------------------------------------

@needs_promtool
def test_promtool_checks_config_and_rules():
    config = run(PROMTOOL, "check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert config.returncode == 0 and "SUCCESS: 1 rule files found" in config.stdout, config.stdout + config.stderr
    rules = run(PROMTOOL, "check", "rules", PROMETHEUS_DIR / "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr


@needs_promtool
def test_every_alert_fires_in_the_rule_unit_tests():
    result = run(PROMTOOL, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    alerts = {r["alert"] for g in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    fired = {
        case["alertname"]
        for test in yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts - fired == set(), "alerts no unit test shows firing"


# --- docker compose -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose_checked(tmp_path_factory) -> tuple[dict, dict]:
    """(the project compose-go loaded, what each built image runs as) of docker-compose.yml."""
    if GO is None:
        pytest.skip("no go toolchain (builds compose-go from the Go module proxy)")
    out = tmp_path_factory.mktemp("compose")
    result = run(tool("composecheck"), "-json", out / "project.json", "-images", out / "images.json",
                 REPO / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "project.json").read_text()), json.loads((out / "images.json").read_text())


@pytest.fixture(scope="module")
def compose_project(compose_checked: tuple[dict, dict]) -> dict:
    return compose_checked[0]


def streamer_commands(service: dict, image: dict) -> list[list[str]]:
    """The `streamer ...` argument lists a service built from deploy/Dockerfile runs: its command
    (after the image's entrypoint `streamer`), or the `streamer` lines of a shell script it runs."""
    entrypoint, command = service.get("entrypoint") or [], service.get("command") or image["cmd"]
    if not entrypoint:
        assert image["entrypoint"] == ["streamer"], image
        return [command]
    assert entrypoint[0] in ("/bin/sh", "/bin/bash") and entrypoint[-1].endswith("c"), entrypoint
    script = " ".join(command).replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in script.splitlines() if line.strip().startswith("streamer ")]


def test_compose_file_loads_and_its_services_are_complete(compose_project: dict):
    services = compose_project["services"]
    assert {"kafka", "topics", "train", "simulator", "streamer", "streamer-gpu", "prometheus", "grafana"} <= set(services)
    assert services["streamer"]["restart"] == "unless-stopped" and services["streamer"]["healthcheck"]["test"]
    assert {"checkpoints", "models"} <= set(compose_project["volumes"])
    gpu = services["streamer-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert "29092" in {p.get("published") for p in services["kafka"]["ports"]}  # clients on the host


def test_compose_streamer_image_runs_unprivileged_with_a_healthcheck(compose_checked: tuple[dict, dict]):
    project, images = compose_checked
    built = {name for name, service in project["services"].items() if service.get("build")}
    assert built == set(images) and built >= {"streamer", "streamer-gpu", "train", "simulator"}
    for name in built:
        assert images[name]["dockerfile"] == str(DEPLOY / "Dockerfile")
        assert images[name]["user"].split(":")[0] not in ("", "root", "0"), images[name]
        assert images[name]["healthcheck"] and images[name]["entrypoint"] == ["streamer"], images[name]
    for name in ("train", "simulator"):  # not `streamer run`: the image's /healthz check is off
        assert project["services"][name]["healthcheck"]["disable"] is True


def test_compose_streamer_commands_and_settings_are_real(compose_checked: tuple[dict, dict], monkeypatch):
    project, images = compose_checked
    checked = 0
    for name, service in project["services"].items():
        if not service.get("image", "").startswith(STREAMER_IMAGE):
            continue
        environment = {k: v for k, v in (service.get("environment") or {}).items() if v is not None}
        assert unknown_env_vars(environment) == [], name
        for key in [k for k in os.environ if k.startswith("STREAMER_")]:
            monkeypatch.delenv(key)
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        for argv in streamer_commands(service, images[name]):
            args = build_parser().parse_args(argv)  # a bad flag: SystemExit(2)
            if argv[0] in ("run", "simulate"):
                settings_from_args(args)  # a bad value in the environment: SystemExit(2)
            checked += 1
    assert checked >= 4  # train, simulator, streamer, streamer-gpu


def test_compose_prometheus_and_grafana_point_at_the_services(compose_project: dict):
    services = compose_project["services"]
    mounts = {(v["source"], v["target"]) for v in services["prometheus"]["volumes"] if v["type"] == "bind"}
    assert (str(PROMETHEUS_DIR), "/etc/prometheus") in mounts
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    scrape = [c for c in config["scrape_configs"] if c["job_name"] == "streamer"][0]
    port = services["streamer"]["environment"]["STREAMER_METRICS__PORT"]
    assert f"streamer:{port}" in scrape["static_configs"][0]["targets"]
    gpu = scrape["dns_sd_configs"][0]
    assert gpu["names"] == ["streamer-gpu"] and str(gpu["port"]) == services["streamer-gpu"]["environment"][
        "STREAMER_METRICS__PORT"]

    grafana = services["grafana"]
    binds = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    datasources = yaml.safe_load((binds["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").read_text())
    url = urlparse(datasources["datasources"][0]["url"])
    assert url.hostname == "prometheus" and url.port in {p["target"] for p in services["prometheus"]["ports"]}
    providers = yaml.safe_load((binds["/etc/grafana/provisioning"] / "dashboards" / "streamer.yml").read_text())
    assert providers["providers"][0]["options"]["path"] in binds
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (binds["/var/lib/grafana/dashboards"] / Path(home).name).is_file()
    assert json.loads((binds["/var/lib/grafana/dashboards"] / Path(home).name).read_text())["uid"] == "streamer-overview"


@needs_go
def test_composecheck_reports_what_would_break_compose_up(tmp_path: Path):
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim AS base\nARG A\n")
    (tmp_path / "compose.yml").write_text(yaml.safe_dump({"services": {
        "built": {"build": {"context": ".", "args": {"B": "1"}, "target": "nope"}, "volumes": ["./missing:/m"]},
        "waits": {"image": "redis", "depends_on": {"built": {"condition": "service_healthy"},
                                                   "loops": {"condition": "service_completed_successfully"}}},
        "loops": {"image": "redis:7", "restart": "always"},
    }}))
    result = run(tool("composecheck"), tmp_path / "compose.yml")
    assert result.returncode == 1, result.stderr
    for problem in ['build target "nope" is not a stage', "build arg B is not declared", "missing does not exist",
                    'image "redis" is not pinned', "waits for built to be healthy", "waits for loops to complete"]:
        assert problem in result.stderr, (problem, result.stderr)
    # What compose-go itself refuses is a load error: exit 2 with its message.
    (tmp_path / "compose.yml").write_text(yaml.safe_dump({"services": {"nothing": {"environment": {"A": "1"}}}}))
    result = run(tool("composecheck"), tmp_path / "compose.yml")
    assert result.returncode == 2 and "neither an image nor a build context" in result.stderr, result.stderr


# --- Kubernetes ---------------------------------------------------------------------------------

def manifests() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


@needs_go
def test_kubeconform_validates_the_manifests_strictly():
    result = run(tool("kubeconform", "github.com/yannh/kubeconform/cmd/kubeconform"), "-strict", "-summary",
                 "-schema-location", SCHEMA_LOCATION, *MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Valid: {len(manifests())}, Invalid: 0, Errors: 0, Skipped: 0" in result.stdout, result.stdout


@needs_go
def test_kubeconform_refuses_a_misspelt_field(tmp_path: Path):
    bad = tmp_path / "statefulset.yaml"
    bad.write_text((K8S / "statefulset.yaml").read_text().replace("readinessProbe:", "readynessProbe:"))
    result = run(tool("kubeconform", "github.com/yannh/kubeconform/cmd/kubeconform"), "-strict",
                 "-schema-location", SCHEMA_LOCATION, bad)
    assert result.returncode == 1 and "readynessProbe" in result.stdout, result.stdout + result.stderr


def dockerfile_env() -> dict[str, str]:
    """The environment deploy/Dockerfile's runtime stage sets (its ENV lines, KEY=VALUE form)."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text.split(" AS runtime", 1)[1]
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            env.update(word.split("=", 1) for word in shlex.split(line[4:]))
    return env


def test_the_images_settings_are_a_config_file_that_a_mounted_one_replaces(tmp_path: Path, monkeypatch):
    """Settings in the image's environment override any config file: a ConfigMap's checkpoint
    directory, model path or metrics port had been ignored without a word (and the pod crash-looped
    on a directory of the read-only root). The image names its own config file instead."""
    env = dockerfile_env()
    assert [k for k in env if k.startswith("STREAMER_")] == ["STREAMER_CONFIG"]
    assert env["STREAMER_CONFIG"] == "/etc/streamer/streamer.toml"
    assert "COPY deploy/streamer.toml /etc/streamer/streamer.toml" in (DEPLOY / "Dockerfile").read_text()
    assert "!deploy/streamer.toml" in (REPO / ".dockerignore").read_text().splitlines()
    for key in [k for k in os.environ if k.startswith("STREAMER_")]:
        monkeypatch.delenv(key)
    image = load_settings(config_file=DEPLOY / "streamer.toml")
    assert (str(image.model.path), str(image.checkpoint.directory)) == ("/models/model.pt", "/var/lib/streamer/checkpoints")
    assert (image.metrics.host, image.metrics.port) == ("0.0.0.0", 9100)
    assert "EXPOSE 9100" in (DEPLOY / "Dockerfile").read_text()
    mounted = tmp_path / "streamer.toml"
    mounted.write_text('[model]\npath = "/models/v2/model.pt"\n[checkpoint]\ndirectory = "/data/cp"\n'
                       '[metrics]\nhost = "0.0.0.0"\nport = 9200\n')
    theirs = load_settings(config_file=mounted)
    assert (str(theirs.model.path), str(theirs.checkpoint.directory), theirs.metrics.port) == (
        "/models/v2/model.pt", "/data/cp", 9200)


def test_k8s_settings_load_and_the_pieces_fit(tmp_path: Path, monkeypatch):
    docs = {(doc["kind"], doc["metadata"]["name"], path.parent.name): doc for path, doc in manifests()}
    config_map = docs["ConfigMap", "streamer", "k8s"]
    secret = docs["Secret", "streamer-kafka", "k8s"]
    toml = tmp_path / "streamer.toml"
    toml.write_text(config_map["data"]["streamer.toml"])
    for key in [k for k in os.environ if k.startswith("STREAMER_")]:
        monkeypatch.delenv(key)
    scaled = docs["ScaledObject", "streamer", "k8s"]
    image_env = dockerfile_env()
    for folder in ("k8s", "gpu"):
        statefulset = docs["StatefulSet", "streamer", folder]
        pod = statefulset["spec"]["template"]
        container = pod["spec"]["containers"][0]
        environment = dict(image_env)  # the image's, which the pod's own override
        for var in container["env"]:
            if "secretKeyRef" in var.get("valueFrom", {}):
                ref = var["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
                environment[var["name"]] = secret["stringData"][ref["key"]]
            else:
                environment[var["name"]] = var.get("value", "streamer-0")  # fieldRef: the pod name
        assert unknown_env_vars(environment) == [], folder
        mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["config"]
        assert environment.pop("STREAMER_CONFIG") == f"{mount}/streamer.toml"
        with monkeypatch.context() as env:
            for key, value in environment.items():
                env.setenv(key, value)
            settings = load_settings(config_file=toml)
        assert settings.kafka.sasl_password.get_secret_value() == secret["stringData"]["password"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == settings.metrics.port and settings.metrics.host == "0.0.0.0"
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert container["resources"]["requests"]["cpu"]
        assert ("nvidia.com/gpu" in container["resources"]["limits"]) == (folder == "gpu")
        assert (settings.model.device == "cuda") == (folder == "gpu")
        assert pod["metadata"]["labels"].items() >= docs["PodMonitor", "streamer", "k8s"]["spec"]["selector"][
            "matchLabels"].items()
        assert statefulset["spec"]["serviceName"] == "streamer"
        trigger = scaled["spec"]["triggers"][0]["metadata"]
        assert trigger["consumerGroup"] == settings.kafka.group_id and trigger["topic"] == settings.kafka.input_topic
        assert trigger["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert docs["Service", "streamer", "k8s"]["spec"]["clusterIP"] == "None"
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "streamer"}
    assert scaled["spec"]["triggers"][0]["metadata"]["allowIdleConsumers"] == "false"  # capped at the partitions
    assert docs["PodMonitor", "streamer", "k8s"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_every_dashboard_override_names_a_series_of_its_panel():
    """An override matched by name applies to nothing when no query of its panel has that legend:
    the anomaly share (about 0.002) had been drawn on the flagged readings' axis, a flat zero."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "streamer.json").read_text())
    checked = 0
    for panel in dashboard["panels"]:
        legends = {t.get("legendFormat") for t in panel.get("targets", [])}
        for override in panel.get("fieldConfig", {}).get("overrides", []):
            if override["matcher"]["id"] == "byName":
                assert override["matcher"]["options"] in legends, (panel["title"], override["matcher"], legends)
                checked += 1
    assert checked >= 1


def test_the_prometheusrule_carries_the_alert_rules_as_they_are():
    """prometheus-operator loads rules only from PrometheusRules: the manifest is alerts.yml's
    groups, written by deploy/tools/prometheusrule.py, and must not drift from them."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    manifest = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert manifest["spec"]["groups"] == rules["groups"], "run python deploy/tools/prometheusrule.py"
    assert manifest["metadata"]["labels"]["app.kubernetes.io/name"] == "streamer"


@pytest.mark.parametrize("variant, with_cxx, installs", [("cpu", "0", None), ("cpu", "1", "g++"), ("cu124", "0", "gcc"),
                                                         ("cu121", "1", "g++")])
def test_the_runtime_image_gets_the_compilers_its_steps_need(tmp_path: Path, variant: str, with_cxx: str,
                                                             installs: str | None):
    """Triton builds the fused CUDA step's launcher with a C compiler at its first launch: a CUDA
    image without one had served nothing (the torch step now serves instead, slower). The runtime
    stage's install step, run by sh with apt-get and rm recorded instead of run."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text.split(" AS runtime", 1)[1]
    [script] = [line[4:] for line in runtime.splitlines() if line.startswith("RUN ") and "apt-get install" in line]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("apt-get", "rm"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {tmp_path / "calls"}\n')
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TORCH_VARIANT": variant, "WITH_CXX": with_cxx}
    subprocess.run(["sh", "-ec", script], env=env, check=True, timeout=30)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    installed = [line.split()[-1] for line in calls if line.startswith("apt-get install")]
    assert installed == ([installs] if installs else []), calls
    # Triton writes the launcher it builds under TRITON_CACHE_DIR: /tmp, writable in the pods
    # (an emptyDir under readOnlyRootFilesystem), where its default, ~/.triton, is not.
    assert dockerfile_env()["TRITON_CACHE_DIR"].startswith("/tmp/")
    for manifest in (K8S / "statefulset.yaml", K8S / "gpu" / "statefulset.yaml"):
        assert "{name: tmp, mountPath: /tmp}" in manifest.read_text(), manifest
