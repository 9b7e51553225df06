"""The Helm chart, rendered offline for several value sets: lint, strict schema validation of every core
object, and the wiring a cluster would only reveal at run time (selectors, addresses, probes, secrets)."""

from __future__ import annotations

import base64
import copy
import re
import sys

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from memory3.services.cli.main import build_parser

from .charts import CHART, NAMESPACE, REQUIRED, Rendered, component_name, labels_match, merge, render

KUBE_VERSION = "1.33.0"
SERVICES = ("text", "memory", "decoder")
IN_CHART_STORES = {"s3": {"endpoint": "", "existingSecret": "", "inChart": {"enabled": True}},
                   "redis": {"inChart": {"enabled": True}}}
VALUE_SETS = {
    "defaults": {},
    "gpu": {"decoder": {"gpu": {"enabled": True, "runtimeClassName": "nvidia",
                                "nodeSelector": {"nvidia.com/gpu.present": "true"}}}},
    "kserve": {"kserve": {"enabled": True}},
    "in-chart-stores": IN_CHART_STORES,
    "autoscaling-off": {c: {"autoscaling": {"enabled": False}, "replicaCount": 2} for c in SERVICES},
    "keda-monitoring-jobs": {"decoder": {"autoscaling": {"keda": {"enabled": True}}},
                             "metrics": {"serviceMonitor": {"enabled": True}},
                             "trainer": {"job": {"enabled": True, "release": "small-v2", "workVolumeClaim": "runs"}},
                             "encoding": {"enabled": True, "shardsVolumeClaim": "shards"},
                             "redis": {"existingSecret": "memory3-redis"}},
    "text-shards": {"text": {"indexShards": 3, "autoscaling": {"minReplicas": 2}}, "kserve": {"enabled": True},
                    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}},
    "tls-off": {"tls": {"enabled": False}},
    "tls-existing-secret": {"tls": {"existingSecret": "memory3-tls"}, "kserve": {"enabled": True}},
    "everything": merge(IN_CHART_STORES, {"kserve": {"enabled": True}, "decoder": {"gpu": {"enabled": True}},
                                          "trainer": {"job": {"enabled": True, "gpu": {"enabled": True, "count": 2}}},
                                          "metrics": {"serviceMonitor": {"enabled": True},
                                                      "prometheusRule": {"enabled": True}},
                                          "encoding": {"enabled": True, "shardsVolumeClaim": "shards",
                                                       "gpu": {"enabled": True}}}),
}
CRD_KINDS = {"InferenceService", "ScaledObject", "ServiceMonitor", "PrometheusRule"}
ENCODING = {"enabled": True, "shardsVolumeClaim": "shards"}
NVIDIA_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request) -> Rendered:
    return render(VALUE_SETS[request.param])


def pod_specs(r: Rendered) -> list[tuple[dict, dict]]:
    """(object, pod spec) of every Deployment, Job and bare Pod."""
    out = []
    for o in r.objects:
        if o["kind"] in ("Deployment", "Job"):
            out.append((o, o["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            out.append((o, o["spec"]))
    return out


def pod_labels(o: dict) -> dict:
    return o["spec"]["template"]["metadata"]["labels"] if "template" in o["spec"] else o["metadata"]["labels"]


def torchrun_args(args: list[str]):
    """A data-parallel trainer Job's torchrun arguments (trainer.job.gpu.count > 1), as torchrun parses them."""
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(args)


def memory3_containers(r: Rendered):
    """(object, pod spec, container) of every container that runs `memory3`; one that runs it under torchrun is
    given as a copy whose args are memory3's (those torchrun hands the `memory3` it runs without Python)."""
    for o, spec in pod_specs(r):
        for container in spec["containers"]:
            if container.get("command") == ["memory3"]:
                yield o, spec, container
            elif container.get("command") == ["torchrun"]:
                parsed = torchrun_args(container["args"])
                assert parsed.no_python and parsed.training_script == "memory3", container["args"]
                yield o, spec, {**container, "args": parsed.training_script_args}


def expand(arg: str, env: list[dict]) -> str:
    """Kubernetes' $(VAR) expansion in arguments, with a placeholder for values it takes from Secrets."""
    values = {e["name"]: e.get("value", "from-secret") for e in env}
    values["JOB_COMPLETION_INDEX"] = "0"
    return re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), arg)


# ---------------------------------------------------------------- validity


def test_lint_passes_for_every_value_set():
    for name, values in VALUE_SETS.items():
        report = helm.lint(str(CHART), merge(REQUIRED, values), strict=True)
        assert report["errors"] == [], (name, report)
        assert not [m for m in report["messages"] if m["severity"] >= 2], (name, report)


def test_core_objects_pass_strict_kubernetes_validation(rendered):
    for o in rendered.objects:
        if o["kind"] in CRD_KINDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
            continue
        kubernetes_validate.validate(o, KUBE_VERSION, strict=True)


def test_every_object_is_named_labelled_and_namespaced(rendered):
    for o in rendered.objects:
        meta = o["metadata"]
        assert len(meta["name"]) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]), meta["name"]
        assert meta["namespace"] == NAMESPACE
        assert meta["labels"]["app.kubernetes.io/instance"] == "m3"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_crd_objects_have_expected_api_versions():
    r = render(VALUE_SETS["everything"] | {"decoder": {"gpu": {"enabled": True},
                                                       "autoscaling": {"keda": {"enabled": True}}}})
    versions = {o["kind"]: o["apiVersion"] for o in r.objects if o["kind"] in CRD_KINDS}
    assert versions == {"InferenceService": "serving.kserve.io/v1beta1", "ScaledObject": "keda.sh/v1alpha1",
                        "ServiceMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1"}


# ---------------------------------------------------------------- wiring


