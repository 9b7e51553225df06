"""What the API server, the controllers and the CRDs' webhooks check beyond the objects' schemas (which
kubernetes-validate covers): Indexed Job hostnames, Knative's pod spec, KEDA taking over an HPA, scraping the
autoscalers need, budgets that hold node drains, zero targets, and the in-chart store's secret off its command
line."""

from __future__ import annotations

import csv
import re

import helm_python as helm
import kubernetes_validate
import pytest

from .charts import REQUIRED, ROOT, Rendered, component_name, merge, render

DOCS = ROOT / "docs" / "deployment.md"
ENCODING = {"enabled": True, "shardsVolumeClaim": "shards"}
MONITORING = {"metrics": {"serviceMonitor": {"enabled": True}}}
KEDA = merge({"decoder": {"autoscaling": {"keda": {"enabled": True}}}}, MONITORING)
IN_CHART_STORES = {"s3": {"endpoint": "", "existingSecret": "", "inChart": {"enabled": True}},
                   "redis": {"inChart": {"enabled": True}}}
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def refused(values: dict, *, required: bool = True) -> str:
    """The VALUES VALIDATION message the chart fails with."""
    with pytest.raises(helm.HelmRenderError) as failure:
        render(values, required=required)
    text = str(failure.value)
    assert "VALUES VALIDATION:" in text, text
    return text


def job(r: Rendered, kind: str) -> dict:
    [found] = [j for j in r.of_kind("Job") if re.search(rf"-{kind}-[0-9a-f]{{10}}$", j["metadata"]["name"])]
    return found


def docs_text() -> str:
    return " ".join(DOCS.read_text().split())


# ---------------------------------------------------------------- the Indexed Job's pod hostnames


@pytest.mark.parametrize("shards", [4, 10, 11, 100, 100000])
def test_the_indexed_jobs_pod_hostnames_are_dns_labels_with_the_longest_release_name(shards):
    """Each pod of an Indexed Job is named `<Job name>-<index>` as its hostname, which must be a DNS label of 63
    characters at most: the API server refuses a Job whose last index would not fit."""
    release_name = "r" * 53  # the longest name Helm accepts
    encoding = merge(ENCODING, {"shards": shards, "merge": {"enabled": shards <= 100}})
    r = render({"encoding": encoding}, name=release_name)
    encode = job(r, "encode")
    name = encode["metadata"]["name"]
    assert encode["spec"]["completionMode"] == "Indexed" and encode["spec"]["completions"] == shards
    last_hostname = f"{name}-{shards - 1}"
    assert len(last_hostname) <= 63 and DNS_LABEL.fullmatch(last_hostname), last_hostname
    assert name in r.notes  # NOTES names the Job this render makes
    kubernetes_validate.validate(encode, "1.33.0", strict=True)
    # A short release name keeps the whole prefix: existing Jobs keep their names.
    assert job(render({"encoding": encoding}), "encode")["metadata"]["name"].startswith("m3-memory3-encode-")


# ---------------------------------------------------------------- KServe in Knative mode


@pytest.mark.parametrize(("mode", "knative"), [("Standard", False), ("RawDeployment", False),
                                               ("Knative", True), ("Serverless", True)])
def test_the_predictor_leaves_out_what_knative_refuses(mode, knative):
    """Knative Serving refuses a pod's terminationGracePeriodSeconds and a container's lifecycle."""
    r = render({"kserve": {"enabled": True, "deploymentMode": mode}})
    isvc = r.of_kind("InferenceService")[0]
    predictor = isvc["spec"]["predictor"]
    container = predictor["containers"][0]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == mode
    assert ("terminationGracePeriodSeconds" in predictor) != knative
    assert ("lifecycle" in container) != knative
    # The probes Knative takes stay (the startup probe needs Knative 1.15, which the docs say).
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)


def test_the_docs_name_the_knative_flags_the_decoders_pod_settings_need():
    docs = docs_text()
    for flag in ("kubernetes.podspec-securitycontext", "kubernetes.podspec-nodeselector",
                 "kubernetes.podspec-tolerations", "kubernetes.podspec-runtimeclassname",
                 "kubernetes.podspec-affinity"):
        assert f"`{flag}`" in docs, flag
    assert "config-features" in docs and "`terminationGracePeriodSeconds`" in docs


