"""Write memory3/values.schema.json from memory3/values.yaml: types and defaults from the values,
descriptions from their `# --` comments, constraints from CONSTRAINTS below.

Run it after changing values.yaml (`python deploy/helm/generate_schema.py`); a unit test fails while
the committed schema differs from what this produces. Objects listed in FREE_MAPS take any keys
(labels, resources, ...); every other object rejects unknown keys, so a typo in a value fails the
install instead of being ignored.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from memory3.model.config import PRESETS

CHART = Path(__file__).resolve().parent / "memory3"
# Keys whose value is a free-form map handed to Kubernetes as is.
FREE_MAPS = {"commonLabels", "commonAnnotations", "annotations", "labels", "nodeSelector", "podAnnotations",
             "affinity", "resources", "requests", "limits", "podSecurityContext", "securityContext"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
COUNT = {"type": "integer", "minimum": 0}
# A Secret's data key: non-empty, what Kubernetes accepts.
SECRET_KEY = {"type": "string", "pattern": "^[-._a-zA-Z0-9]+$"}
# An integer, or a percentage of the pods (PodDisruptionBudget's maxUnavailable).
INT_OR_PERCENT = {"type": ["integer", "string"], "minimum": 0, "pattern": "^[0-9]+%$"}
# `helm --set` leaves a decimal like 0.5 a string: every number also takes a decimal string (the templates
# render either the same way). Ranges (minimum, ...) apply to numbers only; the pattern refuses a string sign.
DECIMAL = "^[0-9]+(\\.[0-9]+)?$"
UNIT_DECIMAL = "^(0(\\.[0-9]+)?|1(\\.0+)?)$"  # a decimal string from 0 to 1
# ...and where a number must be above 0 (`exclusiveMinimum: 0`, which a string escapes), a decimal string that is
# not zero ("0.0" and "00" too): the API server refuses a target of 0.
POSITIVE_DECIMAL = "^([0-9]*[1-9][0-9]*(\\.[0-9]+)?|0+\\.[0-9]*[1-9][0-9]*)$"
POSITIVE_UNIT_DECIMAL = "^(0+\\.[0-9]*[1-9][0-9]*|0*1(\\.0+)?)$"  # above 0, at most 1
# ...and it makes a digit-only value an integer: these strings also take one (the templates render it as text).
STRINGS_SET_AS_INTEGERS = {"release", "s3.bucket", "trainer.job.release", "encoding.release",
                           "encoding.merge.name", "kserve.modelName", "decoder.autoscaling.keda.threshold"}
# ...except image tags, strings only: a values file's unquoted `tag: 1.0` is the number 1 to Helm (the image
# `:1-cpu`), and 1.10 the number 1.1. A number gets an error that says to quote it (or to use --set-string).
QUOTED_STRINGS = {"image.tag", "s3.inChart.image.tag", "redis.inChart.image.tag"}
# A Kubernetes quantity of bytes (8Gi, 512M, 1e9), and Redis's own size units (1gb, 512mb, 100000).
QUANTITY = {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?([eE][0-9]+|[kMGTPE]|[KMGTPE]i)?$"}
REDIS_SIZE = {"type": ["string", "integer"], "minimum": 0, "pattern": "^[0-9]+([kKmMgG][bB]?)?$"}
# A DNS name (a wildcard first label allowed where a certificate takes one).
DNS_LABEL = "[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?"
DNS_NAME = {"type": "string", "pattern": f"^{DNS_LABEL}(\\.{DNS_LABEL})*$"}
CERT_DNS_NAME = {"type": "string", "pattern": f"^(\\*\\.)?{DNS_LABEL}(\\.{DNS_LABEL})*$"}
# A Prometheus Operator duration (15s, 1m30s).
DURATION = {"type": "string",
            "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
            "minLength": 1}
CONSTRAINTS: dict[str, dict] = {
    "server.healthPort": PORT,
    "server.cacheSizeLimit": QUANTITY,
    "s3.inChart.persistence.size": QUANTITY,
    "decoder.shmSize": QUANTITY,
    "trainer.job.shmSize": QUANTITY,
    "redis.inChart.maxmemory": REDIS_SIZE,
    "trainer.job.preset": {"enum": ["", *sorted(PRESETS)]},
    "decoder.autoscaling.scaleDownStabilizationSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
    "decoder.autoscaling.keda.threshold": {"exclusiveMinimum": 0, "pattern": POSITIVE_DECIMAL},
    "decoder.autoscaling.keda.pollingInterval": {"type": "integer", "minimum": 1},
    "decoder.autoscaling.keda.fallbackReplicas": COUNT,
    "decoder.autoscaling.keda.fallbackFailureThreshold": {"type": "integer", "minimum": 1},
    "decoder.autoscaling.keda.cooldownPeriod": COUNT,
    "metrics.serviceMonitor.interval": DURATION,
    "tls.clusterDomain": DNS_NAME,
    "tls.generated.extraDnsNames": {"type": "array", "items": CERT_DNS_NAME},
    "encoding.shards": {"type": "integer", "minimum": 1, "maximum": 100000},
    "encoding.parallelism": {"type": "integer", "minimum": 1},
    "encoding.backoffLimitPerIndex": COUNT,
    "encoding.ttlSecondsAfterFinished": COUNT,
    "trainer.job.backoffLimit": COUNT,
    "trainer.job.ttlSecondsAfterFinished": COUNT,
    "trainer.job.activeDeadlineSeconds": COUNT,
    "encoding.activeDeadlineSeconds": COUNT,
    "encoding.merge.activeDeadlineSeconds": COUNT,
    "kserve.minReplicas": COUNT,
    "kserve.maxReplicas": {"type": "integer", "minimum": 1},
    "s3.accessKeyKey": SECRET_KEY,
    "s3.caBundle.key": SECRET_KEY,
    "kserve.chatTemplateConfigMap.key": SECRET_KEY,
    "s3.region": {"type": "string", "pattern": "^[a-zA-Z0-9_-]+$"},
    "s3.secretKeyKey": SECRET_KEY,
    "redis.urlKey": SECRET_KEY,
    "redis.inChart.passwordKey": SECRET_KEY,
    "auth.internal.tokenKey": SECRET_KEY,
    "auth.decoder.tokenKey": SECRET_KEY,
    **{f"{c}.replicaCount": COUNT for c in ("text", "memory", "decoder")},
    # The startup probe's budget and `--wait-for-release`, which refuses a negative wait.
    **{f"{c}.startupTimeoutSeconds": {"type": "integer", "minimum": 10} for c in ("text", "memory", "decoder")},
    **{f"{c}.pdb.maxUnavailable": INT_OR_PERCENT for c in ("text", "memory", "decoder")},
    **{f"{c}.autoscaling.targetCPUUtilizationPercentage": {"type": "integer", "minimum": 1}
       for c in ("text", "memory")},
    "image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "s3.inChart.image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "redis.inChart.image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "server.logFormat": {"enum": ["text", "json"]},
    "server.grace": {"type": "number", "minimum": 0},
    "server.preStopSleepSeconds": {"type": "integer", "minimum": 0},
    "server.maxConnectionAge": {"type": "number", "minimum": 0},
    "metrics.port": PORT,
    "s3.inChart.port": PORT,
    "redis.inChart.port": PORT,
    "networkPolicy.externalRedisPort": PORT,
    "networkPolicy.externalRedisPorts": {"type": "array", "items": PORT},
    "networkPolicy.externalS3Ports": {"type": "array", "items": PORT},
    "networkPolicy.dnsPorts": {"type": "array", "items": PORT},
    "encoding.merge.waitSeconds": {"type": "number", "minimum": 0},
    "metrics.prometheusRule.backlogPerPod": {"type": "number", "exclusiveMinimum": 0},
    "metrics.prometheusRule.ttftP95Seconds": {"type": "number", "exclusiveMinimum": 0},
    "metrics.prometheusRule.errorRatio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                                          "pattern": POSITIVE_UNIT_DECIMAL},
    "metrics.prometheusRule.memoryWaitP95Seconds": {"type": "number", "exclusiveMinimum": 0},
    "text.port": PORT,
    "memory.port": PORT,
    "decoder.port": PORT,
    "text.maxOverlap": {"type": "number", "minimum": 0, "maximum": 1, "pattern": UNIT_DECIMAL},
    "text.maxConcurrency": {"type": "integer", "minimum": 1},
    "text.indexShards": {"type": "integer", "minimum": 1, "maximum": 64},
    "text.embedderDtype": {"enum": ["auto", "float32", "bfloat16"]},
    "memory.ramCacheMB": {"type": "number", "minimum": 0},
    "memory.redisTTL": {"type": "integer", "minimum": 0},
    "memory.redisTimeoutSeconds": {"type": "number", "minimum": 0.05, "maximum": 60},
    "memory.s3Workers": {"type": "integer", "minimum": 1},
    "decoder.maxBatch": {"type": "integer", "minimum": 1},
    "decoder.maxWaiting": {"type": "integer", "minimum": 0},
    "decoder.retrievalPolicy": {"enum": ["fail", "continue"]},
    "decoder.retrievalLeadTokens": {"type": "integer", "minimum": 0, "maximum": 62},
    "decoder.prefillTokens": {"type": "integer", "minimum": 0},
    "decoder.memoryCacheMB": {"type": "number", "minimum": 0},
    "decoder.dtype": {"enum": ["", "float32", "bfloat16", "float16"]},
    "decoder.imageFlavor": {"enum": ["auto", "cpu", "cuda"]},
    "decoder.autoscaling.targetRequestsWaiting": {"type": "number", "exclusiveMinimum": 0},
    "text.autoscaling.targetRequestsWaiting": {"type": "number", "minimum": 0},
    "decoder.service.type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    "trainer.job.imageFlavor": {"enum": ["auto", "cpu", "cuda"]},
    "encoding.imageFlavor": {"enum": ["auto", "cpu", "cuda"]},
    "trainer.job.codec": {"enum": ["fp16", "bf16", "int8", "vq"]},
    "trainer.job.indexKind": {"enum": ["auto", "flat", "hnsw", "ivfpq"]},
    "kserve.deploymentMode": {"enum": ["Standard", "Knative", "RawDeployment", "Serverless"]},
    "image.digests.cpu": {"type": "string", "pattern": "^(sha256:[0-9a-f]{64})?$"},
    "image.digests.cuda": {"type": "string", "pattern": "^(sha256:[0-9a-f]{64})?$"},
}
_KEY = re.compile(r"^(\s*)([A-Za-z][\w-]*):(\s|$)")


def descriptions(text: str) -> dict[str, str]:
    """Dotted key path -> the `# --` comment (with its continuation lines) written above it."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and comment:
            comment.append(stripped[1:].strip())
            continue
        match = _KEY.match(line)
        if not match:
            if not stripped.startswith("-"):
                comment = []
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if comment:
            found[".".join(k for _, k in stack)] = re.sub(r"^\((\w+)\)\s*", "", " ".join(comment))
        comment = []
    return found