def test_selectors_match_pod_labels(rendered):
    deployments = rendered.of_kind("Deployment")
    for d in deployments:
        assert labels_match(d["spec"]["selector"], pod_labels(d)), d["metadata"]["name"]
    for svc in rendered.of_kind("Service"):
        selected = [d for d in deployments if labels_match(svc["spec"]["selector"], pod_labels(d))]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)} Deployments"
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        assert [d for d in deployments if labels_match(pdb["spec"]["selector"], pod_labels(d))]
    for scaler in rendered.of_kind("HorizontalPodAutoscaler") + rendered.of_kind("ScaledObject"):
        target = scaler["spec"]["scaleTargetRef"]
        assert rendered.get(target["kind"], target["name"])
    for sm in rendered.of_kind("ServiceMonitor"):
        services = [s for s in rendered.of_kind("Service")
                    if labels_match(sm["spec"]["selector"], s["metadata"]["labels"])]
        # One Service per component, or per index shard of the text service.
        component = sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        assert len(services) == len(component_deployments(rendered, component)) >= 1
        assert all("metrics" in [p["name"] for p in svc["spec"]["ports"]] for svc in services)


def component_deployments(r: Rendered, component: str) -> list[dict]:
    """The Deployments of a component: one, or one per index shard of the text service."""
    return [d for d in r.of_kind("Deployment") if pod_labels(d)["app.kubernetes.io/component"] == component]


def resolve_address(r: Rendered, address: str) -> tuple[dict, dict]:
    """host:port of a Service -> (the Deployment behind it, the container port the traffic lands on)."""
    host, port = address.rsplit(":", 1)
    svc = r.find("Service", host)
    assert svc is not None, f"{address}: no Service named {host!r} is rendered"
    ports = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
    assert ports, f"{address}: Service {host} has no port {port}"
    target = ports[0]["targetPort"]
    backends = [d for d in r.of_kind("Deployment") if labels_match(svc["spec"]["selector"], pod_labels(d))]
    assert len(backends) == 1
    container_ports = [cp for c in backends[0]["spec"]["template"]["spec"]["containers"] for cp in c["ports"]]
    landing = [cp for cp in container_ports if target in (cp.get("name"), cp["containerPort"])]
    assert landing, f"{address}: targetPort {target} matches no container port of {backends[0]['metadata']['name']}"
    return backends[0], landing[0]


def test_every_service_address_points_to_a_rendered_service_and_port(rendered):
    checked = 0
    for _o, _spec, c in memory3_containers(rendered):
        args = c["args"]
        for flag in ("--text-address", "--memory-address", "--s3-endpoint"):
            if flag in args:
                address = args[args.index(flag) + 1]
                if flag == "--s3-endpoint" and not address.startswith("m3-memory3-"):
                    assert address == REQUIRED["s3"]["endpoint"]  # the external store
                    continue
                expected = {"--text-address": "text", "--memory-address": "memory", "--s3-endpoint": "s3"}[flag]
                # Every Deployment of the component, once: the text service's index shards, in order.
                backends = [resolve_address(rendered, a)[0]["metadata"]["name"] for a in address.split(",")]
                assert backends == [d["metadata"]["name"] for d in component_deployments(rendered, expected)]
                checked += 1
        for env in c.get("env", []):
            if env["name"] == "MEMORY3_REDIS_URL" and "value" in env:
                hostport = re.match(r"rediss?://(?:[^@]*@)?([^/]+)", env["value"]).group(1)
                backend, _port = resolve_address(rendered, hostport)
                assert backend["metadata"]["name"] == component_name("redis")
                checked += 1
    assert checked >= 2


def test_decoder_reaches_its_dependencies_by_the_service_ports():
    r = render({})
    args = r.get("Deployment", component_name("decoder"))["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--text-address") + 1] == "m3-memory3-text:50052"
    assert args[args.index("--memory-address") + 1] == "m3-memory3-memory:50053"


def test_rendered_commands_exist_in_the_cli(rendered):
    """Every command and flag the chart runs parses with the real `memory3` argument parser."""
    parser = build_parser()
    seen = set()
    for o, _spec, c in memory3_containers(rendered):
        argv = [expand(a, c.get("env", [])) for a in c["args"]]
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{o['kind']} {o['metadata']['name']}: `memory3 {' '.join(argv)}` does not parse")
        seen.add(args.command if args.command != "serve" else f"serve {args.service}")
        if args.command == "serve":
            assert args.host == "0.0.0.0" and args.release == "small-v1" and args.log_format == "json"
            if args.service != "kserve":
                assert args.metrics_port == 9090
    assert {"serve text", "serve memory", "serve decoder"} <= seen


def test_kserve_and_jobs_commands_parse():
    r = render(VALUE_SETS["everything"])
    parser = build_parser()
    commands = {}
    for o, _spec, c in memory3_containers(r):
        args = parser.parse_args([expand(a, c.get("env", [])) for a in c["args"]])
        commands[o["metadata"].get("name")] = args
    train = next(a for a in commands.values() if a.command == "train")
    assert (train.release, str(train.work_dir)) == ("small-v1", "/var/lib/memory3/work/small-v1+2-processes")
    assert trained_preset(train) == "small"
    assert train.index_kind == "auto"
    # The shards and their merge keep the base's index kind: the chart gives them none.
    assert all(a.index_kind is None for a in commands.values() if a.command == "kb" and a.kb_command == "add")
    # A Job that runs again (a retry, or recreated by an upgrade after its TTL) does nothing.
    assert all(a.exist_ok for a in commands.values() if a.command in ("train", "kb"))
    kb_add = next(a for a in commands.values() if a.command == "kb" and a.kb_command == "add")
    assert [str(f) for f in kb_add.files] == ["/shards/shard-0.txt"] and kb_add.name == "small-v1-shard-0"
    kb_merge = next(a for a in commands.values() if a.command == "kb" and a.kb_command == "merge")
    assert (kb_merge.release, kb_merge.name, kb_merge.wait) == ("small-v1", "small-v1-encoded", 86400)
    isvc = r.of_kind("InferenceService")[0]
    container = isvc["spec"]["predictor"]["containers"][0]
    kserve = parser.parse_args(container["args"])
    assert (kserve.service, kserve.http_port, kserve.text_address) == ("kserve", 8080, "m3-memory3-text:50052")
    assert container["name"] == "kserve-container"