def test_the_predictors_readiness_probe_allows_a_busy_process_time_to_answer():
    container = render({"kserve": {"enabled": True}}).of_kind("InferenceService")[0]["spec"]["predictor"][
        "containers"][0]
    assert container["readinessProbe"]["timeoutSeconds"] == 3


# ---------------------------------------------------------------- KEDA


def test_the_scaled_object_takes_the_charts_hpa_over():
    """`helm upgrade --set decoder.autoscaling.keda.enabled=true` creates the ScaledObject while the chart's HPA
    still scales the decoder; KEDA's webhook lets it in only to take that HPA over, by its name."""
    hpa = render(MONITORING).get("HorizontalPodAutoscaler", component_name("decoder"))
    scaled = render(KEDA).get("ScaledObject", component_name("decoder"))
    assert scaled["metadata"]["annotations"]["scaledobject.keda.sh/transfer-hpa-ownership"] == "true"
    assert scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"] == hpa["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"] == {k: hpa["spec"]["scaleTargetRef"][k]
                                                for k in ("apiVersion", "kind", "name")}
    docs = docs_text()
    assert "transfer-hpa-ownership" in docs and "kubectl -n memory3 delete scaledobject" in docs


def test_keda_needs_the_series_the_service_monitors_scrape_unless_given_a_query():
    message = refused({"decoder": {"autoscaling": {"keda": {"enabled": True}}}})
    assert "decoder.autoscaling.keda.enabled:" in message and "set metrics.serviceMonitor.enabled=true" in message
    assert "decoder.autoscaling.keda.query" in message
    own = render({"decoder": {"autoscaling": {"keda": {"enabled": True, "query": "sum(my_queue)"}}}})
    assert own.get("ScaledObject", component_name("decoder"))["spec"]["triggers"][0]["metadata"][
        "query"] == "sum(my_queue)"
    render(KEDA)


def test_keda_reports_an_empty_query_instead_of_reading_a_queue_of_zero():
    trigger = render(KEDA).get("ScaledObject", component_name("decoder"))["spec"]["triggers"][0]
    assert trigger["metadata"]["ignoreNullValues"] == "false"
    opted = render(merge(KEDA, {"decoder": {"autoscaling": {"keda": {"ignoreNullValues": True}}}}))
    assert opted.get("ScaledObject", component_name("decoder"))["spec"]["triggers"][0]["metadata"][
        "ignoreNullValues"] == "true"


def test_notes_say_when_the_decoders_hpa_has_nothing_scraped():
    notes = " ".join(render({}).notes.split())
    assert "Nothing in this release scrapes the decoder pods (metrics.serviceMonitor.enabled=false)" in notes
    assert "decoder.autoscaling.minReplicas (1)" in notes
    for values in (MONITORING, {"decoder": {"autoscaling": {"enabled": False}}}, KEDA):
        assert "Nothing in this release scrapes" not in render(values).notes, values


# ---------------------------------------------------------------- targets of zero


@pytest.mark.parametrize(("expression", "path"), [
    ("decoder.autoscaling.targetRequestsWaiting=0.0", "/decoder/autoscaling/targetRequestsWaiting"),
    ("decoder.autoscaling.targetRequestsWaiting=0", "/decoder/autoscaling/targetRequestsWaiting"),
    ("decoder.autoscaling.targetRequestsWaiting=00.000", "/decoder/autoscaling/targetRequestsWaiting"),
    ("decoder.autoscaling.keda.threshold=0", "/decoder/autoscaling/keda/threshold"),
    ("decoder.autoscaling.keda.threshold=0.0", "/decoder/autoscaling/keda/threshold"),
    ("metrics.prometheusRule.backlogPerPod=0.0", "/metrics/prometheusRule/backlogPerPod"),
    ("metrics.prometheusRule.ttftP95Seconds=0.00", "/metrics/prometheusRule/ttftP95Seconds"),
    ("metrics.prometheusRule.errorRatio=0.0", "/metrics/prometheusRule/errorRatio"),
    ("metrics.prometheusRule.memoryWaitP95Seconds=0", "/metrics/prometheusRule/memoryWaitP95Seconds"),
])
def test_a_target_of_zero_is_refused_as_helm_set_gives_it(expression, path):
    """`--set` leaves a decimal a string, which `exclusiveMinimum: 0` does not reach: an HPA with an
    averageValue of 0 is refused by the API server (a metric target must be positive)."""
    with pytest.raises(helm.HelmValuesError) as failure:
        render(merge(REQUIRED, helm.parse_set_string(expression)), required=False)
    assert path in str(failure.value)


