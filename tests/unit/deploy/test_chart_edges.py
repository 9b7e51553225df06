"""The chart across upgrades and with values as users give them: Jobs renamed when their (immutable) spec
changes, the merged release served without a new trainer Job, `helm --set` values, null lists, the pods
outside the main Deployments, and the NetworkPolicy and Service edges."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from .charts import CHART, REQUIRED, ROOT, Rendered, component_name, labels_match, merge, render

JOBS = {"trainer": {"job": {"enabled": True, "quick": True}},
        "encoding": {"enabled": True, "shardsVolumeClaim": "shards"}}
IN_CHART_STORES = {"s3": {"endpoint": "", "existingSecret": "", "inChart": {"enabled": True}},
                   "redis": {"inChart": {"enabled": True}}}


def jobs(r: Rendered) -> dict[str, dict]:
    """kind of Job (train, encode, merge) -> the Job."""
    return {re.search(r"-(train|encode|merge)-[0-9a-f]{10}$", j["metadata"]["name"]).group(1): j
            for j in r.of_kind("Job")}


def chart_copy(directory: Path, **chart_yaml) -> Path:
    copied = directory / "memory3"
    shutil.copytree(CHART, copied)
    meta = yaml.safe_load((copied / "Chart.yaml").read_text()) | chart_yaml
    (copied / "Chart.yaml").write_text(yaml.safe_dump(meta))
    return copied


def pod_spec(o: dict) -> dict:
    if o["kind"] == "InferenceService":
        return o["spec"]["predictor"]
    return o["spec"]["template"]["spec"] if "template" in o["spec"] else o["spec"]


# ---------------------------------------------------------------- 1. Jobs are immutable


@pytest.mark.parametrize(("change", "renamed"), [
    ({"image": {"tag": "0.1.1"}}, {"train", "encode", "merge"}),
    ({"image": {"digests": {"cpu": "sha256:" + "a" * 64}}}, {"train", "encode", "merge"}),
    ({"trainer": {"job": {"resources": {"requests": {"cpu": "8"}}}}}, {"train"}),
    ({"encoding": {"shards": 8}}, {"encode", "merge"}),
    ({"trainer": {"job": {"gpu": {"enabled": True}}}}, {"train"}),
    ({"encoding": {"gpu": {"enabled": True}}}, {"encode"}),  # the merge encodes nothing: it stays on the CPU
    ({"s3": {"bucket": "other"}}, {"train", "encode", "merge"}),
    ({"imagePullSecrets": [{"name": "regcred"}]}, {"train", "encode", "merge"}),
    ({"decoder": {"replicaCount": 3}}, set()),
])
def test_a_job_whose_spec_changes_gets_a_new_name(change, renamed):
    """The API server refuses any change to an existing Job's pod template: a changed spec is a new Job (its
    command runs with --exist-ok, so publishing a release again is a no-op)."""
    before, after = jobs(render(JOBS)), jobs(render(merge(JOBS, change)))
    assert {kind for kind in before if before[kind]["metadata"]["name"] != after[kind]["metadata"]["name"]} == renamed
    for kind in set(before) - renamed:
        assert before[kind]["spec"] == after[kind]["spec"]
    for job in after.values():
        assert "--exist-ok" in job["spec"]["template"]["spec"]["containers"][0]["args"]


def test_a_new_chart_version_renames_the_jobs(tmp_path):
    before = render(JOBS)
    after = render(JOBS, chart=chart_copy(tmp_path, version="0.1.1", appVersion="0.1.1"))
    old, new = jobs(before), jobs(after)
    assert all(old[kind]["metadata"]["name"] != new[kind]["metadata"]["name"] for kind in old)
    for job in new.values():  # NOTES names the Jobs this render makes
        assert job["metadata"]["name"] in after.notes


def test_job_names_stay_dns_labels_with_a_long_fullname():
    long = render(merge(JOBS, {"fullnameOverride": "a" * 60}))
    for kind, job in jobs(long).items():
        name = job["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(rf"a+-{kind}-[0-9a-f]{{10}}", name), name
        assert name in long.notes


# ---------------------------------------------------------------- 2. serving the merged release


def notes_upgrade_values(notes: str) -> dict:
    """The --set values of the `helm upgrade` NOTES print to serve the merged release."""
    line = next(line for line in notes.splitlines() if "--set release=" in line and "encoding.release" in line)
    out: dict = {}
    for expression in re.findall(r"--set (\S+)", line):
        out = merge(out, helm.parse_set_string(expression))
    return out


def test_serving_the_merged_release_as_notes_say_keeps_every_job():
    first = render(JOBS)
    pinned = notes_upgrade_values(first.notes)
    assert pinned == {"release": "small-v1-encoded", "encoding": {"release": "small-v1"},
                      "trainer": {"job": {"release": "small-v1"}}}
    later = render(merge(JOBS, pinned))
    assert {k: j["metadata"]["name"] for k, j in jobs(later).items()} == \
        {k: j["metadata"]["name"] for k, j in jobs(first).items()}


def test_a_trainer_that_would_publish_the_merged_release_is_refused():
    with pytest.raises(helm.HelmRenderError) as failure:
        render(merge(JOBS, {"release": "small-v1-encoded", "encoding": {"release": "small-v1"}}))
    assert 'trainer.job.release: the trainer would publish "small-v1-encoded"' in str(failure.value)
    # Without the trainer Job, or with its release pinned, it renders.
    render(merge(JOBS, {"release": "small-v1-encoded", "encoding": {"release": "small-v1"},
                        "trainer": {"job": {"enabled": False}}}))


# ---------------------------------------------------------------- 4. pull secrets and the predictor's pod


def test_every_pod_gets_the_image_pull_secrets_and_the_predictor_the_decoders_placement():
    gpu = {"enabled": True, "runtimeClassName": "nvidia", "nodeSelector": {"gpu": "yes"}}
    r = render(merge(IN_CHART_STORES, merge(JOBS, {
        "kserve": {"enabled": True}, "imagePullSecrets": [{"name": "regcred"}],
        "decoder": {"gpu": gpu, "nodeSelector": {"pool": "inference"},
                    "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                    "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
                    "extraEnv": [{"name": "X", "value": "1"}], "extraArgs": ["--max-new-tokens", "64"]}})))
    pods = [o for o in r.objects if o["kind"] in ("Deployment", "Job", "Pod", "InferenceService")]
    assert len(pods) >= 9
    for o in pods:
        assert pod_spec(o).get("imagePullSecrets") == [{"name": "regcred"}], (o["kind"], o["metadata"]["name"])
    decoder = pod_spec(r.get("Deployment", component_name("decoder")))
    predictor = pod_spec(r.of_kind("InferenceService")[0])
    for key in ("runtimeClassName", "nodeSelector", "tolerations", "affinity", "serviceAccountName",
                "automountServiceAccountToken", "securityContext", "terminationGracePeriodSeconds"):
        assert predictor.get(key) == decoder.get(key) is not None, key
    assert predictor["runtimeClassName"] == "nvidia"
    assert predictor["nodeSelector"] == {"gpu": "yes", "pool": "inference"}
    assert {"key": "dedicated", "operator": "Exists"} in predictor["tolerations"]
    kserve = predictor["containers"][0]
    assert {"name": "X", "value": "1"} in kserve["env"] and kserve["args"][-2:] == ["--max-new-tokens", "64"]
    assert kserve["lifecycle"] == decoder["containers"][0]["lifecycle"]
    shm = next(v for v in predictor["volumes"] if v["name"] == "shm")
    assert shm == next(v for v in decoder["volumes"] if v["name"] == "shm")
    assert {"name": "shm", "mountPath": "/dev/shm"} in kserve["volumeMounts"]


# ---------------------------------------------------------------- 5. values as `helm --set` parses them


SET_EXPRESSIONS = [
    # numbers --set leaves as strings
    ("text.maxOverlap=0.5", lambda r: flag(container(r, "text"), "--max-overlap") == "0.5"),
    ("metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true,"
     "metrics.prometheusRule.errorRatio=0.1,metrics.prometheusRule.ttftP95Seconds=1.5",
     lambda r: rule(r, "Memory3RequestErrors").endswith("> 0.1")
     and rule(r, "Memory3SlowFirstToken").endswith("> 1.5")),
    ("decoder.autoscaling.targetRequestsWaiting=2.5",
     lambda r: r.get("HorizontalPodAutoscaler", component_name("decoder"))["spec"]["metrics"][0]["pods"]["target"][
         "averageValue"] == "2.5"),
    ("server.grace=2.5", lambda r: flag(container(r, "memory"), "--grace") == "2.5"),
    ("text.autoscaling.targetRequestsWaiting=2.5",
     lambda r: r.get("HorizontalPodAutoscaler", component_name("text"))["spec"]["metrics"][1]["pods"]["target"][
         "averageValue"] == "2.5"),
    ("text.autoscaling.targetRequestsWaiting=0.0",
     lambda r: len(r.get("HorizontalPodAutoscaler", component_name("text"))["spec"]["metrics"]) == 1),
    ("text.autoscaling.minReplicas=4,text.pdb.maxUnavailable=25%",
     lambda r: r.get("PodDisruptionBudget", component_name("text"))["spec"]["maxUnavailable"] == "25%"),
    # strings --set turns into integers
    ("decoder.autoscaling.keda.enabled=true,decoder.autoscaling.keda.threshold=8,metrics.serviceMonitor.enabled=true",
     lambda r: r.of_kind("ScaledObject")[0]["spec"]["triggers"][0]["metadata"]["threshold"] == "8"),
    ("release=20250601", lambda r: flag(container(r, "decoder"), "--release") == "20250601"),
    ("s3.bucket=2025", lambda r: flag(container(r, "decoder"), "--s3-bucket") == "2025"),
    ("kserve.enabled=true,kserve.modelName=42",
     lambda r: flag(r.of_kind("InferenceService")[0]["spec"]["predictor"]["containers"][0], "--model-name") == "42"),
    ("kserve.enabled=true,kserve.chatTemplate=qa",
     lambda r: flag(r.of_kind("InferenceService")[0]["spec"]["predictor"]["containers"][0], "--chat-template") == "qa"),
    ("kserve.enabled=true",
     lambda r: "--chat-template" not in r.of_kind("InferenceService")[0]["spec"]["predictor"]["containers"][0]["args"]),
    ("trainer.job.enabled=true,trainer.job.release=123,encoding.enabled=true,encoding.shardsVolumeClaim=s,"
     "encoding.release=7,encoding.merge.name=8",
     lambda r: (flag(jobs(r)["train"]["spec"]["template"]["spec"]["containers"][0], "--release"),
                flag(jobs(r)["merge"]["spec"]["template"]["spec"]["containers"][0], "--name")) == ("123", "8")),
]


def container(r: Rendered, component: str) -> dict:
    return r.get("Deployment", component_name(component))["spec"]["template"]["spec"]["containers"][0]


def flag(c: dict, name: str) -> str:
    return c["args"][c["args"].index(name) + 1]


def rule(r: Rendered, alert: str) -> str:
    return next(x["expr"] for x in r.of_kind("PrometheusRule")[0]["spec"]["groups"][0]["rules"] if x["alert"] == alert)


@pytest.mark.parametrize(("expression", "check"), SET_EXPRESSIONS, ids=[e for e, _c in SET_EXPRESSIONS])
def test_values_as_helm_set_parses_them_pass_the_schema_and_render_right(expression, check):
    values = merge(REQUIRED, helm.parse_set_string(expression))  # what `helm install --set <expression>` gets
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(copy.deepcopy(values)))
    r = render(values, required=False)
    assert check(r)
    for o in r.objects:
        if o["kind"] in ("Deployment", "Job", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
            kubernetes_validate.validate(o, "1.33.0", strict=True)


# ---------------------------------------------------------------- 9. ranges the API server or the CLI enforce


@pytest.mark.parametrize(("values", "path"), [
    ({"server": {"healthPort": 70000}}, "/server/healthPort"),
    ({"server": {"healthPort": 0}}, "/server/healthPort"),
    ({"decoder": {"replicaCount": -1}}, "/decoder/replicaCount"),
    ({"text": {"pdb": {"maxUnavailable": -1}}}, "/text/pdb/maxUnavailable"),
    ({"text": {"pdb": {"maxUnavailable": "half"}}}, "/text/pdb/maxUnavailable"),
    ({"memory": {"autoscaling": {"targetCPUUtilizationPercentage": 0}}},
     "/memory/autoscaling/targetCPUUtilizationPercentage"),
    ({"decoder": {"autoscaling": {"scaleDownStabilizationSeconds": 7200}}},
     "/decoder/autoscaling/scaleDownStabilizationSeconds"),
    ({"decoder": {"autoscaling": {"scaleDownStabilizationSeconds": -1}}},
     "/decoder/autoscaling/scaleDownStabilizationSeconds"),
    ({"decoder": {"autoscaling": {"keda": {"threshold": "abc"}}}}, "/decoder/autoscaling/keda/threshold"),
    ({"encoding": {"shards": 200000}}, "/encoding/shards"),
    ({"encoding": {"parallelism": 0}}, "/encoding/parallelism"),
    ({"encoding": {"backoffLimitPerIndex": -1}}, "/encoding/backoffLimitPerIndex"),
    ({"trainer": {"job": {"backoffLimit": -1}}}, "/trainer/job/backoffLimit"),
    ({"trainer": {"job": {"ttlSecondsAfterFinished": -1}}}, "/trainer/job/ttlSecondsAfterFinished"),
    ({"kserve": {"minReplicas": -1}}, "/kserve/minReplicas"),
    ({"s3": {"accessKeyKey": ""}}, "/s3/accessKeyKey"),
    ({"redis": {"urlKey": ""}}, "/redis/urlKey"),
    ({"auth": {"internal": {"tokenKey": ""}}}, "/auth/internal/tokenKey"),
    ({"auth": {"internal": {"tokenKey": "a/b"}}}, "/auth/internal/tokenKey"),
    ({"text": {"maxOverlap": "1.5"}}, "/text/maxOverlap"),
    ({"metrics": {"prometheusRule": {"errorRatio": "-0.1"}}}, "/metrics/prometheusRule/errorRatio"),
    ({"server": {"cacheSizeLimit": "8GB"}}, "/server/cacheSizeLimit"),
    ({"decoder": {"shmSize": "1 Gi"}}, "/decoder/shmSize"),
    ({"s3": {"inChart": {"persistence": {"size": "20gi"}}}}, "/s3/inChart/persistence/size"),
    ({"redis": {"inChart": {"maxmemory": "1 GB"}}}, "/redis/inChart/maxmemory"),
    ({"trainer": {"job": {"preset": "huge"}}}, "/trainer/job/preset"),
    # The probe's budget and `--wait-for-release`, which refuses a negative wait.
    ({"text": {"startupTimeoutSeconds": -5}}, "/text/startupTimeoutSeconds"),
    ({"memory": {"startupTimeoutSeconds": 0}}, "/memory/startupTimeoutSeconds"),
    ({"decoder": {"startupTimeoutSeconds": 9}}, "/decoder/startupTimeoutSeconds"),
    # What `serve memory --redis-timeout` refuses.
    ({"memory": {"redisTimeoutSeconds": 0}}, "/memory/redisTimeoutSeconds"),
    ({"memory": {"redisTimeoutSeconds": 61}}, "/memory/redisTimeoutSeconds"),
])
def test_schema_refuses_values_out_of_range(values, path):
    with pytest.raises(helm.HelmValuesError) as failure:
        render(values)
    assert path in str(failure.value)


@pytest.mark.parametrize("values", [
    {"server": {"cacheSizeLimit": "512Mi"}}, {"server": {"cacheSizeLimit": "8G"}}, {"decoder": {"shmSize": "2Gi"}},
    {"redis": {"inChart": {"enabled": True, "maxmemory": "512mb"}}}, {"trainer": {"job": {"preset": "tiny"}}},
])
def test_quantities_and_presets_as_kubernetes_and_the_trainer_take_them_pass(values):
    render(values)


# ---------------------------------------------------------------- 6, 7. NetworkPolicy and Services


def test_decoder_ingress_from_still_lets_this_releases_helm_test_in():
    r = render({"networkPolicy": {"decoderIngressFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]}})
    test_pod = r.of_kind("Pod")[0]
    grpc_rule = next(rule for rule in r.get("NetworkPolicy", component_name("decoder"))["spec"]["ingress"]
                     if {"port": "grpc", "protocol": "TCP"} in rule["ports"])
    peers = [p for p in grpc_rule["from"] if set(p) == {"podSelector"}]
    assert any(labels_match(p["podSelector"], test_pod["metadata"]["labels"]) for p in peers)
    other_release = dict(test_pod["metadata"]["labels"], **{"app.kubernetes.io/instance": "other"})
    assert not any(labels_match(p["podSelector"], other_release) for p in peers)
    assert {"namespaceSelector": {"matchLabels": {"team": "apps"}}} in grpc_rule["from"]


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
def test_a_public_decoder_service_does_not_publish_the_metrics_port(service_type):
    r = render({"decoder": {"service": {"type": service_type}}, "metrics": {"serviceMonitor": {"enabled": True}}})
    public = r.get("Service", component_name("decoder"))
    assert public["spec"]["type"] == service_type
    assert [p["name"] for p in public["spec"]["ports"]] == ["grpc"]
    metrics = r.get("Service", component_name("decoder") + "-metrics")
    assert metrics["spec"]["type"] == "ClusterIP" and [p["name"] for p in metrics["spec"]["ports"]] == ["metrics"]
    decoder = r.get("Deployment", component_name("decoder"))
    assert labels_match(metrics["spec"]["selector"], decoder["spec"]["template"]["metadata"]["labels"])
    # The ServiceMonitor scrapes the metrics Service only, and labels the series as the decoder's Service (the
    # alerts and KEDA's query select service="<decoder>").
    monitor = r.get("ServiceMonitor", component_name("decoder"))
    selected = [s["metadata"]["name"] for s in r.of_kind("Service")
                if labels_match(monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert selected == [metrics["metadata"]["name"]]
    assert monitor["spec"]["endpoints"][0]["relabelings"] == [
        {"action": "replace", "targetLabel": "service", "replacement": component_name("decoder")}]
    # By default the decoder's ClusterIP Service carries both, and nothing is relabelled.
    default = render({"metrics": {"serviceMonitor": {"enabled": True}}})
    assert [p["name"] for p in default.get("Service", component_name("decoder"))["spec"]["ports"]] == \
        ["grpc", "metrics"]
    assert default.find("Service", component_name("decoder") + "-metrics") is None
    assert "relabelings" not in default.get("ServiceMonitor", component_name("decoder"))["spec"]["endpoints"][0]


# ---------------------------------------------------------------- 10, 12. null values, commonLabels


@pytest.mark.parametrize("values", [
    {"decoder": {"gpu": {"enabled": True, "tolerations": None}}},
    {"decoder": {"gpu": {"enabled": True, "nodeSelector": None}, "nodeSelector": None, "tolerations": None}},
    {"kserve": {"enabled": True}, "decoder": {"gpu": {"enabled": True, "tolerations": None, "nodeSelector": None}}},
    merge(JOBS, {"trainer": {"job": {"gpu": {"enabled": True, "tolerations": None, "nodeSelector": None},
                                     "nodeSelector": None, "tolerations": None, "resources": None}},
                 "encoding": {"gpu": {"enabled": True, "tolerations": None, "nodeSelector": None}}}),
    {"commonAnnotations": None, "serviceAccount": {"annotations": None}, "decoder": {"service": {"annotations": None}}},
    {"commonLabels": None, "image": {"digests": None}, "tls": {"generated": {"extraDnsNames": None}}},
], ids=["gpu-tolerations", "node-selectors", "kserve", "gpu-jobs", "annotations", "labels-digests-names"])
def test_a_null_list_or_map_counts_as_empty(values):
    r = render(values)  # `--set decoder.gpu.tolerations=null`: Helm's way of dropping a default
    assert r.get("Deployment", component_name("decoder"))


def test_common_labels_are_added_once_and_never_replace_selector_labels():
    common = {"app.kubernetes.io/part-of": "platform", "app.kubernetes.io/component": "x",
              "app.kubernetes.io/instance": "y", "team": "ml"}
    r = render({"commonLabels": common})
    with helm.Chart.load(CHART) as chart:
        text = chart.render(merge(REQUIRED, {"commonLabels": common}), name="m3", namespace="ai")
    for path, manifest in text.items():
        for labels in re.findall(r"labels:\n((?:\s+[\w./-]+: .*\n)+)", manifest):
            keys = [line.split(":")[0].strip() for line in labels.splitlines()]
            assert len(keys) == len(set(keys)), (path, keys)
    for d in r.of_kind("Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert labels_match(d["spec"]["selector"], labels), d["metadata"]["name"]
        assert labels["team"] == "ml" and labels["app.kubernetes.io/part-of"] == "platform"
        assert labels["app.kubernetes.io/instance"] == "m3"
    for svc in r.of_kind("Service"):
        assert [d for d in r.of_kind("Deployment")
                if labels_match(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]


# ---------------------------------------------------------------- 13. Kubernetes before 1.29


def test_the_encoding_job_uses_per_index_retries_only_where_the_cluster_has_them(tmp_path):
    encoding = {"encoding": {"enabled": True, "shardsVolumeClaim": "shards", "shards": 4, "backoffLimitPerIndex": 2}}
    current = jobs(render(encoding))["encode"]["spec"]
    assert current["backoffLimitPerIndex"] == 2 and "backoffLimit" not in current
    old = chart_copy(tmp_path)  # the cluster's version, as `.Capabilities` tells it (offline: Helm's default)
    jobs_tpl = old / "templates" / "trainer" / "_jobs.tpl"
    assert jobs_tpl.read_text().count(".Capabilities.KubeVersion.Version") == 1
    jobs_tpl.write_text(jobs_tpl.read_text().replace(".Capabilities.KubeVersion.Version", '"v1.28.3"'))
    spec = jobs(render(encoding, chart=old))["encode"]["spec"]
    assert "backoffLimitPerIndex" not in spec and spec["backoffLimit"] == 8
    kubernetes_validate.validate(jobs(render(encoding, chart=old))["encode"], "1.27.0", strict=True)


def test_docs_state_the_kubernetes_version_each_feature_needs():
    docs = (ROOT / "docs" / "deployment.md").read_text()
    requirements = next(p for p in docs.split("\n\n") if p.startswith("Requirements:"))
    assert "1.29" in requirements and "backoffLimitPerIndex" in requirements
    # The wait for the trainer Job is this release's, not every trainer in the namespace.
    waits = [line for line in docs.replace("\\\n", " ").splitlines() if "kubectl" in line and " wait " in line]
    assert waits and all("app.kubernetes.io/instance=m3" in line or "job/" in line for line in waits)


# ---------------------------------------------------------------- 14. IPv6 endpoints


@pytest.mark.parametrize(("values", "ports"), [
    ({"s3": {"endpoint": "[fd00::1]"}}, {80}),
    ({"s3": {"endpoint": "[fd00::1]", "secure": True}}, {443}),
    ({"s3": {"endpoint": "[fd00::1]:9000"}}, {9000}),
    ({"redis": {"url": "redis://[fd00::2]/0"}}, {6379}),
    ({"redis": {"url": "redis://[fd00::2]:6380/0"}}, {6380}),
    ({"redis": {"url": "redis+sentinel://[fd00::2],[fd00::3]:26380/mymaster"}}, {26379, 26380, 6379}),
])
def test_ipv6_endpoints_get_their_port_or_the_schemes_default(values, ports):
    r = render(values)
    policy = r.get("NetworkPolicy", component_name("memory"))
    kubernetes_validate.validate(policy, "1.33.0", strict=True)
    found = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])} - {53}
    if "s3" in values:
        assert found == ports
    else:
        s3 = int(REQUIRED["s3"]["endpoint"].rsplit(":", 1)[1])
        assert found - {s3} == ports


# ---------------------------------------------------------------- 8. the in-chart Redis's password


def test_the_in_chart_redis_password_reaches_the_memory_service_apart_from_the_url():
    """Any password works, one from redis.inChart.existingSecret with URL-special characters included: the
    memory service reads it from MEMORY3_REDIS_PASSWORD as is (tests/unit/memory/test_redis_password.py)."""
    r = render(merge(IN_CHART_STORES, {"redis": {"inChart": {"existingSecret": "my-redis"}}}))
    env = {e["name"]: e for e in container(r, "memory")["env"]}
    assert env["MEMORY3_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "redis-password"}
    assert env["MEMORY3_REDIS_URL"]["value"] == f"redis://{component_name('redis')}:6379/0"
    redis = r.get("Deployment", component_name("redis"))["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e for e in redis["env"]}["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == \
        {"name": "my-redis", "key": "redis-password"}


# ---------------------------------------------------------------- numbers from a values file


def memory3_commands(r: Rendered) -> dict[str, list[str]]:
    """Object name -> the arguments of its `memory3` container: Deployments, Jobs and the KServe predictor."""
    out = {}
    for o in r.objects:
        if o["kind"] in ("Deployment", "Job", "InferenceService"):
            for c in pod_spec(o)["containers"]:
                if c.get("command") == ["memory3"]:
                    out[o["metadata"]["name"]] = c["args"]
    return out


def test_large_whole_numbers_from_a_values_file_reach_the_cli_as_integers():
    """A values file gives Helm every number as a float, which prints from 1e6 on in scientific notation
    (2592000 as 2.592e+06): the CLI refuses that for an integer flag, and the pod crash-loops."""
    from memory3.services.cli.main import build_parser

    million = 1_000_000
    r = render(merge(JOBS, {
        "memory": {"redisTTL": 2592000, "s3Workers": million, "redisTimeoutSeconds": 1.5},
        "trainer": {"job": {"seed": 20250601}},
        "text": {"maxConcurrency": million}, "decoder": {"maxBatch": million, "maxWaiting": million},
        "encoding": {"merge": {"waitSeconds": 2592000}}, "kserve": {"enabled": True, "chatTemplate": "qa"},
        "redis": {"inChart": {"enabled": True, "maxmemory": 1073741824}},
        "s3": {"endpoint": "", "existingSecret": "", "inChart": {"enabled": True}}}))
    parser = build_parser()
    parsed = {}
    for name, args in memory3_commands(r).items():
        assert not [a for a in args if re.fullmatch(r"[0-9.]+e\+[0-9]+", a)], (name, args)
        try:
            parsed[name] = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{name}: `memory3 {' '.join(args)}` does not parse")
    memory = parsed[component_name("memory")]
    assert (memory.redis_ttl, memory.s3_workers, memory.redis_timeout) == (2592000, million, 1.5)
    assert parsed[component_name("text")].max_concurrency == million
    for name in (component_name("decoder"), component_name("kserve")):
        assert (parsed[name].max_batch, parsed[name].max_waiting) == (million, million), name
    named = {kind: job["metadata"]["name"] for kind, job in jobs(r).items()}
    assert parsed[named["train"]].seed == 20250601 and parsed[named["merge"]].wait == 2592000
    redis = r.get("Deployment", component_name("redis"))["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis[redis.index("--maxmemory") + 1] == "1073741824"


# ---------------------------------------------------------------- the Jobs' temporary files


@pytest.mark.parametrize("work_claim", ["", "runs"])
def test_jobs_write_their_temporary_files_on_a_volume_sized_for_the_weights(work_claim):
    """Publishing a release writes the model's weights (GBs) to a temporary directory, wherever TMPDIR says:
    not on the 1Gi /tmp, where the kubelet would evict the pod, but on the trainer's work volume or the
    encoding Jobs' release cache."""
    r = render(merge(JOBS, {"trainer": {"job": {"workVolumeClaim": work_claim}}}))
    expected = {"train": "work", "encode": "cache", "merge": "cache"}
    assert set(jobs(r)) == set(expected)
    for kind, job in jobs(r).items():
        spec = pod_spec(job)
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tmp"]["emptyDir"]["sizeLimit"] == "1Gi"
        for c in spec["containers"]:
            tmpdir = {e["name"]: e.get("value") for e in c["env"]}.get("TMPDIR")
            assert tmpdir, f"{kind}: no TMPDIR, so Python writes to /tmp"
            under = [m for m in c["volumeMounts"]
                     if tmpdir == m["mountPath"] or tmpdir.startswith(m["mountPath"].rstrip("/") + "/")]
            mount = max(under, key=lambda m: len(m["mountPath"]))
            assert mount["name"] == expected[kind] and not mount.get("readOnly"), (kind, mount)
    work = next(v for v in pod_spec(jobs(r)["train"])["volumes"] if v["name"] == "work")
    assert work == ({"name": "work", "persistentVolumeClaim": {"claimName": work_claim}} if work_claim
                    else {"name": "work", "emptyDir": {}})
    assert "TMPDIR" in (ROOT / "docs" / "deployment.md").read_text()