def test_cli_rejects_a_flag_that_does_not_exist():
    """The check above is only as good as the parser's strictness."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "decoder", "--release", "r", "--no-such-flag", "1"])


# ---------------------------------------------------------------- probes, resources, security


def test_services_have_grpc_probes_and_resources(rendered):
    for d in (d for component in SERVICES for d in component_deployments(rendered, component)):
        c = d["spec"]["template"]["spec"]["containers"][0]
        grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        # With TLS the kubelet (which cannot speak TLS) probes the plaintext health-only port.
        tls = "--tls-cert" in c["args"]
        probed = next(p["containerPort"] for p in c["ports"] if p["name"] == ("health" if tls else "grpc"))
        if tls:
            assert int(c["args"][c["args"].index("--health-port") + 1]) == probed != grpc_port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == probed, (d["metadata"]["name"], probe)
        # Liveness asks for the name that stays SERVING while the process runs (services/rpc/server.py).
        assert c["livenessProbe"]["grpc"]["service"] == "liveness"
        assert "service" not in c["readinessProbe"]["grpc"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["resources"]["limits"]["memory"]
        args = c["args"]
        assert int(args[args.index("--port") + 1]) == grpc_port
        grace = float(args[args.index("--grace") + 1])
        prestop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace + prestop


def test_pods_run_non_root_with_a_read_only_root_and_writable_caches(rendered):
    for o, spec, c in memory3_containers(rendered):
        pod_ctx = spec.get("securityContext", {})
        assert pod_ctx.get("runAsNonRoot") is True and pod_ctx.get("runAsUser", 0) != 0
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        env = {e["name"]: e.get("value") for e in c["env"]}
        writable = [c["args"][c["args"].index(f) + 1] for f in ("--cache-dir", "--work-dir") if f in c["args"]]
        for path in [*writable, env["HOME"]]:
            assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), \
                f"{o['metadata']['name']}: {path} is not on a writable volume"


def test_in_chart_stores_run_official_pinned_images_non_root():
    r = render(IN_CHART_STORES)
    for component, repository in (("redis", "docker.io/redis:"), ("s3", "docker.io/rclone/rclone:")):
        d = r.get("Deployment", component_name(component))
        spec = d["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["image"].startswith(repository) and not c["image"].endswith(":latest")
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["securityContext"]["runAsNonRoot"] is True
    for _o, _spec, c in memory3_containers(r):
        assert re.fullmatch(r"ghcr\.io/memory3/memory3:0\.1\.0-(cpu|cuda)", c["image"])


def test_image_digest_pins_the_image():
    digest = "sha256:" + "ab" * 32
    r = render({"image": {"digests": {"cpu": digest}}})
    c = r.get("Deployment", component_name("text"))["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == f"ghcr.io/memory3/memory3@{digest}"


SECRET_ENV = re.compile(r"KEY|SECRET|PASSWORD|TOKEN")


def test_secrets_are_never_inlined(rendered):
    secrets = [v for s in rendered.of_kind("Secret") for v in s.get("data", {}).values()]
    for o in rendered.objects:
        if o["kind"] == "Secret":
            continue
        text = yaml.safe_dump(o)
        for value in secrets:
            assert value not in text
    for o, c in [(o, c) for o, s in pod_specs(rendered) for c in s["containers"] + s.get("initContainers", [])]:
        for env in c.get("env", []):
            if SECRET_ENV.search(env["name"]) and "valueFrom" not in env:
                # Only a value composed of variables that Secrets fill ($(VAR), which Kubernetes expands) inlines
                # nothing: the in-chart store's RCLONE_AUTH_KEY.
                from_secrets = {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
                referenced = set(re.findall(r"\$\((\w+)\)", env["value"]))
                assert referenced and referenced <= from_secrets and not re.sub(r'\$\(\w+\)|[",]', "", env["value"]), \
                    f"{o['metadata']['name']}: {env['name']} is inlined"
            if env["name"] == "MEMORY3_REDIS_URL" and "value" in env:
                credentials = re.match(r"rediss?://([^@]*)@", env["value"])
                assert credentials is None  # the in-chart Redis's password: MEMORY3_REDIS_PASSWORD
        assert "--auth-key" not in c.get("args", [])  # a process's arguments are readable by its node's users


def test_external_stores_create_no_secrets_and_in_chart_ones_keep_theirs():
    assert {s["metadata"]["name"] for s in render({}).of_kind("Secret")} == {component_name("tls"),
                                                                             component_name("auth")}
    assert render({"tls": {"enabled": False}}).of_kind("Secret") == []
    r = render(IN_CHART_STORES)
    for s in r.of_kind("Secret"):
        assert s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert {s["metadata"]["name"] for s in r.of_kind("Secret")} == \
        {component_name("s3"), component_name("redis"), component_name("tls"), component_name("auth")}


def _container_of(r: Rendered, component: str) -> dict:
    if component == "kserve":
        return r.of_kind("InferenceService")[0]["spec"]["predictor"]["containers"][0]
    return r.get("Deployment", component_name(component))["spec"]["template"]["spec"]["containers"][0]


def _token_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "TOKEN" in e["name"]}


def test_text_and_memory_require_the_internal_token_that_only_the_decoder_and_kserve_hold():
    r = render({"kserve": {"enabled": True}})
    internal = {"name": component_name("auth"), "key": "token"}
    for component in ("text", "memory"):
        assert _token_env(_container_of(r, component)) == {"MEMORY3_AUTH_TOKEN": internal}
    for component in ("decoder", "kserve"):
        assert _token_env(_container_of(r, component)) == {"MEMORY3_DEPENDENCY_TOKEN": internal}
    token = r.get("Secret", component_name("auth"))["data"]["token"]
    assert len(base64.b64decode(token)) == 48
    # Without TLS there is no token; an existing Secret replaces the generated one.
    plain = render({"tls": {"enabled": False}})
    assert all(_token_env(_container_of(plain, c)) == {} for c in SERVICES)
    own = render({"auth": {"internal": {"existingSecret": "tokens", "tokenKey": "internal"}}})
    assert _token_env(_container_of(own, "text"))["MEMORY3_AUTH_TOKEN"] == {"name": "tokens", "key": "internal"}
    assert not any(s["metadata"]["name"] == component_name("auth") for s in own.of_kind("Secret"))


def test_the_decoder_requires_its_clients_token_when_asked():
    r = render({"auth": {"decoder": {"enabled": True, "existingSecret": "clients"}}})
    internal = {"name": component_name("auth"), "key": "token"}
    assert _token_env(_container_of(r, "decoder")) == {"MEMORY3_DEPENDENCY_TOKEN": internal,
                                                      "MEMORY3_AUTH_TOKEN": {"name": "clients", "key": "token"}}
    assert _token_env(_container_of(r, "text")) == {"MEMORY3_AUTH_TOKEN": internal}
    assert "get secret clients -o jsonpath='{.data.token}'" in r.notes
    assert '-H "authorization: Bearer $MEMORY3_AUTH_TOKEN"' in r.notes
    assert "authorization" not in render({}).notes


def test_mutual_tls_between_the_services():
    r = render({"tls": {"clientAuth": True}, "kserve": {"enabled": True}})
    parser = build_parser()
    for component in ("text", "memory"):
        args = parser.parse_args(_container_of(r, component)["args"])
        assert str(args.tls_client_ca) == "/etc/memory3/tls/ca.crt"
    for component in ("decoder", "kserve"):
        args = parser.parse_args(_container_of(r, component)["args"])
        assert (str(args.dependency_cert), str(args.dependency_key)) == ("/etc/memory3/tls/tls.crt",
                                                                         "/etc/memory3/tls/tls.key")
    isvc = r.of_kind("InferenceService")[0]["spec"]["predictor"]
    items = {i["path"] for v in isvc["volumes"] if v["name"] == "tls" for i in v["secret"]["items"]}
    assert items == {"tls.crt", "tls.key", "ca.crt"}
    # Off by default: no client certificates asked for or sent.
    default = render({})
    assert parser.parse_args(_container_of(default, "text")["args"]).tls_client_ca is None
    assert parser.parse_args(_container_of(default, "decoder")["args"]).dependency_cert is None


def _redis_egress_ports(values: dict) -> set[int]:
    """The ports of the memory pods' last egress rule (after DNS and S3): Redis's."""
    egress = render(values).get("NetworkPolicy", component_name("memory"))["spec"]["egress"]
    assert len(egress) == 3
    return {port["port"] for port in egress[-1]["ports"]}


def test_memory_pods_reach_every_port_of_a_sentinel_or_cluster_redis():
    sentinel = "redis+sentinel://sentinel-0.cache:26380,sentinel-1.cache/mymaster/0"
    assert _redis_egress_ports({"redis": {"url": sentinel}}) == {26380, 26379, 6379}
    cluster = "rediss+cluster://node-0.cache:7000,node-1.cache:7001"
    assert _redis_egress_ports({"redis": {"url": cluster}}) == {7000, 7001}
    assert _redis_egress_ports({"redis": {"url": "redis://cache:6380/0"}}) == {6380}
    in_secret = {"existingSecret": "memory3-redis"}
    assert _redis_egress_ports({"redis": in_secret, "networkPolicy": {"externalRedisPorts": [26379]}}) == {6379, 26379}


def test_redis_url_from_a_secret_and_without_credentials():
    r = render({"redis": {"existingSecret": "memory3-redis"}})
    env = {e["name"]: e for e in r.get("Deployment", component_name("memory"))["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    assert env["MEMORY3_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "memory3-redis", "key": "redis-url"}
    r = render({"redis": {"url": "redis://cache.redis:6380/1"}})
    env = {e["name"]: e for e in r.get("Deployment", component_name("memory"))["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    assert env["MEMORY3_REDIS_URL"]["value"] == "redis://cache.redis:6380/1"
    policy = r.get("NetworkPolicy", component_name("memory"))
    assert {"port": 6380, "protocol": "TCP"} in [p for rule in policy["spec"]["egress"] for p in rule.get("ports", [])]


# ---------------------------------------------------------------- features


def test_gpu_decoder():
    r = render(VALUE_SETS["gpu"])
    spec = r.get("Deployment", component_name("decoder"))["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["image"].endswith("-cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["args"][c["args"].index("--device") + 1] == "cuda"
    assert c["args"][c["args"].index("--dtype") + 1] == "bfloat16"
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # Only the decoder gets a GPU.
    for component in ("text", "memory"):
        c = r.get("Deployment", component_name(component))["spec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {}) and c["image"].endswith("-cpu")


def test_cpu_decoder_by_default():
    c = render({}).get("Deployment", component_name("decoder"))["spec"]["template"]["spec"]["containers"][0]
    assert c["image"].endswith("-cpu") and c["args"][c["args"].index("--device") + 1] == "cpu"


def _jobs(r: Rendered) -> dict[str, dict]:
    """kind of Job (train, encode, merge) -> the Job."""
    return {re.search(r"-(train|encode|merge)-[0-9a-f]{10}$", j["metadata"]["name"]).group(1): j
            for j in r.of_kind("Job")}


def _train(values: dict) -> tuple[dict, dict, dict]:
    """The trainer Job rendered with these trainer.job values: the Job, its pod spec, its container."""
    job = _jobs(render({"trainer": {"job": {"enabled": True, **values}}}))["train"]
    spec = job["spec"]["template"]["spec"]
    return job, spec, spec["containers"][0]


def test_jobs_run_on_the_cpu_by_default():
    for kind, job in _jobs(render({"trainer": {"job": {"enabled": True}}, "encoding": ENCODING})).items():
        spec = job["spec"]["template"]["spec"]
        c = spec["containers"][0]
        assert c["image"].endswith("-cpu") and c["command"] == ["memory3"], kind
        assert "--device" not in c["args"], kind  # the CLI's default, auto: the CPU image has no CUDA
        assert set(c["resources"]["limits"]) == {"memory"}, kind
        assert not {"runtimeClassName", "nodeSelector", "tolerations", "affinity"} & set(spec), kind
        assert "shm" not in [v["name"] for v in spec["volumes"]], kind
    # imageFlavor cuda alone still gives the CUDA image (and `--device auto` finds a GPU the limits give it).
    _job, _spec, c = _train({"imageFlavor": "cuda"})
    assert c["image"].endswith("-cuda") and "--device" not in c["args"]
    # gpu.count alone asks for nothing.
    _job, spec, c = _train({"gpu": {"count": 4}})
    assert c["command"] == ["memory3"] and "nvidia.com/gpu" not in c["resources"]["limits"]


def test_gpu_trainer_job_on_one_gpu():
    job, spec, c = _train({"gpu": {"enabled": True, "runtimeClassName": "nvidia",
                                   "nodeSelector": {"nvidia.com/gpu.present": "true", "pool": "gpu"}},
                           "nodeSelector": {"pool": "train", "zone": "a"},
                           "tolerations": [{"key": "dedicated", "operator": "Exists"}]})
    assert c["image"] == "ghcr.io/memory3/memory3:0.1.0-cuda"
    assert c["command"] == ["memory3"] and c["args"][0] == "train"
    assert build_parser().parse_args(c["args"]).device == "cuda"
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "8Gi"},
                              "limits": {"memory": "16Gi", "nvidia.com/gpu": 1}}
    assert spec["runtimeClassName"] == "nvidia"
    # The GPU's node selector merged over the trainer's (its key wins), its toleration after the trainer's.
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "gpu", "zone": "a"}
    assert spec["tolerations"] == [{"key": "dedicated", "operator": "Exists"}, NVIDIA_TOLERATION]
    # One process: no torchrun, and the runtime's /dev/shm.
    assert "shm" not in [v["name"] for v in spec["volumes"]]
    assert "/dev/shm" not in [m["mountPath"] for m in c["volumeMounts"]]
    kubernetes_validate.validate(job, KUBE_VERSION, strict=True)


def test_gpu_trainer_job_on_four_gpus_runs_one_process_per_gpu_under_torchrun():
    _job, _spec, one = _train({"gpu": {"enabled": True}})
    job, spec, c = _train({"gpu": {"enabled": True, "count": 4}})
    assert c["command"] == ["torchrun"]
    torchrun = torchrun_args(c["args"])
    assert (torchrun.standalone, torchrun.nproc_per_node, torchrun.no_python, torchrun.training_script) == \
        (True, "4", True, "memory3")
    assert torchrun.log_dir == "/tmp/torchelastic"  # not TMPDIR, the work volume, where attempts would leave logs
    args = build_parser().parse_args(torchrun.training_script_args)
    assert args.device == "cuda"  # each process takes cuda:$LOCAL_RANK
    # A run resumes only with as many processes as wrote its checkpoints: this count has a work dir of its own.
    work_dir = one["args"].index("--work-dir") + 1
    assert args.work_dir.name == one["args"][work_dir].rsplit("/", 1)[1] + "+4-processes"
    assert torchrun.training_script_args[:work_dir] == one["args"][:work_dir]
    assert torchrun.training_script_args[work_dir + 1:] == one["args"][work_dir + 1:]
    assert c["resources"]["limits"] == {"memory": "16Gi", "nvidia.com/gpu": 4}
    # NCCL needs more shared memory than the runtime's 64 MiB /dev/shm.
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in spec["volumes"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    _job, spec, _c = _train({"gpu": {"enabled": True, "count": 2}, "shmSize": "4Gi"})
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}} in spec["volumes"]


def test_gpu_encoding_job_encodes_on_one_gpu_and_the_merge_stays_on_the_cpu():
    gpu = {"enabled": True, "runtimeClassName": "nvidia", "nodeSelector": {"nvidia.com/gpu.present": "true"}}
    jobs = _jobs(render({"encoding": {**ENCODING, "gpu": gpu}}))
    spec = jobs["encode"]["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["image"].endswith("-cuda")
    assert build_parser().parse_args(c["args"]).device == "cuda"
    assert c["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": 1}  # `kb add` is one process
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [NVIDIA_TOLERATION]
    kubernetes_validate.validate(jobs["encode"], KUBE_VERSION, strict=True)
    merge_spec = jobs["merge"]["spec"]["template"]["spec"]
    m = merge_spec["containers"][0]
    assert m["image"].endswith("-cpu") and "--device" not in m["args"]
    assert set(m["resources"]["limits"]) == {"memory"}
    assert not {"runtimeClassName", "nodeSelector", "tolerations"} & set(merge_spec)


GPU_PARTS = {
    "decoder": (lambda gpu, own: {"decoder": {"gpu": gpu, **own}},
                lambda r: r.get("Deployment", component_name("decoder"))["spec"]["template"]["spec"]),
    "kserve": (lambda gpu, own: {"decoder": {"gpu": gpu, **own}, "kserve": {"enabled": True}},
               lambda r: r.of_kind("InferenceService")[0]["spec"]["predictor"]),
    "trainer": (lambda gpu, own: {"trainer": {"job": {"enabled": True, "gpu": gpu, **own}}},
                lambda r: _jobs(r)["train"]["spec"]["template"]["spec"]),
    # The encoding Job has no node selector or tolerations of its own, only its GPU's.
    "encoding": (lambda gpu, _own: {"encoding": {**ENCODING, "gpu": gpu}},
                 lambda r: _jobs(r)["encode"]["spec"]["template"]["spec"]),
}


@pytest.mark.parametrize("part", sorted(GPU_PARTS))
def test_every_part_on_a_gpu_is_placed_the_same_way(part):
    """The decoder, the KServe predictor and the Jobs: the GPU's runtime class, its node selector merged over
    the part's, its tolerations after the part's; without the GPU, the part's own."""
    values, pod = GPU_PARTS[part]
    own = {"nodeSelector": {"pool": "p", "nvidia.com/gpu.present": "false"},
           "tolerations": [{"key": "dedicated", "operator": "Exists"}]}
    gpu = {"enabled": True, "runtimeClassName": "nvidia", "nodeSelector": {"nvidia.com/gpu.present": "true"}}
    spec = pod(render(values(gpu, own)))
    placed = {k: spec.get(k) for k in ("runtimeClassName", "nodeSelector", "tolerations")}
    if part == "encoding":
        assert placed == {"runtimeClassName": "nvidia", "nodeSelector": {"nvidia.com/gpu.present": "true"},
                          "tolerations": [NVIDIA_TOLERATION]}
    else:
        assert placed == {"runtimeClassName": "nvidia", "nodeSelector": {"pool": "p", "nvidia.com/gpu.present": "true"},
                          "tolerations": [{"key": "dedicated", "operator": "Exists"}, NVIDIA_TOLERATION]}
    spec = pod(render(values({**gpu, "enabled": False}, own)))
    placed = {k: spec.get(k) for k in ("runtimeClassName", "nodeSelector", "tolerations")}
    if part == "encoding":
        assert placed == {"runtimeClassName": None, "nodeSelector": None, "tolerations": None}
    else:
        assert placed == {"runtimeClassName": None, **own}