@pytest.mark.parametrize("expression", [
    "decoder.autoscaling.targetRequestsWaiting=0.5", "decoder.autoscaling.targetRequestsWaiting=10",
    "decoder.autoscaling.keda.threshold=0.25", "metrics.prometheusRule.errorRatio=1",
    "metrics.prometheusRule.errorRatio=0.01", "metrics.prometheusRule.memoryWaitP95Seconds=0.05",
])
def test_a_positive_target_passes(expression):
    render(merge(merge(REQUIRED, MONITORING), helm.parse_set_string(expression)), required=False)


# ---------------------------------------------------------------- node drains


def test_budgets_let_a_drain_evict_pods_that_are_not_ready():
    r = render({c: {"autoscaling": {"minReplicas": 2}} for c in ("text", "memory", "decoder")})
    budgets = r.of_kind("PodDisruptionBudget")
    assert len(budgets) == 3
    for budget in budgets:
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        for version in ("1.27.0", "1.33.0"):  # beta from 1.27 (the chart's oldest), GA in 1.31
            kubernetes_validate.validate(budget, version, strict=True)


@pytest.mark.parametrize(("values", "message"), [
    ({"decoder": {"autoscaling": {"minReplicas": 2}, "pdb": {"maxUnavailable": 0}}},
     "decoder.pdb.maxUnavailable: 0 lets no pod go"),
    ({"text": {"autoscaling": {"minReplicas": 3}, "pdb": {"maxUnavailable": "0%"}}},
     "text.pdb.maxUnavailable: 0% lets no pod go"),
    # With one pod there is no budget yet; the value would hold every drain once there are two.
    ({"memory": {"pdb": {"maxUnavailable": 0}}}, "memory.pdb.maxUnavailable: 0 lets no pod go"),
], ids=["integer", "percent", "one-pod"])
def test_a_budget_that_lets_no_pod_go_is_refused(values, message):
    text = refused(values)
    assert message in text and "pdb.enabled=false" in text


def test_a_budget_of_zero_without_a_budget_passes():
    render({"decoder": {"pdb": {"enabled": False, "maxUnavailable": 0}}})
    r = render({"text": {"autoscaling": {"minReplicas": 4}, "pdb": {"maxUnavailable": "1%"}}})
    assert r.get("PodDisruptionBudget", component_name("text"))["spec"]["maxUnavailable"] == "1%"


# ---------------------------------------------------------------- resources


def test_every_container_and_init_container_has_requests_and_a_memory_limit():
    """A namespace with a ResourceQuota on requests or limits refuses a pod any of whose containers, init
    containers included, has none."""
    r = render(merge(IN_CHART_STORES, {"kserve": {"enabled": True}, "trainer": {"job": {"enabled": True}},
                                       "encoding": ENCODING}))
    seen = 0
    for o in r.objects:
        if o["kind"] == "InferenceService":
            spec = o["spec"]["predictor"]
        elif o["kind"] in ("Deployment", "Job"):
            spec = o["spec"]["template"]["spec"]
        else:
            continue
        for c in spec["containers"] + spec.get("initContainers", []):
            resources = c.get("resources") or {}
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), (o["metadata"]["name"], c["name"])
            assert "memory" in resources.get("limits", {}), (o["metadata"]["name"], c["name"])
            seen += 1
    assert seen >= 10


