"""Offline checks of k8s/observability/: the Grafana dashboard, the PodMonitor and the PrometheusRule.

No Prometheus, no Grafana, no API server: the Prometheus Operator documents are validated against the CRDs' JSON
Schemas (tests/schemas/prometheus-operator/, see its SOURCE.md), every PromQL expression may name only metrics that
adistill.distributed.metrics defines (as Ray exports them: `ray_` prefix, `_total`, `_bucket`/`_sum`/`_count`), and
the PodMonitor must select the Pods that k8s/ declares, on a port they declare. Each check is shown to reject a
broken input, so a pass means something.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from adistill.distributed.metrics import HISTOGRAM_SUFFIXES, SPECS, exported_names

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OBS = K8S / "observability"
DASHBOARD = OBS / "adistill-dashboard.json"
SCHEMAS = Path(__file__).resolve().parent / "schemas" / "prometheus-operator"
SCHEMA_FILES = {"PodMonitor": "podmonitor_v1.json", "PrometheusRule": "prometheusrule_v1.json"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
# sum by (le) (rate(x_bucket...)) or increase(...): what histogram_quantile needs as its input
QUANTILE_INPUT = re.compile(r"by\s*\([^)]*\ble\b[^)]*\)\s*\(\s*(rate|increase)\(\s*\w+_bucket\b")


# ----------------------------------------------------------------------------------------------------------------
# PromQL: the metric names an expression reads
# ----------------------------------------------------------------------------------------------------------------


def balanced(text: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', text):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def metric_names(expr: str) -> set[str]:
    """The metric names of a PromQL expression: identifiers that are not functions, keywords, label names or
    numbers (label matchers `{...}`, ranges `[...]` and `by (...)` lists are removed first)."""
    assert balanced(expr), f"unbalanced brackets or quotes: {expr}"
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for m in IDENTIFIER.finditer(text):
        before = text[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == "." or m.group() in KEYWORDS:
            continue  # 1e3, a keyword
        if text[m.end() :].lstrip().startswith("("):
            continue  # a function
        names.add(m.group())
    return names


def name_regexes(expr: str) -> list[str]:
    """`{__name__=~"..."}` matchers: they select metrics by name too."""
    return re.findall(r'__name__\s*=~?\s*"([^"]*)"', expr)


def unknown_metrics(expr: str) -> set[str]:
    known = exported_names()
    bad = {n for n in metric_names(expr) if n not in known}
    bad |= {f"__name__=~{r}" for r in name_regexes(expr) if not r.startswith("ray_adistill_")}
    return bad


def test_the_promql_check_catches_unknown_names() -> None:
    assert metric_names('sum by (status) (rate(ray_adistill_requests_total{status=~"5.."}[5m])) > 1e3') == {
        "ray_adistill_requests_total"
    }
    assert unknown_metrics("rate(ray_adistill_reqests_total[5m])") == {"ray_adistill_reqests_total"}
    assert unknown_metrics("rate(ray_adistill_requests[5m])") == {"ray_adistill_requests"}  # Ray adds `_total`
    assert unknown_metrics("ray_adistill_request_seconds") == {"ray_adistill_request_seconds"}  # a histogram
    assert unknown_metrics('up{job="x"} == 0') == {"up"}
    assert unknown_metrics('{__name__=~"node_.+"}') == {"__name__=~node_.+"}
    assert not balanced("sum(rate(x[5m])")
    with pytest.raises(AssertionError):
        metric_names("sum(rate(x[5m])")


def test_exported_names_follow_rays_naming() -> None:
    names = exported_names()
    assert "ray_adistill_requests_total" in names and "ray_adistill_cache_bytes" in names
    for spec in SPECS.values():
        if spec.kind == "histogram":
            assert {"ray_" + spec.name + s for s in HISTOGRAM_SUFFIXES} <= names


# ----------------------------------------------------------------------------------------------------------------
# The Grafana dashboard
# ----------------------------------------------------------------------------------------------------------------


@cache
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def graph_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def expressions(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and of the templating queries."""
    for panel in graph_panels(board):
        for target in panel["targets"]:
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert inner, f"variable {var['name']}: expected label_values(selector, label)"
            yield f"variable {var['name']}", inner.group(1)


