"""Write the JSON schemas kubeconform validates deploy/k8s/ against (deploy/k8s/schemas/), for
the kinds the manifests use only, from sources fetched through the Go module proxy:

- core kinds: the OpenAPI v2 spec of Kubernetes (k8s.io/kubernetes, api/openapi-spec/swagger.json);
- ScaledObject, TriggerAuthentication: KEDA's CRDs (github.com/kedacore/keda/v2, config/crd/bases);
- PodMonitor, PrometheusRule: prometheus-operator's CRDs (example/prometheus-operator-crd).

Each schema is standalone (the definitions it needs, no others, no descriptions) and strict
(objects refuse properties they do not declare, as `kubectl apply --validate=strict` does), named
as kubeconform's `{{ .ResourceKind }}{{ .KindSuffix }}.json` template expects.

    python deploy/tools/k8s_schemas.py          # needs `go` (module downloads) and pyyaml
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

KUBERNETES = "k8s.io/kubernetes@v1.34.3"
KEDA = "github.com/kedacore/keda/v2@v2.21.0"
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
# (apiVersion, kind, OpenAPI definition)
CORE_KINDS = [
    ("v1", "ConfigMap", "io.k8s.api.core.v1.ConfigMap"),
    ("v1", "Secret", "io.k8s.api.core.v1.Secret"),
    ("v1", "Service", "io.k8s.api.core.v1.Service"),
    ("v1", "ServiceAccount", "io.k8s.api.core.v1.ServiceAccount"),
    ("v1", "PersistentVolumeClaim", "io.k8s.api.core.v1.PersistentVolumeClaim"),
    ("batch/v1", "Job", "io.k8s.api.batch.v1.Job"),
    ("apps/v1", "StatefulSet", "io.k8s.api.apps.v1.StatefulSet"),
    ("policy/v1", "PodDisruptionBudget", "io.k8s.api.policy.v1.PodDisruptionBudget"),
]
# (module, file in it, served version)
CRDS = [
    (KEDA, "config/crd/bases/keda.sh_scaledobjects.yaml", "v1alpha1"),
    (KEDA, "config/crd/bases/keda.sh_triggerauthentications.yaml", "v1alpha1"),
    (PROMETHEUS_OPERATOR, "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml", "v1"),
    (PROMETHEUS_OPERATOR, "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml", "v1"),
]
INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}


def module_dir(module: str) -> Path:
    """Where `go mod download` put ``module`` (path@version)."""
    out = subprocess.run(["go", "mod", "download", "-json", module], capture_output=True, text=True, check=False)
    info = json.loads(out.stdout or "{}")
    if out.returncode != 0 or "Dir" not in info:
        sys.exit(f"go mod download {module} failed: {info.get('Error') or out.stderr.strip()}")
    return Path(info["Dir"])


def schema_name(api_version: str, kind: str) -> str:
    """kubeconform's {{ .ResourceKind }}{{ .KindSuffix }}: statefulset-apps-v1, podmonitor-monitoring-v1."""
    group, _, version = api_version.rpartition("/")
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return f"{kind.lower()}{suffix.lower()}.json"


def strict(node: Any) -> Any:
    """``node`` without descriptions, with int-or-string types spelled out and objects closed."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("format") == "int-or-string" or node.get("x-kubernetes-int-or-string"):
        return dict(INT_OR_STRING)
    out = {k: strict(v) for k, v in node.items() if k not in ("description", "x-kubernetes-group-version-kind")}
    if "properties" in out and "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def references(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].rsplit("/", 1)[1]} if "$ref" in node else set()
        for value in node.values():
            found |= references(value)
        return found
    if isinstance(node, list):
        return set().union(*(references(item) for item in node)) if node else set()
    return set()


def core_schema(definitions: dict[str, Any], api_version: str, kind: str, name: str) -> dict[str, Any]:
    needed, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in needed:
            needed.add(current)
            todo.extend(references(definitions[current]))
    kept = {n: strict(definitions[n]) for n in sorted(needed - {name})}
    if "io.k8s.apimachinery.pkg.api.resource.Quantity" in kept:  # "500m" or 2: a string in the spec
        kept["io.k8s.apimachinery.pkg.api.resource.Quantity"] = dict(QUANTITY)
    schema = strict(definitions[name])
    schema["properties"]["apiVersion"] = {"type": "string", "enum": [api_version]}
    schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
    schema["definitions"] = kept
    schema["$schema"] = "http://json-schema.org/schema#"
    return schema


def crd_schema(crd: dict[str, Any], version: str) -> tuple[str, str, dict[str, Any]]:
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    served = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not served:
        sys.exit(f"CRD {kind}: no version {version}")
    schema = strict(served[0]["schema"]["openAPIV3Schema"])
    api_version = f"{group}/{version}"
    schema["properties"]["apiVersion"] = {"type": "string", "enum": [api_version]}
    schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
    schema["properties"]["metadata"] = {"type": "object"}  # the API server's ObjectMeta; not in the CRD
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
    schema["$schema"] = "http://json-schema.org/schema#"
    return api_version, kind, schema


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "k8s" / "schemas")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    swagger = json.loads((module_dir(KUBERNETES) / "api" / "openapi-spec" / "swagger.json").read_text())
    written = []
    for api_version, kind, name in CORE_KINDS:
        path = args.out / schema_name(api_version, kind)
        path.write_text(json.dumps(core_schema(swagger["definitions"], api_version, kind, name), sort_keys=True) + "\n")
        written.append(path)
    for module, file, version in CRDS:
        crd = yaml.safe_load((module_dir(module) / file).read_text())
        api_version, kind, schema = crd_schema(crd, version)
        path = args.out / schema_name(api_version, kind)
        path.write_text(json.dumps(schema, sort_keys=True) + "\n")
        written.append(path)
    for path in written:
        print(f"{path}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