@pytest.mark.parametrize("component", ["text", "memory"])
def test_null_resources_get_the_charts_message(component):
    """`--set text.resources=null` failed with a Go type error from inside the template."""
    message = refused({component: {"resources": None}})
    assert f"{component}.resources.requests.cpu: the CPU autoscaler needs a CPU request" in message
    assert "interface conversion" not in message


@pytest.mark.parametrize("values", [
    {"text": {"resources": None, "autoscaling": {"enabled": False}}},
    {"decoder": {"resources": None}},
    merge(IN_CHART_STORES, {"s3": {"inChart": {"resources": None}}, "redis": {"inChart": {"resources": None}}}),
    {"kserve": {"enabled": True, "resources": None}},
    {"encoding": merge(ENCODING, {"resources": None, "merge": {"resources": None}}),
     "trainer": {"job": {"enabled": True, "resources": None}}},
], ids=["text-fixed", "decoder", "in-chart-stores", "kserve", "jobs"])
def test_null_resources_elsewhere_render(values):
    render(values)


def test_the_merge_job_has_its_own_smaller_resources():
    r = render({"encoding": ENCODING})
    merge_resources = job(r, "merge")["spec"]["template"]["spec"]["containers"][0]["resources"]
    encode_resources = job(r, "encode")["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert merge_resources == {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "8Gi"}}
    assert merge_resources["requests"] != encode_resources["requests"]
    mine = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}}
    r = render({"encoding": merge(ENCODING, {"merge": {"resources": mine}})})
    assert job(r, "merge")["spec"]["template"]["spec"]["containers"][0]["resources"] == mine


# ---------------------------------------------------------------- deadlines


def test_jobs_run_without_a_deadline_unless_given_one():
    values = {"trainer": {"job": {"enabled": True}}, "encoding": ENCODING}
    r = render(values)
    for kind in ("train", "encode", "merge"):
        assert "activeDeadlineSeconds" not in job(r, kind)["spec"], kind
    r = render(merge(values, {"trainer": {"job": {"activeDeadlineSeconds": 172800}},
                              "encoding": {"activeDeadlineSeconds": 36000,
                                           "merge": {"activeDeadlineSeconds": 90000}}}))
    deadlines = {kind: job(r, kind)["spec"].get("activeDeadlineSeconds") for kind in ("train", "encode", "merge")}
    assert deadlines == {"train": 172800, "encode": 36000, "merge": 90000}
    for kind in ("train", "encode", "merge"):
        kubernetes_validate.validate(job(r, kind), "1.33.0", strict=True)


def test_a_merge_deadline_within_its_wait_is_refused():
    message = refused({"encoding": merge(ENCODING, {"merge": {"activeDeadlineSeconds": 3600, "waitSeconds": 7200}})})
    assert "encoding.merge.activeDeadlineSeconds: 3600 would stop the merge Job while it waits" in message
    with pytest.raises(helm.HelmValuesError, match="/trainer/job/activeDeadlineSeconds"):
        render({"trainer": {"job": {"activeDeadlineSeconds": -1}}})


# ---------------------------------------------------------------- the decoder's GPU


def test_a_decoder_with_more_than_one_gpu_is_refused():
    message = refused({"decoder": {"gpu": {"enabled": True, "count": 2}}})
    assert "decoder.gpu.count: the decoder and the KServe predictor each run one process on one device" in message
    assert "set decoder.gpu.count=1" in message
    # Not asked for a GPU, the count is not used.
    render({"decoder": {"gpu": {"count": 2}}})


# ---------------------------------------------------------------- credentials in values


@pytest.mark.parametrize("url", [
    "redis://cache:6379/0?password=hunter2",
    "rediss://cache:6380/0?ssl_cert_reqs=required&password=hunter2",
    "redis://cache:6379/0?username=app",
    "redis+sentinel://s1:26379,s2:26379/mymaster/0?sentinel_password=hunter2",
    "redis+sentinel://s1:26379/mymaster/0?Sentinel_Username=app",
])
def test_a_redis_url_with_credentials_in_its_query_is_refused(url):
    assert "redis.url: it holds credentials; put the URL in a Secret" in refused({"redis": {"url": url}})


