"""The chart as an operator runs it: load spread over replicas the autoscalers add, node drains, renders
without a cluster (GitOps), startup budgets, version-like values, names the services and the object store
refuse, caches against memory limits, and the Kubernetes versions the chart declares."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from memory3.services.cli.main import build_parser, server_options

from .charts import CHART, REQUIRED, ROOT, Rendered, component_name, labels_match, merge, render

SERVICES = ("text", "memory", "decoder")
DOCS = ROOT / "docs" / "deployment.md"


def serve_containers(r: Rendered):
    """(name, container) of every `memory3 serve` container: the Deployments' and the KServe predictor's."""
    for d in r.of_kind("Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c.get("command") == ["memory3"] and c["args"][0] == "serve":
                yield d["metadata"]["name"], c
    for isvc in r.of_kind("InferenceService"):
        yield isvc["metadata"]["name"], isvc["spec"]["predictor"]["containers"][0]


def docs_paragraph(containing: str) -> str:
    """The paragraph or list item of docs/deployment.md holding the text, joined into one line."""
    text = DOCS.read_text()
    blocks = re.split(r"\n\s*\n|\n(?=\s*- )", text)
    found = [" ".join(b.split()) for b in blocks if containing in " ".join(b.split())]
    assert found, f"docs/deployment.md says nothing about {containing!r}"
    return found[0]


# ---------------------------------------------------------------- replicas the autoscalers add get calls


def test_every_grpc_server_asks_its_clients_to_reconnect_so_new_replicas_get_calls():
    r = render({"text": {"indexShards": 2}, "kserve": {"enabled": True}})
    parser = build_parser()
    seen = set()
    for name, c in serve_containers(r):
        args = parser.parse_args(c["args"])
        if args.service == "kserve":  # KServe's own servers: the flag would do nothing there
            assert "--max-connection-age" not in c["args"], name
            continue
        assert "--max-connection-age" in c["args"], name
        assert server_options(args).max_connection_age_s == 60.0, name
        seen.add(name)
    assert seen == {component_name("text") + "-0", component_name("text") + "-1", component_name("memory"),
                    component_name("decoder")}
    # 0 turns it off; a decimal from --set reaches the server as is.
    for value, age in (("0", None), ("90.5", 90.5)):
        values = merge(REQUIRED, helm.parse_set_string(f"server.maxConnectionAge={value}"))
        c = render(values, required=False).get("Deployment", component_name("memory"))
        args = parser.parse_args(c["spec"]["template"]["spec"]["containers"][0]["args"])
        assert server_options(args).max_connection_age_s == age
    with pytest.raises(helm.HelmValuesError, match="/server/maxConnectionAge"):
        render({"server": {"maxConnectionAge": -1}})
    assert "server.maxConnectionAge" in docs_paragraph("--max-connection-age")


# ---------------------------------------------------------------- node drains


def min_pods(r: Rendered, deployment: dict) -> int:
    """The fewest pods a Deployment runs: its autoscaler's minimum, or its replicas."""
    name = deployment["metadata"]["name"]
    for scaler in r.of_kind("HorizontalPodAutoscaler"):
        if scaler["spec"]["scaleTargetRef"]["name"] == name:
            return scaler["spec"]["minReplicas"]
    for scaler in r.of_kind("ScaledObject"):
        if scaler["spec"]["scaleTargetRef"]["name"] == name:
            return scaler["spec"]["minReplicaCount"]
    return deployment["spec"]["replicas"]


def disruptions_allowed(budget: dict, pods: int) -> int:
    """Pods a drain may evict at once under a budget (percentages round up, as the disruption controller's)."""
    spec = budget["spec"]
    if "minAvailable" in spec:
        return max(0, pods - int(spec["minAvailable"]))
    most = spec["maxUnavailable"]
    return math.ceil(int(most[:-1]) * pods / 100) if isinstance(most, str) else int(most)


