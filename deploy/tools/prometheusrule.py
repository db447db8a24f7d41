"""Write deploy/k8s/prometheusrule.yaml, the alert rules of deploy/prometheus/alerts.yml as a
prometheus-operator PrometheusRule (an operator's Prometheus loads rules only from those).
tests/test_deploy.py holds the two to each other: run this after changing alerts.yml.

    python deploy/tools/prometheusrule.py          # needs pyyaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1]
HEADER = """\
# streamer's alert rules for prometheus-operator, written by deploy/tools/prometheusrule.py from
# deploy/prometheus/alerts.yml (edit that, then run the tool; tests/test_deploy.py checks they agree).
# The operator's Prometheus loads the PrometheusRules its ruleSelector matches: add the labels it
# selects on (often `release: <the Helm release>`) beside the one below.
"""


def manifest() -> dict:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "streamer", "labels": {"app.kubernetes.io/name": "streamer"}},
        "spec": {"groups": rules["groups"]},
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the folded expressions) as literal blocks, not quoted with escapes."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def main() -> int:
    out = DEPLOY / "k8s" / "prometheusrule.yaml"
    out.write_text(HEADER + yaml.dump(manifest(), Dumper=_Dumper, sort_keys=False, width=120))
    print(f"{out}: {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