def test_autoscaling_on_leaves_replicas_to_the_hpa_and_off_sets_them():
    on = render({})
    for component in SERVICES:
        assert "replicas" not in on.get("Deployment", component_name(component))["spec"]
        assert on.get("HorizontalPodAutoscaler", component_name(component))
    hpa = on.get("HorizontalPodAutoscaler", component_name("decoder"))
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "memory3_num_requests_waiting"
    off = render(VALUE_SETS["autoscaling-off"])
    assert off.of_kind("HorizontalPodAutoscaler") == []
    for component in SERVICES:
        assert off.get("Deployment", component_name(component))["spec"]["replicas"] == 2


def test_text_hpa_adds_the_retrieval_queue_when_asked():
    def metrics(r, name):
        return [m.get("pods", {}).get("metric", {}).get("name") or m["resource"]["name"]
                for m in r.get("HorizontalPodAutoscaler", name)["spec"]["metrics"]]

    assert metrics(render({}), component_name("text")) == ["cpu"]
    r = render({"text": {"indexShards": 2, "autoscaling": {"targetRequestsWaiting": 3}}})
    for shard in (0, 1):
        hpa = r.get("HorizontalPodAutoscaler", f"{component_name('text')}-{shard}")
        assert metrics(r, hpa["metadata"]["name"]) == ["cpu", "memory3_retrieval_requests_waiting"]
        assert hpa["spec"]["metrics"][1]["pods"]["target"] == {"type": "AverageValue", "averageValue": "3"}
    assert metrics(r, component_name("memory")) == ["cpu"]


