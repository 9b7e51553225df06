{{/* The chart name, or nameOverride. */}}
{{- define "memory3.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The resource name prefix, truncated to leave room for component suffixes (DNS labels are 63 characters). */}}
{{- define "memory3.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's resources: `<fullname>-<component>`, or `<fullname>-<component>-<shard>` for
one shard of the text service's index. Call with (dict "root" $ "component" "text"), plus "shard" "0" for a shard. */}}
{{- define "memory3.componentName" -}}
{{- $name := printf "%s-%s" (include "memory3.fullname" .root) .component | trunc 60 | trimSuffix "-" -}}
{{- if hasKey . "shard" }}{{ printf "%s-%s" $name .shard }}{{ else }}{{ $name }}{{ end -}}
{{- end -}}

{{/* The contexts of the text service's Deployments (and their Service, HPA, PDB), as YAML: one without a shard,
or one per index shard when text.indexShards > 1. Read with `fromYamlArray`, then `set` "root". */}}
{{- define "memory3.textShards" -}}
{{- $n := int .Values.text.indexShards -}}
{{- if le $n 1 }}
- component: text
{{- else }}
{{- range $i := until $n }}
- {component: text, shard: {{ $i | toString | quote }}, shards: {{ $n }}}
{{- end }}
{{- end }}
{{- end -}}

{{/* The decoder's --text-address: the text Service's host:port, or every index shard's, comma-separated. */}}
{{- define "memory3.textAddress" -}}
{{- $addresses := list -}}
{{- range $ctx := include "memory3.textShards" . | fromYamlArray -}}
{{- $addresses = append $addresses (printf "%s:%d" (include "memory3.componentName" (set $ctx "root" $)) (int $.Values.text.port)) -}}
{{- end -}}
{{- join "," $addresses -}}
{{- end -}}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "memory3.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource. Call with (dict "root" $ "component" "text"). */}}
{{- define "memory3.labels" -}}
helm.sh/chart: {{ include "memory3.chart" .root }}
{{ include "memory3.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: memory3
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component (stable across upgrades), and of its index shard if it has one. Call with
(dict "root" $ "component" "text"). */}}
{{- define "memory3.selectorLabels" -}}
app.kubernetes.io/name: {{ include "memory3.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if hasKey . "shard" }}
memory3.io/index-shard: {{ .shard | quote }}
{{- end }}
{{- end -}}

{{/* The ServiceAccount the pods run as. */}}
{{- define "memory3.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "memory3.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A memory3 image reference for a flavor (cpu or cuda): registry/repository:tag-flavor, or @digest. */}}
{{- define "memory3.image" -}}
{{- $image := .root.Values.image -}}
{{- $digest := get $image.digests .flavor -}}
{{- $base := printf "%s/%s" $image.registry $image.repository -}}
{{- if $digest -}}
{{- printf "%s@%s" $base $digest -}}
{{- else -}}
{{- printf "%s:%s-%s" $base (default .root.Chart.AppVersion $image.tag) .flavor -}}
{{- end -}}
{{- end -}}

{{/* A third-party image reference from {registry, repository, tag, digest}. */}}
{{- define "memory3.externalImage" -}}
{{- if .digest -}}
{{- printf "%s/%s@%s" .registry .repository .digest -}}
{{- else -}}
{{- printf "%s/%s:%s" .registry .repository .tag -}}
{{- end -}}
{{- end -}}

{{/* The decoder's image flavor: cuda when it runs on a GPU, unless imageFlavor says otherwise. */}}
{{- define "memory3.decoderFlavor" -}}
{{- if eq .Values.decoder.imageFlavor "auto" -}}
{{- ternary "cuda" "cpu" .Values.decoder.gpu.enabled -}}
{{- else -}}
{{- .Values.decoder.imageFlavor -}}
{{- end -}}
{{- end -}}

{{/* The decoder's weights dtype: the value, else bfloat16 on GPU and float32 on CPU. */}}
{{- define "memory3.decoderDtype" -}}
{{- default (ternary "bfloat16" "float32" .Values.decoder.gpu.enabled) .Values.decoder.dtype -}}
{{- end -}}

{{/* host:port of the object store: the in-chart one's Service, or the external endpoint. */}}
{{- define "memory3.s3Endpoint" -}}
{{- if .Values.s3.inChart.enabled -}}
{{- printf "%s:%d" (include "memory3.componentName" (dict "root" . "component" "s3")) (int .Values.s3.inChart.port) -}}
{{- else -}}
{{- .Values.s3.endpoint -}}
{{- end -}}
{{- end -}}

{{/* The port of the object store (for NetworkPolicy egress rules). */}}
{{- define "memory3.s3Port" -}}
{{- if .Values.s3.inChart.enabled -}}
{{- .Values.s3.inChart.port -}}
{{- else -}}
{{- $parts := splitList ":" .Values.s3.endpoint -}}
{{- if gt (len $parts) 1 -}}{{- last $parts -}}{{- else -}}{{- ternary 443 80 .Values.s3.secure -}}{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the object store's credentials. */}}
{{- define "memory3.s3SecretName" -}}
{{- if .Values.s3.existingSecret -}}
{{- .Values.s3.existingSecret -}}
{{- else -}}
{{- include "memory3.componentName" (dict "root" . "component" "s3") -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the in-chart Redis password. */}}
{{- define "memory3.redisSecretName" -}}
{{- if .Values.redis.inChart.existingSecret -}}
{{- .Values.redis.inChart.existingSecret -}}
{{- else -}}
{{- include "memory3.componentName" (dict "root" . "component" "redis") -}}
{{- end -}}
{{- end -}}

{{/* Whether the memory service has a Redis tier ("true" or ""). */}}
{{- define "memory3.redisEnabled" -}}
{{- if or .Values.redis.inChart.enabled .Values.redis.url .Values.redis.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* The ports of an external Redis, for egress rules (comma-separated): each host's in the URL (a
Sentinel URL's data nodes answer on networkPolicy.externalRedisPort), or externalRedisPort when the URL
is in a Secret; with networkPolicy.externalRedisPorts added. */}}
{{- define "memory3.redisPorts" -}}
{{- $ports := list -}}
{{- $url := .Values.redis.url -}}
{{- if $url -}}
{{- $sentinel := regexMatch "^rediss?\\+sentinel://" $url -}}
{{- $hosts := regexReplaceAll "^[a-z+]+://([^/?]*).*$" $url "${1}" -}}
{{- range splitList "," $hosts -}}
{{- $parts := splitList ":" . -}}
{{- $ports = append $ports (ternary (last $parts) (ternary "26379" "6379" $sentinel) (gt (len $parts) 1)) -}}
{{- end -}}
{{- if $sentinel -}}
{{- $ports = append $ports (toString $.Values.networkPolicy.externalRedisPort) -}}
{{- end -}}
{{- else -}}
{{- $ports = append $ports (toString .Values.networkPolicy.externalRedisPort) -}}
{{- end -}}
{{- range .Values.networkPolicy.externalRedisPorts -}}
{{- $ports = append $ports (toString .) -}}
{{- end -}}
{{- join "," (uniq $ports) -}}
{{- end -}}

{{/* Environment of every memory3 container: object-store credentials from a Secret (never inlined). */}}
{{- define "memory3.s3Env" -}}
- name: MEMORY3_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "memory3.s3SecretName" . }}
      key: {{ .Values.s3.accessKeyKey }}
- name: MEMORY3_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "memory3.s3SecretName" . }}
      key: {{ .Values.s3.secretKeyKey }}
- name: HOME
  value: /tmp
- name: HF_HUB_OFFLINE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{/* The object-store flags of every memory3 command. */}}
{{- define "memory3.s3Args" -}}
- --s3-endpoint
- {{ include "memory3.s3Endpoint" . | quote }}
- --s3-bucket
- {{ .Values.s3.bucket | quote }}
{{- if .Values.s3.secure }}
- --s3-secure
{{- end }}
- --cache-dir
- /var/cache/memory3/releases
{{- end -}}

{{/* The flags every `memory3 serve` takes in a pod. Call with (dict "root" $ "service" "text" "port" 50052). */}}
{{- define "memory3.serveArgs" -}}
- serve
- {{ .service }}
- --release
- {{ .root.Values.release | quote }}
- --host
- {{ .root.Values.server.host | quote }}
- --port
- {{ .port | quote }}
- --metrics-port
- {{ .root.Values.metrics.port | quote }}
- --grace
- {{ .root.Values.server.grace | quote }}
- --log-format
- {{ .root.Values.server.logFormat }}
{{- include "memory3.tlsServerArgs" .root }}
{{ include "memory3.s3Args" .root }}
{{- end -}}

{{/* The Secret holding the services' certificate, its key and the CA: tls.existingSecret or the generated one. */}}
{{- define "memory3.tlsSecretName" -}}
{{- if .Values.tls.existingSecret -}}
{{- .Values.tls.existingSecret -}}
{{- else -}}
{{- include "memory3.componentName" (dict "root" . "component" "tls") -}}
{{- end -}}
{{- end -}}

{{/* Where the TLS files are mounted in the pods (always as tls.crt, tls.key and ca.crt, whatever the Secret's keys). */}}
{{- define "memory3.tlsDir" -}}/etc/memory3/tls{{- end -}}

{{/* The port the kubelet probes: the plaintext health-only port with TLS, else the service port.
Call with (dict "root" $ "port" 50052). */}}
{{- define "memory3.probePort" -}}
{{- if .root.Values.tls.enabled -}}{{- .root.Values.server.healthPort -}}{{- else -}}{{- .port -}}{{- end -}}
{{- end -}}

{{/* Server flags with TLS: the certificate and key, and the plaintext health-only port for the probes. */}}
{{- define "memory3.tlsServerArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-cert
- {{ printf "%s/tls.crt" (include "memory3.tlsDir" .) }}
- --tls-key
- {{ printf "%s/tls.key" (include "memory3.tlsDir" .) }}
- --health-port
- {{ .Values.server.healthPort | quote }}
{{- end }}
{{- end -}}

{{/* Client flags of the decoder (and the KServe predictor) with TLS: the CA of the text and memory services,
and with tls.clientAuth the certificate they present. This and the TLS volume helpers render nothing
without TLS: include them with `with`. */}}
{{- define "memory3.tlsDependencyArgs" -}}
{{- if .Values.tls.enabled -}}
- --dependency-tls-ca
- {{ printf "%s/ca.crt" (include "memory3.tlsDir" .) }}
{{- if .Values.tls.clientAuth }}
- --dependency-cert
- {{ printf "%s/tls.crt" (include "memory3.tlsDir" .) }}
- --dependency-key
- {{ printf "%s/tls.key" (include "memory3.tlsDir" .) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Server flags of text and memory with tls.clientAuth: only clients the CA signed. */}}
{{- define "memory3.tlsInternalServerArgs" -}}
{{- if and .Values.tls.enabled .Values.tls.clientAuth -}}
- --tls-client-ca
- {{ printf "%s/ca.crt" (include "memory3.tlsDir" .) }}
{{- end }}
{{- end -}}

{{/* "true" when text and memory require the internal token: auth.internal.enabled, over TLS (a token is
never sent in plaintext). */}}
{{- define "memory3.internalAuth" -}}
{{- if and .Values.tls.enabled .Values.auth.internal.enabled -}}true{{- end -}}
{{- end -}}

{{/* The Secret holding the internal token: auth.internal.existingSecret or the generated one. */}}
{{- define "memory3.internalTokenSecretName" -}}
{{- if .Values.auth.internal.existingSecret -}}
{{- .Values.auth.internal.existingSecret -}}
{{- else -}}
{{- include "memory3.componentName" (dict "root" . "component" "auth") -}}
{{- end -}}
{{- end -}}

{{/* Token environment of a pod. Call with (dict "root" $ "component" "text"): text and memory require the
internal token, the decoder and the KServe predictor send it, and the decoder requires the clients' token. */}}
{{- define "memory3.authEnv" -}}
{{- $a := .root.Values.auth -}}
{{- $internal := dict "name" (include "memory3.internalTokenSecretName" .root) "key" $a.internal.tokenKey -}}
{{- if and (include "memory3.internalAuth" .root) (has .component (list "text" "memory")) }}
- name: MEMORY3_AUTH_TOKEN
  valueFrom:
    secretKeyRef: {{ toJson $internal }}
{{- end }}
{{- if and (include "memory3.internalAuth" .root) (has .component (list "decoder" "kserve")) }}
- name: MEMORY3_DEPENDENCY_TOKEN
  valueFrom:
    secretKeyRef: {{ toJson $internal }}
{{- end }}
{{- if and $a.decoder.enabled (eq .component "decoder") }}
- name: MEMORY3_AUTH_TOKEN
  valueFrom:
    secretKeyRef: {{ toJson (dict "name" $a.decoder.existingSecret "key" $a.decoder.tokenKey) }}
{{- end }}
{{- end -}}

{{/* The TLS Secret as a read-only volume. Call with (dict "root" $ "serverKey" true); without serverKey only the
CA is mounted (clients). */}}
{{- define "memory3.tlsVolume" -}}
{{- $t := .root.Values.tls -}}
{{- $external := $t.existingSecret -}}
{{- if $t.enabled -}}
- name: tls
  secret:
    secretName: {{ include "memory3.tlsSecretName" .root }}
    defaultMode: 0440
    items:
      {{- if .serverKey }}
      - key: {{ ternary $t.certKey "tls.crt" (not (empty $external)) }}
        path: tls.crt
      - key: {{ ternary $t.keyKey "tls.key" (not (empty $external)) }}
        path: tls.key
      {{- end }}
      - key: {{ ternary $t.caKey "ca.crt" (not (empty $external)) }}
        path: ca.crt
{{- end }}
{{- end -}}

{{/* Mount of memory3.tlsVolume. */}}
{{- define "memory3.tlsMount" -}}
{{- if .Values.tls.enabled -}}
- name: tls
  mountPath: {{ include "memory3.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Container ports of a gRPC service: grpc (TLS when tls.enabled), the plaintext health port with TLS, metrics.
Call with (dict "root" $ "port" 50052). */}}
{{- define "memory3.servicePorts" -}}
- name: grpc
  containerPort: {{ .port }}
  protocol: TCP
{{- if .root.Values.tls.enabled }}
- name: health
  containerPort: {{ .root.Values.server.healthPort }}
  protocol: TCP
{{- end }}
- name: metrics
  containerPort: {{ .root.Values.metrics.port }}
  protocol: TCP
{{- end -}}

{{/* Native gRPC probes: startup and readiness on the overall health, liveness on the `liveness` name (SERVING
while the process runs, so a lost dependency takes a pod out of rotation without restarting it). With TLS they
ask the plaintext health-only port (`--health-port`): the kubelet's grpc probes cannot speak TLS. */}}
{{- define "memory3.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: {{ max 1 (div .startupTimeoutSeconds 10) }}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ .port }}
    service: liveness
  periodSeconds: 15
  timeoutSeconds: 5
  failureThreshold: 4
{{- end -}}

{{/* preStop sleep (endpoints stop routing before SIGTERM starts the drain). */}}
{{- define "memory3.lifecycle" -}}
{{- if gt (int .Values.server.preStopSleepSeconds) 0 }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ .Values.server.preStopSleepSeconds }}
{{- end }}
{{- end -}}

{{/* The pod's grace period: the drain, the preStop sleep and a margin. */}}
{{- define "memory3.terminationGracePeriod" -}}
{{- add (int .Values.server.grace) (int .Values.server.preStopSleepSeconds) 10 -}}
{{- end -}}

{{/* Writable volumes for a read-only root filesystem: the release cache and /tmp (HOME). */}}
{{- define "memory3.cacheVolumes" -}}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.server.cacheSizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- end -}}

{{/* Mounts of memory3.cacheVolumes. */}}
{{- define "memory3.cacheMounts" -}}
- name: cache
  mountPath: /var/cache/memory3
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Pod-level settings shared by every memory3 pod. */}}
{{- define "memory3.podSpecCommon" -}}
serviceAccountName: {{ include "memory3.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{/* A 10-character hash of the release name, so Job names stay unique and short. */}}
{{- define "memory3.releaseHash" -}}
{{- . | sha256sum | trunc 10 -}}
{{- end -}}
