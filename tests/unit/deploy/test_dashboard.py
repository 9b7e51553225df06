"""The Grafana dashboard and the chart's autoscalers name only metrics the services really export."""

from __future__ import annotations

import json
import re

from prometheus_client.metrics import MetricWrapperBase

from memory3.services.rpc import metrics

from .charts import ROOT, render

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
                 "memory3_num_requests_waiting", "memory3_memory_hits_total"):
        assert name in used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_autoscalers_use_the_queue_gauge():
    series = exported_series()
    hpa = render({}).get("HorizontalPodAutoscaler", "m3-memory3-decoder")
    assert series[hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]] == "gauge"
    scaled = render({"decoder": {"autoscaling": {"keda": {"enabled": True}}}}).of_kind("ScaledObject")[0]
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert series[re.search(r"memory3_\w+", query).group(0)] == "gauge"