KEDA = {"decoder": {"autoscaling": {"keda": {"enabled": True}}}, "metrics": {"serviceMonitor": {"enabled": True}}}


def test_keda_falls_back_to_a_replica_count_when_asked():
    """Without a fallback, a Prometheus that cannot be queried leaves the decoders at whatever count they had."""
    keda = KEDA
    assert "fallback" not in render(keda).get("ScaledObject", component_name("decoder"))["spec"]
    spec = render(merge(keda, {"decoder": {"autoscaling": {"keda": {"fallbackReplicas": 2}}}})).get(
        "ScaledObject", component_name("decoder"))["spec"]
    assert spec["fallback"] == {"failureThreshold": 3, "replicas": 2}


def test_keda_replaces_the_decoder_hpa():
    r = render(KEDA)
    assert r.find("HorizontalPodAutoscaler", component_name("decoder")) is None
    scaled = r.get("ScaledObject", component_name("decoder"))
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and "memory3_num_requests_waiting" in trigger["metadata"]["query"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == component_name("decoder")


def test_pdbs_for_each_service_that_runs_two_pods_or_more():
    r = render({c: {"autoscaling": {"minReplicas": 2}} for c in SERVICES})
    assert sorted(p["metadata"]["name"] for p in r.of_kind("PodDisruptionBudget")) == \
        sorted(component_name(c) for c in SERVICES)


def test_release_change_rolls_the_service_pods():
    one, two = render({"release": "small-v1"}), render({"release": "small-v2"})
    for component in SERVICES:
        t1 = one.get("Deployment", component_name(component))["spec"]["template"]
        t2 = two.get("Deployment", component_name(component))["spec"]["template"]
        assert t1 != t2
        assert t2["metadata"]["annotations"]["memory3.io/release"] == "small-v2"
        args = t2["spec"]["containers"][0]["args"]
        assert args[args.index("--release") + 1] == "small-v2"
        strategy = one.get("Deployment", component_name(component))["spec"]["strategy"]["rollingUpdate"]
        assert strategy["maxUnavailable"] == 0  # old pods serve until the new release is SERVING


def test_each_index_shard_of_the_text_service_is_its_own_deployment_and_the_decoder_asks_them_all():
    from memory3.services.retrieval.index import IndexShard

    r = render(VALUE_SETS["text-shards"])
    parser = build_parser()
    shards = component_deployments(r, "text")
    assert [d["metadata"]["name"] for d in shards] == [f"{component_name('text')}-{i}" for i in range(3)]
    for i, d in enumerate(shards):
        args = parser.parse_args(d["spec"]["template"]["spec"]["containers"][0]["args"])
        assert IndexShard.parse(args.index_shard) == IndexShard(i, 3)
        assert pod_labels(d)["memory3.io/index-shard"] == str(i)
        # Its Service, autoscaler and disruption budget are its own.
        for kind in ("Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
            assert r.get(kind, d["metadata"]["name"])
    decoder = r.get("Deployment", component_name("decoder"))["spec"]["template"]["spec"]["containers"][0]
    predictor = r.of_kind("InferenceService")[0]["spec"]["predictor"]["containers"][0]
    for c in (decoder, predictor):
        args = c["args"]
        assert args[args.index("--text-address") + 1] == ",".join(f"{d['metadata']['name']}:50052" for d in shards)
    assert " ".join(f"deployment/{d['metadata']['name']}" for d in shards) in r.notes
    assert "Index shards: 3 text services, each holding one reference in 3; the decoder asks them all" in r.notes


def test_trainer_job_is_named_after_its_release():
    a = render({"trainer": {"job": {"enabled": True, "release": "small-v2"}}}).of_kind("Job")
    b = render({"trainer": {"job": {"enabled": True, "release": "small-v3"}}}).of_kind("Job")
    assert len(a) == len(b) == 1 and a[0]["metadata"]["name"] != b[0]["metadata"]["name"]
    assert a[0]["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_encoding_is_an_indexed_job_over_shards_and_a_job_that_merges_them():
    encoding = {"enabled": True, "shardsVolumeClaim": "shards", "shards": 8}
    rendered = render({"encoding": encoding})
    encode, merge_job = rendered.of_kind("Job")
    assert f"get job {encode['metadata']['name']}" in rendered.notes
    assert f"logs -f job/{merge_job['metadata']['name']}   (merges them into small-v1-encoded)" in rendered.notes
    assert (encode["spec"]["completionMode"], encode["spec"]["completions"]) == ("Indexed", 8)
    parser = build_parser()
    add = parser.parse_args(encode["spec"]["template"]["spec"]["containers"][0]["args"])
    assert [str(f) for f in add.files] == ["/shards/shard-$(JOB_COMPLETION_INDEX).txt"]
    assert (add.release, add.name) == ("small-v1", "small-v1-shard-$(JOB_COMPLETION_INDEX)")
    merged = parser.parse_args(merge_job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert merged.derived == [f"small-v1-shard-{i}" for i in range(8)]
    assert (merged.release, merged.name, merged.wait) == ("small-v1", "small-v1-encoded", 86400)
    assert merge_job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "encoder"

    # Serving the merged release leaves both Jobs as they were (a Job's template cannot change).
    later = render({"release": "small-v1-encoded", "encoding": {**encoding, "release": "small-v1"}}).of_kind("Job")
    assert [job["metadata"]["name"] for job in later] == [encode["metadata"]["name"], merge_job["metadata"]["name"]]
    assert [job["spec"] for job in later] == [encode["spec"], merge_job["spec"]]
    named = render({"encoding": {**encoding, "merge": {"name": "kb-2027"}}}).of_kind("Job")
    assert parser.parse_args(named[1]["spec"]["template"]["spec"]["containers"][0]["args"]).name == "kb-2027"
    assert len(render({"encoding": {**encoding, "merge": {"enabled": False}}}).of_kind("Job")) == 1


def test_network_policies_model_who_talks_to_whom():
    r = render(merge(IN_CHART_STORES, {"kserve": {"enabled": True}}))

    def allowed_from(target: str) -> set[str]:
        policy = r.get("NetworkPolicy", component_name(target))
        sources = set()
        for rule in policy["spec"].get("ingress", []):
            if any(p["port"] in ("metrics", "health") for p in rule.get("ports", [])):
                continue
            for peer in rule.get("from", [{"any": True}]):
                if "any" in peer:
                    sources.add("*")
                    continue
                for o, _spec in pod_specs(r):
                    if labels_match(peer["podSelector"], pod_labels(o)):
                        sources.add(pod_labels(o)["app.kubernetes.io/component"])
                kserve_labels = {"app.kubernetes.io/name": "memory3", "app.kubernetes.io/instance": "m3",
                                 "app.kubernetes.io/component": "kserve"}
                if labels_match(peer["podSelector"], kserve_labels):
                    sources.add("kserve")
        return sources

    assert allowed_from("text") == {"decoder", "kserve"}
    assert allowed_from("memory") == {"decoder", "kserve"}
    assert allowed_from("redis") == {"memory"}
    # The services read the release from S3; the trainer and encoder publish to it.
    assert allowed_from("s3") >= {"text", "memory", "decoder", "kserve"}
    assert allowed_from("decoder") == {"*"}
    isvc_labels = r.of_kind("InferenceService")[0]["spec"]["predictor"]["labels"]
    assert isvc_labels["app.kubernetes.io/component"] == "kserve"


def test_notes_show_grpcurl_commands():
    notes = render({}).notes
    assert "get secret m3-memory3-tls -o jsonpath='{.data.ca\\.crt}' | base64 -d > memory3-ca.crt" in notes
    grpcurl = "grpcurl -cacert memory3-ca.crt -servername m3-memory3-decoder"
    assert f"{grpcurl} localhost:50051 grpc.health.v1.Health/Check" in notes
    assert "memory3.v1.GenerationService/Generate" in notes and "--tls-ca memory3-ca.crt" in notes
    assert "-plaintext" not in notes
    assert "small-v1" in notes
    custom = render({"tls": {"existingSecret": "memory3-tls", "caKey": "issuer.pem"}}).notes
    assert "get secret memory3-tls -o jsonpath='{.data.issuer\\.pem}'" in custom
    plain = render({"tls": {"enabled": False}}).notes
    assert "grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check" in plain and "-cacert" not in plain


# ---------------------------------------------------------------- values


BAD_VALUES = [
    ({"release": ""}, "release: set the trainer release to serve"),
    ({"release": "a/b"}, 'release: "a/b" is not a release name'),
    ({"text": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
     "text.autoscaling: minReplicas (5) is greater than maxReplicas (2)"),
    ({"decoder": {"gpu": {"enabled": True}, "imageFlavor": "cpu"}},
     "decoder.gpu.enabled: a GPU is requested but decoder.imageFlavor is cpu"),
    ({"trainer": {"job": {"enabled": True, "imageFlavor": "cpu", "gpu": {"enabled": True}}}},
     "trainer.job.gpu.enabled: a GPU is requested but trainer.job.imageFlavor is cpu; the CPU image has no CUDA "
     "build of torch. Set trainer.job.imageFlavor=auto (or cuda)"),
    ({"encoding": {**ENCODING, "imageFlavor": "cpu", "gpu": {"enabled": True}}},
     "encoding.gpu.enabled: a GPU is requested but encoding.imageFlavor is cpu; the CPU image has no CUDA "
     "build of torch. Set encoding.imageFlavor=auto (or cuda)"),
    ({"trainer": {"job": {"enabled": True, "gpu": {"enabled": True, "count": 0}}}},
     "trainer.job.gpu.count: must be at least 1 when trainer.job.gpu.enabled"),
    ({"trainer": {"job": {"enabled": True, "gpu": {"enabled": True, "count": 2,
                                                  "resourceName": "nvidia.com/mig-3g.40gb"}}}},
     "trainer.job.gpu.count: a CUDA process sees one MIG device however many the pod gets, so 2 training processes "
     "cannot each have one; train on whole GPUs"),
    ({"trainer": {"job": {"enabled": True, "resources": {"limits": {"nvidia.com/gpu": 1}}}}},
     "trainer.job.resources: a GPU limit is set but the CPU image has no CUDA build of torch; "
     "set trainer.job.gpu.enabled=true"),
    ({"encoding": {**ENCODING, "resources": {"limits": {"nvidia.com/gpu": 1}}}},
     "encoding.resources: a GPU limit is set but the CPU image has no CUDA build of torch; "
     "set encoding.gpu.enabled=true"),
    ({"decoder": {"dtype": "bfloat16"}}, "decoder.dtype: bfloat16 on CPU"),
    ({"s3": {"endpoint": ""}}, "s3.endpoint: set host:port of your S3-compatible store"),
    ({"s3": {"existingSecret": ""}}, "s3.existingSecret: name a Secret"),
    ({"s3": {"endpoint": "", "inChart": {"enabled": True}, "secure": True}},
     "s3.secure: the in-chart store speaks plain HTTP"),
    ({"s3": {"endpoint": "https://s3.example.com"}}, "must be host:port without a scheme"),
    ({"redis": {"url": "redis://:hunter2@cache:6379/0"}}, "redis.url: it holds credentials"),
    ({"redis": {"url": "redis://cache:6379", "existingSecret": "r"}}, "set either redis.url or redis.existingSecret"),
    ({"redis": {"url": "sentinel://cache:26379/mymaster"}}, "must start with redis://, redis+sentinel://"),
    ({"metrics": {"prometheusRule": {"enabled": True}}}, "set metrics.serviceMonitor.enabled=true too"),
    ({"auth": {"decoder": {"enabled": True}}}, "auth.decoder.existingSecret: name a Secret"),
    ({"tls": {"enabled": False}, "auth": {"decoder": {"enabled": True, "existingSecret": "c"}}},
     "a token goes over TLS only"),
    ({"tls": {"enabled": False, "clientAuth": True}}, "mutual TLS needs tls.enabled=true"),
    ({"encoding": {"enabled": True}}, "encoding.shardsVolumeClaim:"),
    ({"decoder": {"autoscaling": {"enabled": False, "keda": {"enabled": True}}}},
     "decoder.autoscaling.keda.enabled"),
    ({"memory": {"resources": {"requests": {"cpu": None}}}}, "memory.resources.requests.cpu"),  # null deletes
    ({"metrics": {"port": 50051}}, "metrics.port: 50051 is also a gRPC port"),
    ({"server": {"healthPort": 50052}}, "server.healthPort: 50052 is also a gRPC or the metrics port"),
    ({"tls": {"existingSecret": "memory3-tls", "keyKey": ""}},
     'tls.keyKey: name the key of its private key in the Secret "memory3-tls"'),
    ({"tls": {"existingSecret": "memory3-tls", "caKey": ""}}, "tls.caKey: name the key of the CA certificate"),
    ({"tls": {"enabled": False, "existingSecret": "memory3-tls"}},
     'tls.existingSecret: "memory3-tls" is set but tls.enabled=false'),
    ({"tls": {"generated": {"validityDays": 0}}}, "tls.generated.validityDays: must be at least 1"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m.split(":")[0] for _v, m in BAD_VALUES])
def test_bad_values_fail_with_a_readable_message(values, message):
    with pytest.raises(helm.HelmRenderError) as failure:
        render(values)
    text = str(failure.value)
    assert "VALUES VALIDATION:" in text and message in text


def test_every_problem_is_reported_at_once():
    with pytest.raises(helm.HelmRenderError) as failure:
        render({}, required=False)
    lines = [line for line in str(failure.value).splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in lines] == ["- release", "- s3.endpoint", "- s3.existingSecret"]


@pytest.mark.parametrize(("values", "path"), [
    ({"decoder": {"retrievalPolicy": "maybe"}}, "/decoder/retrievalPolicy"),
    ({"decoder": {"gpus": 1}}, "'gpus' not allowed"),
    ({"text": {"port": 70000}}, "/text/port"),
    ({"image": {"digests": {"cpu": "latest"}}}, "/image/digests/cpu"),
    ({"trainer": {"job": {"indexKind": "ivf"}}}, "/trainer/job/indexKind"),
    ({"trainer": {"job": {"imageFlavor": "gpu"}}}, "/trainer/job/imageFlavor"),
    ({"trainer": {"job": {"shmSize": "lots"}}}, "/trainer/job/shmSize"),
    ({"encoding": {"imageFlavor": "gpu"}}, "/encoding/imageFlavor"),
    ({"encoding": {"gpu": {"count": 2}}}, "'count' not allowed"),  # `kb add` is one process: one GPU
    ({"text": {"autoscaling": {"targetRequestsWaiting": -1}}}, "/text/autoscaling/targetRequestsWaiting"),
])
def test_schema_rejects_typos_and_wrong_types(values, path):
    with pytest.raises(helm.HelmValuesError) as failure:
        render(values)
    assert path in str(failure.value)


def test_schema_is_generated_from_values_yaml():
    sys.path.insert(0, str(CHART.parent))
    try:
        import generate_schema
    finally:
        sys.path.remove(str(CHART.parent))
    assert (CHART / "values.schema.json").read_text() == generate_schema.render(), \
        "values.schema.json is stale: run python deploy/helm/generate_schema.py"
    text = (CHART / "values.yaml").read_text()
    docs = generate_schema.descriptions(text)

    def keys(values: dict, path: str = ""):
        for key, value in values.items():
            dotted = f"{path}.{key}" if path else key
            yield dotted
            if isinstance(value, dict) and key not in generate_schema.FREE_MAPS:
                yield from keys(value, dotted)

    undocumented = [k for k in keys(yaml.safe_load(text)) if not docs.get(k)]
    assert undocumented == [], "values without a `# --` description"


def test_defaults_plus_required_values_pass_the_schema():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(copy.deepcopy(REQUIRED)))


def trained_preset(args) -> str:
    from memory3.services.cli.commands import train_pipeline_config

    return train_pipeline_config(preset=args.preset, quick=args.quick, seed=0).preset


@pytest.mark.parametrize(("job", "preset"), [
    ({"quick": True}, "tiny"),  # the one-minute trial of the docs
    ({"quick": True, "preset": "small"}, "small"),
    ({"preset": "paper-2.4b"}, "paper-2.4b"),
    ({}, "small"),
])
def test_the_training_job_trains_the_preset_its_values_name(job, preset):
    """`--preset small` was always rendered, and the CLI trained tiny for it with --quick: the rendered
    command said small. A preset is rendered only when one is given."""
    r = render({"trainer": {"job": {"enabled": True, **job}}})
    [(_o, _spec, c)] = [found for found in memory3_containers(r) if found[2]["args"][0] == "train"]
    args = build_parser().parse_args([expand(a, c.get("env", [])) for a in c["args"]])
    assert ("--preset" in c["args"]) == ("preset" in job) and trained_preset(args) == preset