# ---------------------------------------------------------------- NetworkPolicy ports and extra egress


def test_extra_s3_ports_are_opened_wherever_the_store_is_reached():
    """A NetworkPolicy port is the port of the pod the traffic reaches: a store behind a Service that maps 80 to
    8080 (Rook-Ceph's RGW) is reached on 8080, which the endpoint does not say."""
    r = render(merge(JOBS, {"s3": {"endpoint": "rook-ceph-rgw-store.rook-ceph.svc:80"}, "kserve": {"enabled": True},
                            "networkPolicy": {"externalS3Ports": [8080, 80]}}))
    policies = r.of_kind("NetworkPolicy")
    assert {p["metadata"]["name"] for p in policies} == \
        {component_name(c) for c in ("decoder", "text", "memory", "kserve", "jobs")}
    for policy in policies:
        kubernetes_validate.validate(policy, "1.33.0", strict=True)
        s3 = [rule for rule in policy["spec"]["egress"] if {"port": 80, "protocol": "TCP"} in rule.get("ports", [])]
        assert [rule["ports"] for rule in s3] == [[{"port": 80, "protocol": "TCP"}, {"port": 8080, "protocol": "TCP"}]]
    default = render({"s3": {"endpoint": "rook-ceph-rgw-store.rook-ceph.svc:80"}})
    assert not [rule for rule in default.get("NetworkPolicy", component_name("text"))["spec"]["egress"]
                if {"port": 8080, "protocol": "TCP"} in rule.get("ports", [])]
    assert "networkPolicy.externalS3Ports" in (ROOT / "docs" / "deployment.md").read_text()


