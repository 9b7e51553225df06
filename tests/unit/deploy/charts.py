"""Render the chart offline (helm-python-sdk: Helm's Go SDK through ctypes) and look up rendered objects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy" / "helm" / "memory3"
RELEASE_NAME = "m3"
NAMESPACE = "ai"
# The smallest values an install needs: a release and an external S3 store with its credentials Secret.
REQUIRED = {"release": "small-v1", "s3": {"endpoint": "s3.storage.svc:9000", "existingSecret": "memory3-s3"}}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class Rendered:
    objects: list[dict]
    notes: str

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        names = [o["metadata"]["name"] for o in self.of_kind(kind)]
        assert len(found) == 1, f"expected one {kind} {name!r}, found {names}"
        return found[0]

    def find(self, kind: str, name: str) -> dict | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)

    def workloads(self) -> list[dict]:
        """Deployments and Jobs (objects with a pod template)."""
        return [o for o in self.objects if o["kind"] in ("Deployment", "Job")]


def render(values: dict | None = None, *, required: bool = True, name: str = RELEASE_NAME, chart: Path = CHART,
           upgrade: bool = False) -> Rendered:
    import helm_python as helm

    merged = merge(REQUIRED, values or {}) if required else (values or {})
    with helm.Chart.load(chart) as loaded:
        kind = {"is_upgrade": True, "is_install": False} if upgrade else {}
        manifests = loaded.render(merged, name=name, namespace=NAMESPACE, **kind)
    objects, notes = [], ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        if path.endswith(".tpl") or not text.strip():
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(objects, notes)


def component_name(component: str) -> str:
    return f"{RELEASE_NAME}-memory3-{component}"


def labels_match(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions with In/NotIn/Exists) against labels."""
    match_labels = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        op = expr["operator"]
        if (op == "In" and value not in expr["values"]) or (op == "NotIn" and value in expr["values"]) \
                or (op == "Exists" and value is None) or (op == "DoesNotExist" and value is not None):
            return False
    return True


# The one `lookup` of the TLS Secret in the chart, which a stub replaces (offline, lookup finds nothing).
TLS_LOOKUP = '(lookup "v1" "Secret" .Release.Namespace (include "memory3.tlsSecretName" .))'


def chart_with_tls_secret(directory: Path, secret: dict | None) -> Path:
    """A copy of the chart in `directory` whose lookup of the TLS Secret returns `secret` (as the cluster would)."""
    import shutil

    copy = directory / "memory3"
    shutil.copytree(CHART, copy)
    helpers = copy / "templates" / "_helpers.tpl"
    text = helpers.read_text()
    assert text.count(TLS_LOOKUP) == 1, "the chart's TLS Secret lookup moved: update TLS_LOOKUP"
    helpers.write_text(text.replace(TLS_LOOKUP, '(.Files.Get "lookup-stub.yaml" | fromYaml)'))
    (copy / "lookup-stub.yaml").write_text(yaml.safe_dump(secret or {}))
    return copy
