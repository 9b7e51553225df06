"""The Grafana dashboard, the chart's autoscalers and its alerting rules name only metrics the services
really export, with the labels their scrape gives them."""

from __future__ import annotations

import json
import re

import promql_parser
import pytest
from prometheus_client.metrics import MetricWrapperBase

from memory3.services.rpc import metrics

from .charts import NAMESPACE, ROOT, render

DASHBOARD = ROOT / "deploy" / "grafana" / "memory3-dashboard.json"


def exported_series() -> dict[str, str]:
    """Series name -> metric type, as Prometheus scrapes them (counters get _total, histograms _bucket...)."""
    series = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name, kind = value._name, value._type
            if kind == "counter":
                series[f"{name}_total"] = kind
            elif kind == "histogram":
                series.update({f"{name}_{suffix}": kind for suffix in ("bucket", "sum", "count")})
            else:
                series[name] = kind
    return series


def test_dashboard_queries_name_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    series = exported_series()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bmemory3_\w+", e)}
    assert used and used <= set(series), sorted(used - set(series))
    # Latency, queue and memory-tier panels are all there.
    for name in ("memory3_time_to_first_token_seconds_bucket", "memory3_inter_token_latency_seconds_bucket",
                 "memory3_num_requests_waiting", "memory3_memory_hits_total", "memory3_retrieval_requests_waiting",
                 "memory3_retrieval_queue_time_seconds_bucket"):
        assert name in used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_autoscalers_use_the_queue_gauge():
    series = exported_series()
    hpa = render({}).get("HorizontalPodAutoscaler", "m3-memory3-decoder")
    assert series[hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]] == "gauge"
    text = render({"text": {"autoscaling": {"targetRequestsWaiting": 2}}}).get("HorizontalPodAutoscaler",
                                                                                "m3-memory3-text")
    assert series[text["spec"]["metrics"][1]["pods"]["metric"]["name"]] == "gauge"
    scaled = render({"decoder": {"autoscaling": {"keda": {"enabled": True}}},
                     "metrics": {"serviceMonitor": {"enabled": True}}}).of_kind("ScaledObject")[0]
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert series[re.search(r"memory3_\w+", query).group(0)] == "gauge"


ALERTS = {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}


@pytest.mark.parametrize("shards", [1, 3])
def test_alerting_rules_parse_and_read_exported_series_of_the_scraped_services(shards):
    r = render(ALERTS | {"text": {"indexShards": shards}})
    rules = [rule for group in r.of_kind("PrometheusRule")[0]["spec"]["groups"] for rule in group["rules"]]
    series = exported_series()
    # Prometheus labels a target with its Service's name: those the ServiceMonitors select.
    scraped = {svc["metadata"]["name"] for m in r.of_kind("ServiceMonitor") for svc in r.of_kind("Service")
               if m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()}
    assert len(scraped) == 2 + shards
    assert {"Memory3TargetDown", "Memory3DecoderBacklog", "Memory3RedisTierDown", "Memory3ObjectStoreErrors",
            "Memory3CorruptMemory"} <= {rule["alert"] for rule in rules}
    for rule in rules:
        expr = rule["expr"]
        promql_parser.parse(expr)  # Prometheus' grammar: a typo fails here, not at the operator's reload
        used = set(re.findall(r"\bmemory3_\w+", expr))
        assert used <= set(series), (rule["alert"], sorted(used - set(series)))
        services = re.findall(r'service=~?"([^"]+)"', expr)
        assert services and all(any(re.fullmatch(s, name) for name in scraped) for s in services), rule["alert"]
        assert all(f'namespace="{NAMESPACE}"' in selector for selector in re.findall(r"\{[^}]*\}", expr))
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # A target down is any of them, each index shard of the text service included.
    down = re.search(r'service=~"([^"]+)"', next(r["expr"] for r in rules if r["alert"] == "Memory3TargetDown"))
    assert all(re.fullmatch(down.group(1), name) for name in scraped)
    # Tier and code labels are those the services set.
    assert 'tier="redis"' in next(r["expr"] for r in rules if r["alert"] == "Memory3RedisTierDown")


def test_alert_thresholds_come_from_values():
    rules = {rule["alert"]: rule for rule in render(ALERTS | {"metrics": {**ALERTS["metrics"], "prometheusRule": {
        "enabled": True, "backlogPerPod": 3, "errorRatio": 0.2}}}).of_kind("PrometheusRule")[0]["spec"]["groups"][0][
        "rules"]}
    assert rules["Memory3DecoderBacklog"]["expr"].endswith("> 3")
    assert rules["Memory3RequestErrors"]["expr"].endswith("> 0.2")
    assert "More than 20% of" in rules["Memory3RequestErrors"]["annotations"]["summary"]


@pytest.mark.parametrize("expr", ["sum(rate(memory3_x[5m])", "up{a=}"])
def test_the_promql_parser_rejects_what_prometheus_would(expr):
    """The check above is only as good as the parser's strictness."""
    with pytest.raises(Exception):  # noqa: B017 -- it raises its own error types
        promql_parser.parse(expr)