def test_a_redis_url_without_credentials_passes():
    r = render({"redis": {"url": "redis+sentinel://s1:26379/mymaster/0?socket_timeout=2"}})
    env = r.get("Deployment", component_name("memory"))["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MEMORY3_REDIS_URL", "value": "redis+sentinel://s1:26379/mymaster/0?socket_timeout=2"} in env


def test_the_in_chart_stores_key_pair_is_off_its_command_line():
    """rclone takes --auth-key from RCLONE_AUTH_KEY, reading a list option's variable as CSV: the pair is
    quoted so that it stays one item, "access,secret"."""
    store = render(IN_CHART_STORES).get("Deployment", component_name("s3"))["spec"]["template"]["spec"]
    container = store["containers"][0]
    assert "--auth-key" not in container["args"]
    assert not any("$(" in a for c in store["containers"] + store["initContainers"] for a in c.get("args", []))
    env = container["env"]
    names = [e["name"] for e in env]
    auth = next(e for e in env if e["name"] == "RCLONE_AUTH_KEY")
    # Kubernetes expands $(VAR) only from variables defined before it.
    assert names.index("RCLONE_AUTH_KEY") > max(names.index("S3_ACCESS_KEY"), names.index("S3_SECRET_KEY"))
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in env if "valueFrom" in e}
    assert secrets == {"S3_ACCESS_KEY": "access-key", "S3_SECRET_KEY": "secret-key"}
    expanded = auth["value"].replace("$(S3_ACCESS_KEY)", "AKID0123").replace("$(S3_SECRET_KEY)", "s3cr3t+/Key")
    assert next(csv.reader([expanded])) == ["AKID0123,s3cr3t+/Key"]


# ---------------------------------------------------------------- network


def test_dns_egress_goes_to_the_dns_pods_ports():
    """A NetworkPolicy matches the DNS pods' port after the Service's mapping: 5353 on OpenShift."""
    default = render({})
    openshift = render({"networkPolicy": {"dnsPorts": [53, 5353]}})
    for r, ports in ((default, [53]), (openshift, [53, 5353])):
        policies = r.of_kind("NetworkPolicy")
        assert policies
        for policy in policies:
            dns = [rule for rule in policy["spec"].get("egress", [])
                   if {"port": 53, "protocol": "UDP"} in rule.get("ports", [])]
            if not dns:  # a policy without egress to DNS (the in-chart Redis's)
                continue
            assert dns[0]["ports"] == [{"port": p, "protocol": proto} for p in ports for proto in ("UDP", "TCP")]
            kubernetes_validate.validate(policy, "1.33.0", strict=True)
    assert "networkPolicy.dnsPorts" in docs_text() and "5353" in docs_text()


@pytest.mark.parametrize(("tls", "protocol"), [(True, "tls"), (False, "grpc")])
def test_the_grpc_ports_app_protocol_says_what_they_carry(tls, protocol):
    """With TLS the port carries TLS: a mesh that read `grpc` would parse it as plaintext HTTP/2."""
    r = render({"tls": {"enabled": tls}, "text": {"indexShards": 2}})
    grpc_ports = [p for s in r.of_kind("Service") for p in s["spec"]["ports"] if p["name"] == "grpc"]
    assert len(grpc_ports) == 4  # two text shards, memory, the decoder
    assert {p["appProtocol"] for p in grpc_ports} == {protocol}


# ---------------------------------------------------------------- the shards' claim


def test_the_values_and_docs_say_which_access_mode_the_shards_claim_needs():
    import sys

    from .charts import CHART

    sys.path.insert(0, str(CHART.parent))
    try:
        import generate_schema
    finally:
        sys.path.remove(str(CHART.parent))
    described = generate_schema.descriptions((CHART / "values.yaml").read_text())["encoding.shardsVolumeClaim"]
    for text in (described, docs_text()):
        assert "ReadOnlyMany" in text and "ReadWriteMany" in text and "ReadWriteOnce" in text
    assert "parallelism: 1" in described and "encoding.parallelism=1" in docs_text()
