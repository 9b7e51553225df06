"""TLS in the chart: on by default for text, memory and the decoder, with a generated (or an existing,
cert-manager style) Secret, probes on the plaintext health-only port, and all of it off with tls.enabled=false.

The generated certificate differs on every offline render (lookup finds no Secret without a cluster), so
these tests check its structure, names and signature, never its bytes."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .charts import NAMESPACE, Rendered, chart_with_tls_secret, component_name, render

SERVICES = ("text", "memory", "decoder")
TLS_DIR = "/etc/memory3/tls"
HEALTH_PORT = 50050


def container(r: Rendered, component: str) -> dict:
    return r.get("Deployment", component_name(component))["spec"]["template"]["spec"]["containers"][0]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def volume(r: Rendered, component: str, name: str) -> dict | None:
    spec = r.get("Deployment", component_name(component))["spec"]["template"]["spec"]
    return next((v for v in spec.get("volumes", []) if v["name"] == name), None)


def volumes_of(o: dict) -> list[dict]:
    spec = o.get("spec", {})
    spec = spec.get("predictor", spec.get("template", {}).get("spec", spec))
    return spec.get("volumes", []) if isinstance(spec, dict) else []


@pytest.fixture(scope="module")
def default() -> Rendered:
    return render({"kserve": {"enabled": True}})


def test_services_serve_tls_only_by_default_and_probes_use_the_health_port(default):
    for component in SERVICES:
        c = container(default, component)
        args = c["args"]
        assert flag(args, "--tls-cert") == f"{TLS_DIR}/tls.crt" and flag(args, "--tls-key") == f"{TLS_DIR}/tls.key"
        assert flag(args, "--health-port") == str(HEALTH_PORT)
        mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
        assert mount == {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
        secret = volume(default, component, "tls")["secret"]
        assert secret["secretName"] == component_name("tls")
        assert secret["defaultMode"] == 0o440
        assert secret["items"] == [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"},
                                   {"key": "ca.crt", "path": "ca.crt"}]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["health"] == HEALTH_PORT and ports["grpc"] != HEALTH_PORT
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == HEALTH_PORT, (component, probe)
        # The only plaintext listener is health: it is in no Service, and the NetworkPolicy lets the kubelet in.
        service_ports = default.get("Service", component_name(component))["spec"]["ports"]
        assert sorted(p["targetPort"] for p in service_ports) == ["grpc", "metrics"]
        ingress = default.get("NetworkPolicy", component_name(component))["spec"]["ingress"]
        assert {"ports": [{"port": "health", "protocol": "TCP"}]} in ingress


def test_decoder_and_kserve_check_text_and_memory_against_the_ca(default):
    decoder = container(default, "decoder")
    assert flag(decoder["args"], "--dependency-tls-ca") == f"{TLS_DIR}/ca.crt"
    predictor = default.of_kind("InferenceService")[0]["spec"]["predictor"]
    kserve = predictor["containers"][0]
    assert flag(kserve["args"], "--dependency-tls-ca") == f"{TLS_DIR}/ca.crt"
    assert "--tls-cert" not in kserve["args"]  # its own ports are KServe's ingress's business
    tls = next(v for v in predictor["volumes"] if v["name"] == "tls")
    assert tls["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # no server key in the predictor
    assert {"name": "tls", "mountPath": TLS_DIR, "readOnly": True} in kserve["volumeMounts"]


def test_generated_certificate_names_every_service_and_is_signed_by_the_ca(default):
    secret = default.get("Secret", component_name("tls"))
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    # ca.key: kept to sign a new certificate when the Services change; no pod mounts it.
    assert sorted(data) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    mounted = [item["key"] for o in default.objects for v in volumes_of(o) if "secret" in v
               for item in v["secret"].get("items", [])]
    assert mounted and "ca.key" not in mounted
    ca, cert = x509.load_pem_x509_certificate(data["ca.crt"]), x509.load_pem_x509_certificate(data["tls.crt"])
    key = serialization.load_pem_private_key(data["tls.key"], password=None)
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(sans.get_values_for_type(x509.DNSName))
    for component in SERVICES:
        name = component_name(component)
        assert {name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc",
                f"{name}.{NAMESPACE}.svc.cluster.local"} <= dns
    assert "localhost" in dns  # `kubectl port-forward` and `memory3 generate --tls-ca`
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)


def test_generated_certificate_takes_extra_names_and_the_cluster_domain():
    r = render({"tls": {"clusterDomain": "corp.example", "generated": {"extraDnsNames": ["memory3.example.com"]}}})
    cert = x509.load_pem_x509_certificate(base64.b64decode(r.get("Secret", component_name("tls"))["data"]["tls.crt"]))
    dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "memory3.example.com" in dns
    assert f"{component_name('text')}.{NAMESPACE}.svc.corp.example" in dns


def test_an_existing_secret_is_mounted_by_its_keys_and_none_is_generated():
    r = render({"tls": {"existingSecret": "memory3-tls", "certKey": "cert.pem", "keyKey": "key.pem",
                        "caKey": "issuer.pem"}, "kserve": {"enabled": True}})
    assert [s["metadata"]["name"] for s in r.of_kind("Secret")] == [component_name("auth")]  # the token's
    for component in SERVICES:
        secret = volume(r, component, "tls")["secret"]
        assert secret["secretName"] == "memory3-tls"
        assert secret["items"] == [{"key": "cert.pem", "path": "tls.crt"}, {"key": "key.pem", "path": "tls.key"},
                                   {"key": "issuer.pem", "path": "ca.crt"}]
    predictor = r.of_kind("InferenceService")[0]["spec"]["predictor"]
    assert next(v for v in predictor["volumes"] if v["name"] == "tls")["secret"] == {
        "secretName": "memory3-tls", "defaultMode": 0o440, "items": [{"key": "issuer.pem", "path": "ca.crt"}]}


def test_helm_test_pod_checks_the_decoder_over_tls(default):
    pod = default.of_kind("Pod")[0]
    c = pod["spec"]["containers"][0]
    assert "grpc.secure_channel(" in c["args"][0] and f"{TLS_DIR}/ca.crt" in c["args"][0]
    assert c["volumeMounts"] == [{"name": "tls", "mountPath": TLS_DIR, "readOnly": True}]
    assert pod["spec"]["volumes"][0]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


def test_tls_disabled_renders_plaintext_services_probed_on_their_ports():
    r = render({"tls": {"enabled": False}, "kserve": {"enabled": True}})
    assert r.of_kind("Secret") == []
    for component in SERVICES:
        c = container(r, component)
        assert not {"--tls-cert", "--tls-key", "--health-port", "--dependency-tls-ca"} & set(c["args"])
        assert "health" not in [p["name"] for p in c["ports"]]
        assert volume(r, component, "tls") is None and "tls" not in [m["name"] for m in c["volumeMounts"]]
        port = int(flag(c["args"], "--port"))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port
        ingress = r.get("NetworkPolicy", component_name(component))["spec"]["ingress"]
        assert not [p for rule in ingress for p in rule.get("ports", []) if p["port"] == "health"]
    kserve = r.of_kind("InferenceService")[0]["spec"]["predictor"]
    assert "--dependency-tls-ca" not in kserve["containers"][0]["args"]
    assert "tls" not in [v["name"] for v in kserve["volumes"]]
    pod = r.of_kind("Pod")[0]
    assert "grpc.insecure_channel(" in pod["spec"]["containers"][0]["args"][0] and "volumes" not in pod["spec"]


def test_probe_ingress_can_be_limited_to_the_nodes():
    nodes = [{"ipBlock": {"cidr": "10.0.0.0/16"}}]
    r = render({"networkPolicy": {"probeIngressFrom": nodes}})
    for component in SERVICES:
        ingress = r.get("NetworkPolicy", component_name(component))["spec"]["ingress"]
        assert {"ports": [{"port": "health", "protocol": "TCP"}], "from": nodes} in ingress


def test_generated_certificate_names_each_index_shard_of_the_text_service():
    r = render({"text": {"indexShards": 2}})
    cert = x509.load_pem_x509_certificate(base64.b64decode(r.get("Secret", component_name("tls"))["data"]["tls.crt"]))
    dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    for shard in ("text-0", "text-1"):
        assert f"{component_name(shard)}.{NAMESPACE}.svc" in dns


def tls_secret(r: Rendered) -> dict:
    return r.get("Secret", component_name("tls"))


def certificate_names(secret: dict) -> set[str]:
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName))


def service_names(r: Rendered) -> set[str]:
    return {s["metadata"]["name"] for s in r.of_kind("Service") if s["metadata"]["name"] != component_name("tls")}


@pytest.mark.parametrize(("before", "after"), [(3, 1), (1, 3), (2, 4)])
def test_an_upgrade_that_changes_the_index_shards_gets_a_certificate_from_the_kept_ca(tmp_path, before, after):
    """On upgrade, lookup returns the Secret the install made (a stub here: offline, lookup finds nothing)."""
    installed = tls_secret(render({"text": {"indexShards": before}}))
    chart = chart_with_tls_secret(tmp_path, installed)
    upgraded = render({"text": {"indexShards": after}}, chart=chart, upgrade=True)
    secret = tls_secret(upgraded)
    # Every Service the upgrade renders is named, in the certificate and in the annotation recording it.
    needed = {s["metadata"]["name"] for s in upgraded.of_kind("Service")}
    assert needed <= certificate_names(secret)
    assert needed <= set(secret["metadata"]["annotations"]["memory3.io/tls-names"].split(","))
    # Signed by the CA the clients already trust, which is kept with its key.
    assert secret["data"]["ca.crt"] == installed["data"]["ca.crt"]
    assert secret["data"]["ca.key"] == installed["data"]["ca.key"]
    assert secret["data"]["tls.crt"] != installed["data"]["tls.crt"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"])).verify_directly_issued_by(ca)
    assert "signed by the same CA" in upgraded.notes


def test_an_upgrade_that_changes_nothing_keeps_the_certificate(tmp_path):
    installed = tls_secret(render({"text": {"indexShards": 3}}))
    upgraded = render({"text": {"indexShards": 3}}, chart=chart_with_tls_secret(tmp_path, installed), upgrade=True)
    assert tls_secret(upgraded)["data"] == installed["data"]
    assert tls_secret(upgraded)["metadata"]["annotations"] == installed["metadata"]["annotations"]
    assert "TLS:" not in upgraded.notes and "WARNING" not in upgraded.notes


@pytest.mark.parametrize("shards", [1, 3])
def test_a_kept_certificate_without_its_ca_key_is_kept_with_a_warning(tmp_path, shards):
    """A Secret from an older chart: no ca.key to sign with, no record of its names."""
    installed = tls_secret(render({"text": {"indexShards": 3}}))
    old = {**installed, "data": {k: v for k, v in installed["data"].items() if k != "ca.key"},
           "metadata": {**installed["metadata"], "annotations": {"helm.sh/resource-policy": "keep"}}}
    upgraded = render({"text": {"indexShards": shards}}, chart=chart_with_tls_secret(tmp_path, old), upgrade=True)
    assert tls_secret(upgraded)["data"] == old["data"]
    assert "WARNING: the kept certificate" in upgraded.notes and "delete the Secret" in upgraded.notes