def schema_of(value, path: str, docs: dict[str, str]) -> dict:
    key = path.rsplit(".", 1)[-1]
    node: dict = {}
    if path in docs:
        node["description"] = docs[path]
    if isinstance(value, bool):
        node["type"] = "boolean"
    elif isinstance(value, int):
        node["type"] = "integer"
    elif isinstance(value, float):
        node["type"] = "number"
    elif isinstance(value, str):
        node["type"] = "string"
    elif isinstance(value, list):
        node["type"] = "array"
        if value and all(isinstance(v, str) for v in value):
            node["items"] = {"type": "string"}
    elif isinstance(value, dict):
        node["type"] = "object"
        if key not in FREE_MAPS:
            node["additionalProperties"] = False
            node["properties"] = {k: schema_of(v, f"{path}.{k}" if path else k, docs) for k, v in value.items()}
    node.update(CONSTRAINTS.get(path, {}))
    if "enum" in node:
        node.pop("type", None)
    if node.get("type") == "number":
        node["type"] = ["number", "string"]
        node.setdefault("pattern", POSITIVE_DECIMAL if node.get("exclusiveMinimum") == 0 else DECIMAL)
    if path in STRINGS_SET_AS_INTEGERS:
        node["type"] = ["string", "integer"]
    if path in QUOTED_STRINGS:
        node["type"] = ["string", "number"]  # a number is let through to the message below
        node["if"] = {"type": "number"}
        node["then"] = {"const": f'a string: quote it ({key}: "1.0" in a values file, --set-string {path}=1.0)'}
    node["default"] = value
    return node


def build() -> dict:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    docs = descriptions(text)
    root = schema_of(values, "", docs)
    root.pop("default")
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": "memory3 chart values", **root}


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    (CHART / "values.schema.json").write_text(render())
    print(f"wrote {CHART / 'values.schema.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