def dashboard_errors(board: dict[str, Any]) -> list[str]:
    """What would make the dashboard unimportable or its panels empty."""
    errors = [f"missing {key}" for key in ("title", "uid", "panels", "schemaVersion", "templating") if key not in board]
    if errors:
        return errors
    variables = {v["name"]: v for v in board["templating"]["list"]}
    if variables.get("datasource", {}).get("type") != "datasource":
        errors.append("no datasource variable")
    ids = [p.get("id") for p in board["panels"]]
    if len(ids) != len(set(ids)) or None in ids:
        errors.append(f"panel ids must be unique: {ids}")
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel.get("gridPos", {})
        if set(grid) != {"x", "y", "w", "h"} or grid["x"] + grid["w"] > 24:
            errors.append(f"panel {panel.get('title')!r}: bad gridPos {grid}")
            continue
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        if area & cells:
            errors.append(f"panel {panel.get('title')!r} overlaps another")
        cells |= area
    for panel in graph_panels(board):
        targets = panel.get("targets") or []
        if not targets:
            errors.append(f"panel {panel.get('title')!r}: no targets")
        refs = [t.get("refId") for t in targets]
        if len(refs) != len(set(refs)):
            errors.append(f"panel {panel.get('title')!r}: refIds repeat")
        for target in targets:
            if not target.get("expr"):
                errors.append(f"panel {panel.get('title')!r}: a target without expr")
            if target.get("datasource", panel.get("datasource")) != {"type": "prometheus", "uid": "${datasource}"}:
                errors.append(f"panel {panel.get('title')!r}: not on the datasource variable")
    for where, expr in expressions(board):
        if unknown_metrics(expr):
            errors.append(f"{where}: unknown metrics {sorted(unknown_metrics(expr))}")
        if "histogram_quantile" in expr and not QUANTILE_INPUT.search(expr):
            errors.append(f"{where}: histogram_quantile needs rate(..._bucket) summed by le")
    return errors


def test_the_dashboard_is_importable_and_every_query_reads_adistill_metrics() -> None:
    assert dashboard_errors(dashboard()) == []


def test_the_dashboard_shows_every_metric_and_the_panels_operators_need() -> None:
    used = {n for _, e in expressions(dashboard()) for n in metric_names(e)}
    for spec in SPECS.values():
        assert set(spec.exported) & used, f"{spec.name} is on no panel"
    titles = " | ".join(p["title"].lower() for p in graph_panels(dashboard()))
    for words in ("status", "p50 / p99", "rows per forward", "forward seconds", "hit rate", "cache bytes",
                  "loads", "bank occupancy", "401 / 403 / 429", "tenants per hour", "outcomes"):  # fmt: skip
        assert words in titles, words


@pytest.mark.parametrize(
    "breakage",
    ["unknown metric", "no targets", "overlap", "quantile without le", "missing uid", "hard-coded datasource"],
)
def test_a_broken_dashboard_is_rejected(breakage: str) -> None:
    board = copy.deepcopy(dashboard())
    first = graph_panels(board)[0]
    if breakage == "unknown metric":
        first["targets"][0]["expr"] = "sum(rate(ray_adistill_reqests_total[5m]))"
    elif breakage == "no targets":
        first["targets"] = []
    elif breakage == "overlap":
        graph_panels(board)[1]["gridPos"] = dict(first["gridPos"])
    elif breakage == "quantile without le":
        first["targets"][0]["expr"] = "histogram_quantile(0.99, sum(rate(ray_adistill_request_seconds_bucket[5m])))"
    elif breakage == "missing uid":
        del board["uid"]
    else:
        first["targets"][0]["datasource"] = {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}
    assert dashboard_errors(board)


# ----------------------------------------------------------------------------------------------------------------
# PodMonitor and PrometheusRule
# ----------------------------------------------------------------------------------------------------------------


def observability_docs() -> list[dict[str, Any]]:
    return [
        d
        for p in sorted(OBS.glob("*.yaml"))
        if p.name != "kustomization.yaml"
        for d in yaml.safe_load_all(p.read_text())
    ]


def one(kind: str) -> dict[str, Any]:
    [doc] = [d for d in observability_docs() if d["kind"] == kind]
    return doc


@cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / SCHEMA_FILES[kind]).read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(doc["kind"]).iter_errors(doc)]


def misspell(doc: dict[str, Any], path: tuple[str | int, ...]) -> dict[str, Any]:
    bad = copy.deepcopy(doc)
    *parents, key = path
    target: Any = bad
    for p in parents:
        target = target[p]
    assert isinstance(key, str) and key in target, f"no {key!r} at {parents}"
    target[key + key[-1]] = target.pop(key)
    return bad


def test_observability_holds_a_podmonitor_and_a_prometheusrule() -> None:
    assert "prometheus-operator/prometheus-operator" in (SCHEMAS / "SOURCE.md").read_text()
    assert sorted(d["kind"] for d in observability_docs()) == ["PodMonitor", "PrometheusRule"]


@pytest.mark.parametrize("kind", sorted(SCHEMA_FILES))
def test_validates_against_the_prometheus_operator_schema(kind: str) -> None:
    doc = one(kind)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert schema_errors(doc) == []
    assert schema_errors(misspell(doc, ("spec", next(iter(doc["spec"])))))
    if kind == "PodMonitor":
        assert schema_errors(misspell(doc, ("spec", "podMetricsEndpoints", 0, "port")))
        assert schema_errors(misspell(doc, ("spec", "podMetricsEndpoints", 0, "relabelings", 0, "targetLabel")))
    else:
        assert schema_errors(misspell(doc, ("spec", "groups", 0, "rules", 0, "expr")))