DRAIN_VALUES = {
    "defaults": {},
    "shards": {"text": {"indexShards": 3}},
    "two-each": {c: {"autoscaling": {"minReplicas": 2}} for c in SERVICES},
    "shards-two-each": {"text": {"indexShards": 3, "autoscaling": {"minReplicas": 2}}},
    "fixed": {c: {"autoscaling": {"enabled": False}, "replicaCount": n}
              for c, n in zip(SERVICES, (1, 2, 3), strict=True)},
    "percent": {"text": {"autoscaling": {"minReplicas": 4}, "pdb": {"maxUnavailable": "50%"}}},
    "keda": {"decoder": {"autoscaling": {"minReplicas": 2, "keda": {"enabled": True}}},
             "metrics": {"serviceMonitor": {"enabled": True}}},
}


def test_no_disruption_budget_lets_a_drain_take_every_pod_of_a_service():
    """A service of 2 pods or more gets a budget that keeps one; a single pod none (a budget cannot keep it)."""
    budgeted = 0
    for name, values in DRAIN_VALUES.items():
        r = render(values)
        for deployment in r.of_kind("Deployment"):
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            if labels["app.kubernetes.io/component"] not in SERVICES:
                continue
            budgets = [b for b in r.of_kind("PodDisruptionBudget") if labels_match(b["spec"]["selector"], labels)]
            pods = min_pods(r, deployment)
            assert len(budgets) == (1 if pods >= 2 else 0), (name, deployment["metadata"]["name"])
            for budget in budgets:
                assert 0 < disruptions_allowed(budget, pods) < pods, (name, budget["spec"], pods)
                budgeted += 1
    assert budgeted == 3 + 3 + 2 + 1 + 1  # two-each, shards-two-each (the shards), fixed, percent, keda


def test_services_that_run_one_pod_are_named_in_the_notes_with_what_to_set():
    notes = render({"memory": {"autoscaling": {"enabled": False}, "replicaCount": 1},
                    "decoder": {"autoscaling": {"minReplicas": 2}}}).notes
    line = " ".join(notes[notes.index("Disruptions:"):].split())
    assert "(text, memory)" in line
    assert line.endswith("--set text.autoscaling.minReplicas=2 --set memory.replicaCount=2")
    assert "Disruptions:" not in render(DRAIN_VALUES["two-each"]).notes
    # The docs say what the chart does: no budget below 2 pods, and what to run for drains without downtime.
    docs = docs_paragraph("Node drains.")
    assert "2 or more" in docs and "minReplicas" in docs


@pytest.mark.parametrize(("values", "message"), [
    ({"text": {"autoscaling": {"minReplicas": 2}, "pdb": {"maxUnavailable": 2}}},
     "text.pdb.maxUnavailable: 2 lets a drain take all 2 pods"),
    ({"memory": {"autoscaling": {"enabled": False}, "replicaCount": 3, "pdb": {"maxUnavailable": "70%"}}},
     "memory.pdb.maxUnavailable: 70% lets a drain take all 3 pods"),
], ids=["integer", "percent"])
def test_a_budget_that_lets_every_pod_go_is_refused(values, message):
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


# ---------------------------------------------------------------- renders without a cluster (GitOps)


def test_renders_without_a_cluster_are_stable_with_the_values_the_docs_name(tmp_path):
    """`helm template` and Argo CD render without `lookup`: every generated Secret would be new on each
    render. The docs name the values that replace them; set, two renders are the same."""
    warning = docs_paragraph("cannot `lookup`")
    named = set(re.findall(r"`([\w.]+\.existingSecret)`", warning))
    assert named >= {"tls.existingSecret", "auth.internal.existingSecret", "s3.existingSecret",
                     "redis.inChart.existingSecret"}
    stores = {"s3": {"endpoint": "", "inChart": {"enabled": True}}, "redis": {"inChart": {"enabled": True}}}
    values = stores
    for dotted in named:
        value: dict = {}
        for key in reversed(dotted.split(".")):
            value = {key: value or "from-git"}
        values = merge(values, value)
    first, second = render(values), render(values)
    assert first.of_kind("Secret") == []
    assert first.objects == second.objects
    # The values file says it where each is set.
    for dotted in named:
        assert "helm template" in yaml_description(dotted), dotted