def test_extra_egress_is_added_to_every_pods_policy():
    """A service mesh's sidecar reaches its control plane from every pod: one list of rules opens it for all."""
    mesh = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "istio-system"}}}],
            "ports": [{"port": 15012, "protocol": "TCP"}]}
    everything = merge(IN_CHART_STORES, {"kserve": {"enabled": True}})
    r = render(merge(everything, {"networkPolicy": {"extraEgress": [mesh]}}))
    default = render(everything)
    assert len(r.of_kind("NetworkPolicy")) == 7
    for policy in r.of_kind("NetworkPolicy"):
        kubernetes_validate.validate(policy, "1.33.0", strict=True)
        before = default.get("NetworkPolicy", policy["metadata"]["name"])["spec"]["egress"]
        assert policy["spec"]["egress"] == [*before, mesh], policy["metadata"]["name"]
    assert default.get("NetworkPolicy", component_name("redis"))["spec"]["egress"] == []


# ---------------------------------------------------------------- names from a long release name


@pytest.mark.parametrize(("values", "release_name"), [
    ({"fullnameOverride": "a" * 60}, "m3"),
    ({}, "my-very-long-helm-release-name-for-the-production"),
])
def test_every_name_stays_a_dns_label_with_a_long_fullname(values, release_name):
    r = render(merge(merge(IN_CHART_STORES, JOBS), {
        **values, "decoder": {"service": {"type": "LoadBalancer"}}, "kserve": {"enabled": True},
        "text": {"indexShards": 2}, "metrics": {"serviceMonitor": {"enabled": True}}}), name=release_name)
    for o in r.objects:
        name = o["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), (o["kind"], name)
    metrics = [s for s in r.of_kind("Service") if s["metadata"]["labels"].get("memory3.io/metrics") == "true"]
    assert len(metrics) == 1 and "-decoder-metric" in metrics[0]["metadata"]["name"]



# ---------------------------------------------------------------- the store's region and CA


def test_every_pod_that_reads_the_store_gets_its_region_and_ca_bundle():
    """A store in another AWS region, or behind a private CA, could not be used: the region was fixed at
    us-east-1 and only the system's CAs were trusted."""
    from memory3.services.cli.main import build_parser

    r = render(merge(JOBS, {"kserve": {"enabled": True}, "s3": {
        "secure": True, "region": "eu-west-3", "caBundle": {"secretName": "corp-ca", "key": "bundle.pem"}}}))
    commands = memory3_commands(r)
    assert len(commands) == 7  # text, memory, decoder, kserve and the three Jobs
    pods = {o["metadata"]["name"]: pod_spec(o) for o in r.objects
            if o["kind"] in ("Deployment", "Job", "InferenceService") and o["metadata"]["name"] in commands}
    for name, args in commands.items():
        parsed = build_parser().parse_args(args)
        assert (parsed.s3_region, parsed.s3_secure) == ("eu-west-3", True), name
        mount = next(m for m in pods[name]["containers"][0]["volumeMounts"] if m["name"] == "s3-ca")
        assert str(parsed.s3_ca_bundle).startswith(mount["mountPath"] + "/"), name
        volume = next(v for v in pods[name]["volumes"] if v["name"] == "s3-ca")
        assert volume["secret"]["secretName"] == "corp-ca"
        assert volume["secret"]["items"] == [{"key": "bundle.pem", "path": parsed.s3_ca_bundle.name}]
    plain = memory3_commands(render({}))
    assert all("--s3-ca-bundle" not in args and args[args.index("--s3-region") + 1] == "us-east-1"
               for args in plain.values())


def test_a_ca_bundle_without_https_is_refused():
    with pytest.raises(helm.HelmRenderError, match="s3.caBundle.secretName: a CA bundle is for HTTPS"):
        render({"s3": {"caBundle": {"secretName": "corp-ca"}}})


@pytest.mark.parametrize("component", ["decoder", "kserve"])
def test_a_decoder_without_resources_renders_with_its_gpu_limit(component):
    """`resources: null` (no requests or limits) failed the render: the GPU limit was set on a copy of nil."""
    r = render(merge({"kserve": {"enabled": True}, "decoder": {"imageFlavor": "cuda", "gpu": {"enabled": True}}},
                     {component: {"resources": None}}))
    found = (r.get("Deployment", component_name("decoder")) if component == "decoder"
             else r.of_kind("InferenceService")[0])
    assert pod_spec(found)["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 1}}


def test_a_chat_template_from_a_configmap_is_mounted_and_passed_to_the_predictor():
    r = render({"kserve": {"enabled": True, "chatTemplateConfigMap": {"name": "my-chat", "key": "t.jinja"}}})
    predictor = r.of_kind("InferenceService")[0]["spec"]["predictor"]
    container = predictor["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "chat-template")
    assert flag(container, "--chat-template") == f"{mount['mountPath']}/t.jinja" and mount["readOnly"]
    volume = next(v for v in predictor["volumes"] if v["name"] == "chat-template")
    assert volume["configMap"] == {"name": "my-chat", "items": [{"key": "t.jinja", "path": "t.jinja"}]}
    plain = render({"kserve": {"enabled": True}}).of_kind("InferenceService")[0]["spec"]["predictor"]
    assert "chat-template" not in [v["name"] for v in plain["volumes"]]
    with pytest.raises(helm.HelmRenderError, match="kserve.chatTemplate and kserve.chatTemplateConfigMap.name"):
        render({"kserve": {"enabled": True, "chatTemplate": "qa", "chatTemplateConfigMap": {"name": "my-chat"}}})