def test_three_alerts_on_errors_latency_and_adapter_loads() -> None:
    [group] = one("PrometheusRule")["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == {"AdistillHighErrorRate", "AdistillHighPredictLatency", "AdistillAdapterLoadFailures"}
    reads = {name: metric_names(rule["expr"]) for name, rule in alerts.items()}
    assert reads["AdistillHighErrorRate"] == {"ray_adistill_requests_total"}
    assert reads["AdistillHighPredictLatency"] == {"ray_adistill_request_seconds_bucket"}
    assert reads["AdistillAdapterLoadFailures"] == {"ray_adistill_adapter_load_failures_total"}
    for name, rule in alerts.items():
        assert unknown_metrics(rule["expr"]) == set(), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name


# The Pods the PodMonitor must find: every head and worker of the RayCluster, the RayService and the RayJob.


def ray_node_pods() -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(where, Ray container, labels KubeRay gives the Pod) of every head and worker group in k8s/*.yaml."""
    out = []
    for path in sorted(K8S.glob("ray*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = doc["spec"]
            cluster = (
                spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
            )
            groups = [("head", cluster["headGroupSpec"])] + [("worker", g) for g in cluster["workerGroupSpecs"]]
            for node_type, group in groups:
                labels = dict(group["template"].get("metadata", {}).get("labels", {}))
                labels |= {"ray.io/node-type": node_type, "ray.io/cluster": doc["metadata"]["name"]}  # set by KubeRay
                where = f"{path.name}:{doc['kind']}/{group.get('groupName', 'head')}"
                out.append(
                    (where, group["template"]["spec"]["containers"][0] | {"_params": group["rayStartParams"]}, labels)
                )
    return out


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) applied to a Pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        value, op = labels.get(e["key"]), e["operator"]
        ok = {
            "In": value in e.get("values", []),
            "NotIn": value not in e.get("values", []),
            "Exists": value is not None,
            "DoesNotExist": value is None,
        }[op]
        if not ok:
            return False
    return True


def test_the_podmonitor_scrapes_every_ray_pod_on_its_declared_metrics_port() -> None:
    monitor = one("PodMonitor")["spec"]
    [endpoint] = monitor["podMetricsEndpoints"]
    pods = ray_node_pods()
    assert len(pods) >= 7, "RayCluster (head, cpu, gpu), RayService (head, gpu), RayJob (head, gpu)"
    for where, container, labels in pods:
        assert selects(monitor["selector"], labels), f"{where}: not selected by the PodMonitor"
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert endpoint["port"] in ports, f"{where}: no container port {endpoint['port']!r}"
        assert str(ports[endpoint["port"]]) == container["_params"]["metrics-export-port"], f"{where}: port mismatch"
    submitter = {"app.kubernetes.io/name": "adistill"}  # the RayJob's submitter Pod is no Ray node: not scraped
    assert not selects(monitor["selector"], submitter)
    assert not selects(monitor["selector"], pods[0][2] | {"app.kubernetes.io/part-of": "other"})
    assert not selects(monitor["selector"], pods[0][2] | {"ray.io/node-type": "submitter"})
    targets = {r["targetLabel"] for r in endpoint["relabelings"]}
    assert "ray_io_cluster" in targets, "the dashboard and the alerts group by ray_io_cluster"


# ----------------------------------------------------------------------------------------------------------------
# kustomize
# ----------------------------------------------------------------------------------------------------------------


def test_observability_is_its_own_kustomization_not_part_of_the_base() -> None:
    """The base must apply on a cluster without the Prometheus Operator's CRDs: monitoring is applied on its own."""
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert not [r for r in base["resources"] if "observability" in r]
    own = yaml.safe_load((OBS / "kustomization.yaml").read_text())
    assert own["namespace"] == base["namespace"]
    for resource in own["resources"]:
        assert (OBS / resource).is_file(), resource
    [generator] = own["configMapGenerator"]
    assert generator["files"] == [DASHBOARD.name]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1", "what the Grafana sidecar looks for"


def test_kustomize_build_of_observability() -> None:
    kubectl, kustomize = shutil.which("kubectl"), shutil.which("kustomize")
    if not (kubectl or kustomize):
        pytest.skip("neither kubectl nor kustomize is installed")
    command = [kubectl, "kustomize", str(OBS)] if kubectl else [str(kustomize), "build", str(OBS)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    assert set(docs) == {"ConfigMap", "PodMonitor", "PrometheusRule"}
    for doc in docs.values():
        assert doc["metadata"]["namespace"] == "adistill"
    assert json.loads(docs["ConfigMap"]["data"][DASHBOARD.name]) == dashboard()
    for kind in SCHEMA_FILES:
        assert schema_errors(docs[kind]) == []


def test_operations_doc_lists_every_metric() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    for spec in SPECS.values():
        documented = "ray_" + spec.name + ("_total" if spec.kind == "counter" else "")
        assert f"`{documented}`" in text, f"docs/operations.md: no row for {documented}"
    assert "k8s/observability/" in text