def test_values_comments_say_what_the_chart_does():
    # An endpoint beside the in-chart store fails the install; it is not ignored.
    with pytest.raises(helm.HelmRenderError, match="s3.endpoint is set but s3.inChart.enabled"):
        render({"s3": {"endpoint": "minio:9000", "existingSecret": "", "inChart": {"enabled": True}}})
    assert "must be empty when `s3.inChart.enabled`" in yaml_description("s3.endpoint")
    # The trainer and the encoding Job train and encode on GPUs when asked, and the CPU image with a GPU fails
    # the install: the values and the docs say so, and no longer that training runs on the CPU only.
    with pytest.raises(helm.HelmRenderError, match="trainer.job.gpu.enabled: a GPU is requested"):
        render({"trainer": {"job": {"enabled": True, "imageFlavor": "cpu", "gpu": {"enabled": True}}}})
    for part in ("trainer.job", "encoding"):
        assert "`cpu` with gpu.enabled fails the install" in yaml_description(f"{part}.imageFlavor")
        assert "--device cuda" in yaml_description(f"{part}.gpu.enabled")
    assert "torchrun --standalone --nproc-per-node" in yaml_description("trainer.job.gpu.enabled")
    training = docs_paragraph("torchrun --standalone --nproc-per-node <count> --no-python memory3 train")
    assert "memory-backed `/dev/shm` of `trainer.job.shmSize`" in training and "NCCL" in training
    assert "CPU only" not in DOCS.read_text()
    assert "want GPUs" not in DOCS.read_text()


def yaml_description(dotted: str) -> str:
    import sys

    sys.path.insert(0, str(CHART.parent))
    try:
        import generate_schema
    finally:
        sys.path.remove(str(CHART.parent))
    return generate_schema.descriptions((CHART / "values.yaml").read_text())[dotted]


# ---------------------------------------------------------------- startup budgets


