"""The chart's wiring without a cluster: render deploy/helm/memory3, take the text, memory and decoder
Deployments' container commands and environment exactly as rendered, and run them as local processes
against a real S3 server (rclone) and a real redis-server. The stack must become healthy through the
probes the manifests declare and answer a Generate through the decoder's Service address.

The chart's defaults are kept, TLS included: the services serve TLS only with the certificate the chart
generates, the decoder checks it against the generated CA, and the probes ask the plaintext health port.
Text and memory require the internal token the chart generates, which the decoder sends. Two options
are turned on beside them, so that they are run too: mutual TLS between the services
(`tls.clientAuth`) and a token the decoder's clients must send (`auth.decoder`).

What a cluster would provide is emulated, nothing else is changed:
- DNS: a rendered Service name resolves to 127.0.0.1, and its port to the targetPort's container port (the
  generated certificate names 127.0.0.1 besides the Services, for port-forwarding);
- Secrets: `secretKeyRef` reads from the Secrets an operator would have created (the local stores'
  credentials) or from the rendered ones, and `$(VAR)` references expand the way the kubelet expands them;
- volumes: a Secret volume is a temporary directory holding the Secret's items, every other volumeMount a
  fresh empty one;
- network namespaces: each pod has its own, so the shared metrics port becomes `--metrics-port 0`
  (any free port), the shared health port a free port per pod (its probes follow), a service port that
  another pod already listens on (the text service's index shards) a free port too, which its Service
  then resolves to, and `--host 0.0.0.0` becomes 127.0.0.1 (tests only listen on loopback).

The same stack runs again with the text service's index in two shards (`text.indexShards`): two text
Deployments, each behind its own Service, which the decoder asks together.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory3.services.stack import StackProcess, stop_processes, wait_serving
from memory3.services.storage.local_s3 import free_port
from memory3.v1 import generation_service_pb2 as pb
from memory3.v1 import generation_service_pb2_grpc as pb_grpc
from memory3.v1 import memory_service_pb2 as memory_pb
from memory3.v1 import memory_service_pb2_grpc as memory_grpc
from memory3.v1 import text_service_pb2 as text_pb
from memory3.v1 import text_service_pb2_grpc as text_grpc

pytestmark = pytest.mark.integration
CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "memory3"
SERVICES = ("text", "memory", "decoder")
CLIENT_TOKEN = "a-token-the-decoders-clients-send"


def render_chart(values: dict) -> list[dict]:
    helm = pytest.importorskip("helm_python")
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="m3", namespace="ai")
    return [doc for path, text in manifests.items() if path.endswith(".yaml") and text.strip()
            for doc in yaml.safe_load_all(text) if doc]


class Cluster:
    """Just enough of Kubernetes to run rendered pods as processes: Service DNS, Secrets, env expansion."""

    def __init__(self, objects: list[dict], secrets: dict[str, dict[str, str]]) -> None:
        self.objects = objects
        self.secrets = secrets
        self.remapped: dict[tuple[str, int], int] = {}  # (Deployment, container port) -> the local port used

    def deployments(self, component: str) -> list[dict]:
        """A component's Deployments: one, or one per index shard of the text service."""
        return [d for d in self.objects if d["kind"] == "Deployment"
                and d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component]

    def listen_port(self, deployment: dict, container_port: int) -> int:
        """The local port a pod's container port is served on: itself, unless another pod took it."""
        key = (deployment["metadata"]["name"], container_port)
        if key not in self.remapped:
            taken = set(self.remapped.values())
            self.remapped[key] = container_port if container_port not in taken else free_port()
        return self.remapped[key]

    def find(self, kind: str, name: str) -> dict | None:
        return next((o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name), None)

    def local_address(self, host: str, port: int) -> str:
        """A Service's host:port -> 127.0.0.1:<the container port its targetPort names>."""
        service = self.find("Service", host)
        assert service is not None, f"{host}:{port} names no rendered Service"
        target = next(p["targetPort"] for p in service["spec"]["ports"] if p["port"] == port)
        selector = service["spec"]["selector"]
        pods = [d for d in self.objects if d["kind"] == "Deployment"
                and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, f"Service {host} selects {len(pods)} Deployments"
        ports = [p for c in pods[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]]
        container_port = next(p["containerPort"] for p in ports if target in (p.get("name"), p["containerPort"]))
        return f"127.0.0.1:{self.listen_port(pods[0], container_port)}"

    def resolve(self, text: str) -> str:
        """Rewrite every `<service>:<port>` in a string (an address flag, a Redis URL) to its local address."""
        def replace(match: re.Match) -> str:
            host, port = match.group(1), int(match.group(2))
            return self.local_address(host, port) if self.find("Service", host) else match.group(0)
        return re.sub(r"(?<![\w.-])([a-z0-9][a-z0-9-]*):(\d+)", replace, text)

    def env(self, container: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for var in container.get("env", []):
            if "valueFrom" in var:
                ref = var["valueFrom"]["secretKeyRef"]
                value = self.secret(ref["name"])[ref["key"]]
            else:
                value = expand(var["value"], env)
            env[var["name"]] = self.resolve(value)
        return env

    def secret(self, name: str) -> dict[str, str]:
        if name in self.secrets:
            return self.secrets[name]
        import base64
        rendered = self.find("Secret", name)
        assert rendered is not None, f"Secret {name} is neither rendered nor provided by the operator"
        return {k: base64.b64decode(v).decode() for k, v in rendered["data"].items()}


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion (unknown references stay as they are)."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def pod_process(cluster: Cluster, deployment: dict, root: Path) -> tuple[list[str], dict[str, str], int]:
    """(argv, environment, local port of its probes) of the deployment's container, with its volumes under `root`."""
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["command"] == ["memory3"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: root / m["name"] for m in container.get("volumeMounts", [])}
    for mount in container.get("volumeMounts", []):
        directory = root / mount["name"]
        directory.mkdir(parents=True, exist_ok=True)
        secret = volumes[mount["name"]].get("secret")
        if secret is not None:
            data = cluster.secret(secret["secretName"])
            for item in secret.get("items") or [{"key": k, "path": k} for k in data]:
                (directory / item["path"]).write_text(data[item["key"]])

    def local_path(value: str) -> str:
        for mount, directory in mounts.items():
            if value == mount or value.startswith(mount.rstrip("/") + "/"):
                return str(directory) + value[len(mount.rstrip("/")):]
        return value

    env = {k: local_path(v) for k, v in cluster.env(container).items()}
    args = [local_path(cluster.resolve(expand(a, env))) for a in container["args"]]
    args[args.index("--metrics-port") + 1] = "0"
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(cluster.listen_port(deployment, int(args[args.index("--port") + 1])))
    probed = container["startupProbe"]["grpc"]["port"]
    if "--health-port" in args:  # TLS: the probes ask the plaintext health port, not the service port
        assert int(args[args.index("--health-port") + 1]) == probed != int(args[args.index("--port") + 1])
        args[args.index("--health-port") + 1] = str(port := free_port())
        return args, env, port
    assert int(args[args.index("--port") + 1]) == probed
    return args, env, probed


@contextmanager
def pods_running(root: Path, s3, release: str, redis_url: str, **values):
    """The rendered text, memory and decoder Deployments (with `values` beside the defaults) running as
    processes until the block ends: (cluster, {Deployment name: its process})."""
    ports = {c: free_port() for c in SERVICES}
    values = {
        "release": release,
        "s3": {"endpoint": s3.endpoint, "bucket": s3.bucket, "existingSecret": "memory3-s3"},
        "redis": {"existingSecret": "memory3-redis"},
        "decoder": {"port": ports["decoder"], "maxBatch": 4},
        "text": {"port": ports["text"], **values.pop("text", {})},
        "memory": {"port": ports["memory"]},
        "tls": {"clientAuth": True},
        "auth": {"decoder": {"enabled": True, "existingSecret": "memory3-clients"}},
        **values,
    }
    cluster = Cluster(render_chart(values), secrets={
        "memory3-s3": {"access-key": s3.access_key, "secret-key": s3.secret_key},
        "memory3-redis": {"redis-url": redis_url},
        "memory3-clients": {"token": CLIENT_TOKEN},
    })
    processes: list[StackProcess] = []
    try:
        for deployment in (d for component in SERVICES for d in cluster.deployments(component)):
            name = deployment["metadata"]["name"]
            args, env, port = pod_process(cluster, deployment, root / name)
            base = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL") if k in os.environ}
            log = root / f"{name}.log"
            with open(log, "ab") as out:
                process = subprocess.Popen([sys.executable, "-m", "memory3.services.cli.main", *args],
                                           env={**base, **env}, stdout=out, stderr=out, start_new_session=True)
            processes.append(StackProcess(name, process.pid, port, str(log)))
        for p in processes:
            wait_serving(p, timeout_s=180)
        yield cluster, {p.name: p for p in processes}
    finally:
        stop_processes(processes)


@pytest.fixture(scope="module")
def chart_stack(tmp_path_factory, local_s3, random_release, local_redis_module):
    with pods_running(tmp_path_factory.mktemp("pods"), local_s3.config, random_release.name,
                      local_redis_module.url) as (cluster, processes):
        yield cluster, {name.removeprefix("m3-memory3-"): p for name, p in processes.items()}


@pytest.fixture(scope="module")
def local_redis_module(tmp_path_factory):
    from memory3.services.storage.local_redis import start_local_redis

    server = start_local_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def grpc_port(container: dict) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")


def test_rendered_pods_become_healthy_through_their_probes(chart_stack):
    cluster, processes = chart_stack
    for component in SERVICES:
        container = cluster.find("Deployment", f"m3-memory3-{component}")["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[probe]["grpc"]
            # The kubelet's probes speak plaintext, to this pod's (remapped) health port.
            with grpc.insecure_channel(f"127.0.0.1:{processes[component].port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=spec.get("service", "")), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (component, probe)
        # The service port itself speaks TLS only.
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port(container)}") as channel, \
                pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, component


def test_generate_through_the_decoder_service(chart_stack):
    cluster, _processes = chart_stack
    service = cluster.find("Service", "m3-memory3-decoder")
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    # A client outside the chart checks the decoder against the CA in the rendered Secret.
    tls = grpc.ssl_channel_credentials(root_certificates=cluster.secret("m3-memory3-tls")["ca.crt"].encode())
    request = pb.GenerateRequest(
        prompt="Tell me about the clock repairer of Pemberlyn and the lighthouse keeper of Skarn Point.",
        params=pb.GenerationParams(max_tokens=16))
    address = cluster.local_address("m3-memory3-decoder", port)
    with grpc.secure_channel(address, tls) as channel, pytest.raises(grpc.RpcError) as refused:
        list(pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=30))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # auth.decoder: the clients' token
    usage = generate_with_token(cluster, request)[-1].usage
    # Retrieval went through the text service and memories through the memory service.
    assert usage.retrievals >= 1 and usage.memories_read >= 5


def generate_with_token(cluster: Cluster, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    """Generate through the decoder's Service as a client with the CA and the clients' token."""
    service = cluster.find("Service", "m3-memory3-decoder")
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    tls = grpc.ssl_channel_credentials(root_certificates=cluster.secret("m3-memory3-tls")["ca.crt"].encode())
    credentials = grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(CLIENT_TOKEN))
    with grpc.secure_channel(cluster.local_address("m3-memory3-decoder", port), credentials) as channel:
        responses = list(pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=120))
    assert sum(len(r.token_ids) for r in responses) == request.params.max_tokens
    return responses


def test_text_and_memory_answer_only_the_decoders_certificate_and_token(chart_stack):
    """What the decoder got through above, a client without the CA's certificate or the internal token does not."""
    cluster, _processes = chart_stack
    tls = cluster.secret("m3-memory3-tls")
    ca, cert, key = (tls[k].encode() for k in ("ca.crt", "tls.crt", "tls.key"))
    for component in ("text", "memory"):
        service = cluster.find("Service", f"m3-memory3-{component}")
        port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
        address = cluster.local_address(service["metadata"]["name"], port)
        no_certificate = grpc.ssl_channel_credentials(root_certificates=ca)
        with grpc.secure_channel(address, no_certificate) as channel, pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, component  # mutual TLS: no handshake
        certificate = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        with grpc.secure_channel(address, certificate) as channel:
            stub = (text_grpc.TextServiceStub(channel).Tokenize if component == "text"
                    else memory_grpc.MemoryServiceStub(channel).GetStats)
            request = text_pb.TokenizeRequest(text="x") if component == "text" else memory_pb.GetStatsRequest()
            with pytest.raises(grpc.RpcError) as refused:
                stub(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, component  # no internal token
            token = grpc.access_token_call_credentials(cluster.secret("m3-memory3-auth")["token"])
            stub(request, timeout=10, credentials=token)  # with both, it answers


def test_the_decoder_asks_every_index_shard_of_the_text_service(tmp_path, local_s3, random_release,
                                                                 local_redis_module):
    with pods_running(tmp_path, local_s3.config, random_release.name, local_redis_module.url,
                      text={"indexShards": 2}) as (cluster, processes):
        assert sorted(processes) == ["m3-memory3-decoder", "m3-memory3-memory", "m3-memory3-text-0",
                                     "m3-memory3-text-1"]
        for shard in ("0", "1"):
            log = Path(processes[f"m3-memory3-text-{shard}"].log).read_text()
            assert f"(index shard {shard}/2)" in log
        request = pb.GenerateRequest(prompt="Who keeps the lighthouse at Skarn Point, and what does Ilsa Varrow "
                                            "repair in Pemberlyn?", params=pb.GenerationParams(max_tokens=8))
        responses = generate_with_token(cluster, request)
        assert responses[-1].usage.retrievals >= 1 and responses[-1].usage.memories_read >= 5
        # The decoder merged both shards' answers: shard i holds the references of rows i, i + 2, …
        row = {r.id: i for i, r in enumerate(random_release.references)}
        cited = {ref.id for r in responses for c in r.citations for ref in c.references}
        assert {row[rid] % 2 for rid in cited} == {0, 1}