def startup_budget(r: Rendered, component: str) -> int:
    """Seconds a component's startup probe allows."""
    probe = r.get("Deployment", component_name(component))["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    return probe["failureThreshold"] * probe["periodSeconds"]


def test_the_decoders_startup_probe_outlasts_the_text_and_memory_services():
    """The decoder reports SERVING only once text and memory do: on an install its startup covers theirs, and
    their pods may start a little after it."""
    for values, decoder in (({}, 900), ({"text": {"startupTimeoutSeconds": 3600}}, 3660),
                            ({"memory": {"startupTimeoutSeconds": 1800}}, 1860),
                            ({"decoder": {"startupTimeoutSeconds": 1200}, "text": {"startupTimeoutSeconds": 600}},
                             1200)):
        r = render(values)
        budget = {c: startup_budget(r, c) for c in SERVICES}
        assert budget["decoder"] == decoder > max(budget["text"], budget["memory"]), values
        # A release not published yet (the install's trainer Job publishes it) is waited for as long as the
        # probe allows: the pods exited at once and crash-looped, against what the docs say.
        waits = {c: _flag(r.get("Deployment", component_name(c))["spec"]["template"]["spec"]["containers"][0],
                          "--wait-for-release") for c in SERVICES}
        assert waits == {c: str(budget[c]) for c in SERVICES}, values


def test_the_kserve_predictor_waits_as_the_decoder_and_is_restarted_once_its_engine_is_dead():
    """The predictor waits for its release as long as the decoder does, and its startup probe allows that long;
    then a liveness probe on the engine's state restarts it after a device fault or a stuck model pass (KServe's
    own /v2/health/live answers 200 for as long as the process runs)."""
    parser = build_parser()
    for values, budget in (({}, 900), ({"text": {"startupTimeoutSeconds": 3600}}, 3660),
                           ({"decoder": {"startupTimeoutSeconds": 1200}}, 1200)):
        r = render(merge(values, {"kserve": {"enabled": True}}))
        c = r.of_kind("InferenceService")[0]["spec"]["predictor"]["containers"][0]
        args = parser.parse_args(c["args"])
        assert args.wait_for_release == budget == startup_budget(r, "decoder"), values
        startup, live, ready = c["startupProbe"], c["livenessProbe"], c["readinessProbe"]
        assert startup["failureThreshold"] * startup["periodSeconds"] == budget, values
        http = {"path": "/memory3/live", "port": args.http_port}
        assert startup["httpGet"] == live["httpGet"] == http
        assert ready["httpGet"] == {"path": "/v2/health/ready", "port": args.http_port}
        assert [p["containerPort"] for p in c["ports"]] == [args.http_port]
        decoder_live = r.get("Deployment", component_name("decoder"))["spec"]["template"]["spec"]["containers"][0][
            "livenessProbe"]
        assert {k: live[k] for k in ("periodSeconds", "timeoutSeconds", "failureThreshold")} == \
            {k: decoder_live[k] for k in ("periodSeconds", "timeoutSeconds", "failureThreshold")}
    kserve_docs = DOCS.read_text().split("## 7. KServe")[1].split("\n## ")[0]
    assert "--wait-for-release" in kserve_docs and "/memory3/live" in kserve_docs


def test_the_kserve_liveness_probe_asks_the_route_the_server_serves():
    kserve_model = pytest.importorskip("memory3.services.decoder.kserve_model")
    c = render({"kserve": {"enabled": True}}).of_kind("InferenceService")[0]["spec"]["predictor"]["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == kserve_model.LIVE_PATH


# ---------------------------------------------------------------- version-like values


@pytest.mark.parametrize(("values", "path"), [
    ({"image": {"tag": 1.0}}, "/image/tag"),
    ({"image": {"tag": 2}}, "/image/tag"),
    ({"s3": {"inChart": {"enabled": True, "image": {"tag": 1.75}}}, "redis": {"inChart": {"enabled": True}}},
     "/s3/inChart/image/tag"),
    ({"redis": {"inChart": {"enabled": True, "image": {"tag": 7.4}}}}, "/redis/inChart/image/tag"),
])
def test_an_unquoted_version_tag_is_refused_with_a_message_to_quote_it(values, path):
    if "s3" in values:
        values = merge(values, {"s3": {"endpoint": "", "existingSecret": ""}})
    with pytest.raises(helm.HelmValuesError) as failure:
        render(values)
    text = str(failure.value)
    assert path in text and "quote it" in text and "--set-string" in text


def test_a_quoted_or_set_string_tag_is_the_image_tag():
    for values in ({"image": {"tag": "1.0"}}, helm.parse_set_string_values("image.tag=1.0")):
        c = render(values).get("Deployment", component_name("decoder"))["spec"]["template"]["spec"]["containers"][0]
        assert c["image"] == "ghcr.io/memory3/memory3:1.0-cpu"
    # --set turns a digit-only tag into a number: --set-string keeps it the tag.
    with pytest.raises(helm.HelmValuesError, match="--set-string"):
        render(helm.parse_set_string("image.tag=20250601"))
    r = render(helm.parse_set_string_values("image.tag=20250601"))
    assert r.get("Deployment", component_name("text"))["spec"]["template"]["spec"]["containers"][0][
        "image"].endswith(":20250601-cpu")


# ---------------------------------------------------------------- names the services and the store refuse


ENCODING = {"enabled": True, "shardsVolumeClaim": "shards"}
# (refused values, the message, values beside them that pass)
BAD_NAMES = [
    ({"s3": {"bucket": ""}}, 's3.bucket: "" is not an S3 bucket name', {"s3": {"bucket": "memory3.releases-2025"}}),
    ({"s3": {"bucket": "My_Bucket/x"}}, 's3.bucket: "My_Bucket/x" is not an S3 bucket name',
     {"s3": {"bucket": "my-bucket"}}),
    ({"s3": {"bucket": "ab"}}, 's3.bucket: "ab" is not', {"s3": {"bucket": "abc"}}),
    ({"s3": {"bucket": "a..b"}}, 's3.bucket: "a..b" is not', {"s3": {"bucket": "a.b"}}),
    ({"s3": {"bucket": "10.0.0.1"}}, 's3.bucket: "10.0.0.1" is not', {"s3": {"bucket": "10.0.0.1a"}}),
    ({"release": "Small-V1"}, 'release: "Small-V1" is not a release name (1-63 of a-z', {"release": "small_v1.2"}),
    ({"release": "a" * 64}, "is not a release name", {"release": "a" * 63}),
    ({"encoding": {**ENCODING, "release": "a/b"}}, 'encoding.release: "a/b" is not a release name',
     {"encoding": {**ENCODING, "release": "a-b"}}),
    ({"encoding": {**ENCODING, "release": "b" * 60}}, "encoding.release: the shards' releases, up to",
     {"encoding": {**ENCODING, "release": "b" * 55, "merge": {"name": "kb-2027"}}}),
    ({"encoding": {**ENCODING, "merge": {"name": "a b"}}}, 'encoding.merge.name: "a b" is not a release name',
     {"encoding": {**ENCODING, "merge": {"name": "a-b"}}}),
    ({"encoding": {**ENCODING, "release": "c" * 60, "shards": 1}}, "encoding.merge.name: the default merged release",
     {"encoding": {**ENCODING, "release": "c" * 55, "shards": 1}}),
    ({"trainer": {"job": {"enabled": True, "release": "V2"}}}, 'trainer.job.release: "V2" is not a release name',
     {"trainer": {"job": {"enabled": True, "release": "v2"}}}),
    ({"kserve": {"enabled": True, "modelName": ""}}, 'kserve.modelName: "" is not a model name',
     {"kserve": {"enabled": True, "modelName": "Memory3-small_v1.2"}}),
    ({"kserve": {"enabled": True, "modelName": "a/b"}}, 'kserve.modelName: "a/b" is not a model name',
     {"kserve": {"enabled": True, "modelName": "a-b"}}),
    ({"memory": {"ramCacheMB": 4096}}, "memory.ramCacheMB: 4096 MiB of cache does not fit the memory limit 2Gi",
     {"memory": {"ramCacheMB": 1024, "resources": {"limits": {"memory": "1.5Gi"}}}}),
    ({"memory": {"ramCacheMB": 2048}}, "memory.ramCacheMB: 2048 MiB",
     {"memory": {"ramCacheMB": 1500, "resources": {"limits": {"memory": 2147483648}}}}),
    ({"memory": {"ramCacheMB": 1000, "resources": {"limits": {"memory": "1G"}}}},
     "memory.ramCacheMB: 1000 MiB of cache does not fit the memory limit 1G",
     {"memory": {"ramCacheMB": 0, "resources": {"limits": {"memory": "256Mi"}}}}),
    ({"decoder": {"memoryCacheMB": 16384}}, "decoder.memoryCacheMB: 16384 MiB of cache does not fit",
     {"decoder": {"memoryCacheMB": 4096, "resources": {"limits": {"memory": "16e9"}}}}),
    # The KServe predictor holds the decoder's cache under its own limit.
    ({"kserve": {"enabled": True, "resources": {"limits": {"memory": "1Gi"}}},
      "decoder": {"memoryCacheMB": 2048, "resources": {"limits": {"memory": "4Gi"}}}},
     "decoder.memoryCacheMB: 2048 MiB of cache does not fit the memory limit 1Gi (kserve.resources.limits.memory)",
     {"kserve": {"enabled": True}, "decoder": {"memoryCacheMB": 2048, "resources": {"limits": {"memory": "4Gi"}}}}),
]


@pytest.mark.parametrize(("values", "message", "passing"), BAD_NAMES,
                         ids=[f"{m.split(':')[0]}-{i}" for i, (_v, m, _p) in enumerate(BAD_NAMES)])
def test_names_and_caches_that_would_fail_in_the_pods_fail_the_install(values, message, passing):
    with pytest.raises(helm.HelmRenderError) as failure:
        render(values)
    assert "VALUES VALIDATION:" in str(failure.value) and message in str(failure.value)
    render(passing)


@pytest.mark.parametrize(("values", "path"), [
    ({"metrics": {"serviceMonitor": {"interval": "abc"}}}, "/metrics/serviceMonitor/interval"),
    ({"tls": {"generated": {"extraDnsNames": ["a b"]}}}, "/tls/generated/extraDnsNames/0"),
    ({"tls": {"clusterDomain": "a b"}}, "/tls/clusterDomain"),
])
def test_schema_refuses_what_the_certificate_or_the_prometheus_operator_would(values, path):
    with pytest.raises(helm.HelmValuesError) as failure:
        render(values)
    assert path in str(failure.value)


# ---------------------------------------------------------------- Kubernetes versions the chart declares


def chart_on_kubernetes(directory: Path, version: str) -> Path:
    """A copy of the chart rendered as for a cluster of this version (offline `.Capabilities` is Helm's default)."""
    copy = directory / "memory3"
    shutil.copytree(CHART, copy)
    for template in (copy / "templates").rglob("*"):
        if template.is_file():
            text = template.read_text()
            template.write_text(text.replace(".Capabilities.KubeVersion.Version", f'"v{version}"'))
    return copy


def test_the_prestop_sleep_works_on_every_kubernetes_version_the_chart_declares(tmp_path):
    """The `sleep` action needs 1.30 (alpha before, dropped by the API server): older clusters get an exec."""
    declared = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    assert declared == ">=1.27.0-0"
    for version in ("1.27.0", "1.29.0", "1.30.0", "1.33.0"):
        chart = chart_on_kubernetes(tmp_path / version, version)
        r = render({"kserve": {"enabled": True}}, chart=chart)
        sleeping = [c for _name, c in serve_containers(r)]
        assert len(sleeping) == 4
        for c in sleeping:
            pre_stop = c["lifecycle"]["preStop"]
            if tuple(map(int, version.split("."))) >= (1, 30):
                assert pre_stop == {"sleep": {"seconds": 5}}, version
            else:
                assert pre_stop == {"exec": {"command": ["sleep", "5"]}}, version
        for o in r.objects:  # every object but those of CRDs (the InferenceService)
            if o["kind"] != "InferenceService":
                kubernetes_validate.validate(o, version, strict=True)
        text = render({"server": {"preStopSleepSeconds": 0}}, chart=chart).get("Deployment", component_name("text"))
        assert "lifecycle" not in text["spec"]["template"]["spec"]["containers"][0]


# ---------------------------------------------------------------- KEDA


def test_keda_gets_no_cooldown_period_and_values_that_set_one_still_install():
    """KEDA's cooldownPeriod applies only to scaling to and from zero, which the chart never does."""
    for keda in ({"enabled": True}, {"enabled": True, "cooldownPeriod": 120}):
        scaled = render({"decoder": {"autoscaling": {"keda": keda}}, "metrics": {"serviceMonitor": {"enabled": True}}}
                        ).get("ScaledObject", component_name("decoder"))
        assert "cooldownPeriod" not in scaled["spec"] and scaled["spec"]["minReplicaCount"] >= 1
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300


def _flag(container: dict, name: str) -> str:
    return container["args"][container["args"].index(name) + 1]
