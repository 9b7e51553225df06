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

{{/* A value that is text, as text: `helm --set` makes a digit-only string an integer, and a values file a
float (20250601 would print as 2.0250601e+07). Decimal flags (seconds, MiB) go through it too: a whole number
prints as one, any other as Go prints it, which Python's float() reads. */}}
{{- define "memory3.string" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}{{ int64 . }}{{- else -}}{{ toString . }}{{- end -}}
{{- end -}}

{{/* An integer flag, as text: a values file makes every number a float, which prints from 1e6 on in scientific
notation (2592000 as 2.592e+06), and the CLI refuses that where it wants an integer. */}}
{{- define "memory3.int" -}}{{ int64 . }}{{- end -}}

{{/* The release every service serves, as text. */}}
{{- define "memory3.release" -}}{{ include "memory3.string" .Values.release }}{{- end -}}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "memory3.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource. Call with (dict "root" $ "component" "text"). */}}
{{/* commonLabels are merged in once each: they may replace part-of, never a selector label (the selectors of
Deployments and Services would no longer match their pods) nor the chart's own bookkeeping labels. */}}
{{- define "memory3.labels" -}}
{{- $labels := include "memory3.selectorLabels" . | fromYaml -}}
{{- $own := dict "helm.sh/chart" (include "memory3.chart" .root) "app.kubernetes.io/version" (toString .root.Chart.AppVersion)
  "app.kubernetes.io/managed-by" .root.Release.Service -}}
{{- $common := omit (default dict .root.Values.commonLabels) "memory3.io/index-shard" -}}
{{- $_ := set $labels "app.kubernetes.io/part-of" "memory3" -}}
{{- range $key, $value := $common -}}
{{- $_ := set $labels $key (toString $value) -}}
{{- end -}}
{{- $labels = merge (include "memory3.selectorLabels" . | fromYaml) $own $labels -}}
{{- range $key, $value := $labels }}{{ $_ := set $labels $key (toString $value) }}{{ end -}}
{{- toYaml $labels -}}
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
{{- $digest := get (default dict $image.digests) .flavor -}}
{{- $base := printf "%s/%s" $image.registry $image.repository -}}
{{- if $digest -}}
{{- printf "%s@%s" $base $digest -}}
{{- else -}}
{{- printf "%s:%s-%s" $base (include "memory3.string" (default .root.Chart.AppVersion $image.tag)) .flavor -}}
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

{{/* The image flavor of a component that may run on a GPU (the decoder, the trainer Job, the encoding Job): cuda
when its gpu.enabled, unless its imageFlavor says otherwise. Call with its values: .Values.decoder,
.Values.trainer.job or .Values.encoding. */}}
{{- define "memory3.imageFlavor" -}}
{{- if eq .imageFlavor "auto" -}}
{{- ternary "cuda" "cpu" .gpu.enabled -}}
{{- else -}}
{{- .imageFlavor -}}
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
{{- include "memory3.hostPort" (dict "address" .Values.s3.endpoint "default" (ternary 443 80 .Values.s3.secure)) -}}
{{- end -}}
{{- end -}}

{{/* The port of a host[:port] address, or "default" when it has none. An IPv6 literal is bracketed: [fd00::1]:9000
or [fd00::1]. Call with (dict "address" "host:port" "default" 443). */}}
{{- define "memory3.hostPort" -}}
{{- $address := toString .address -}}
{{- if hasPrefix "[" $address -}}
{{- $port := regexReplaceAll "^\\[[^]]*\\]:?" $address "" -}}
{{- default (toString .default) $port -}}
{{- else if contains ":" $address -}}
{{- last (splitList ":" $address) -}}
{{- else -}}
{{- .default -}}
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
{{- $host := regexReplaceAll "^.*@" . "" -}}
{{- $ports = append $ports (include "memory3.hostPort" (dict "address" $host "default" (ternary "26379" "6379" $sentinel))) -}}
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
- {{ include "memory3.string" .Values.s3.bucket | quote }}
{{- if .Values.s3.secure }}
- --s3-secure
{{- end }}
- --s3-region
- {{ .Values.s3.region | quote }}
{{- with .Values.s3.caBundle.secretName }}
- --s3-ca-bundle
- {{ printf "%s/%s" (include "memory3.s3CaDir" $) (include "memory3.s3CaFile" $) | quote }}
{{- end }}
- --cache-dir
- /var/cache/memory3/releases
{{- end -}}

{{/* Where the S3 CA bundle (s3.caBundle) is mounted, and its file's name there. */}}
{{- define "memory3.s3CaDir" -}}/etc/memory3/s3-ca{{- end -}}
{{- define "memory3.s3CaFile" -}}ca.pem{{- end -}}

{{/* The flags every `memory3 serve` takes in a pod. Call with (dict "root" $ "service" "text" "port" 50052 "startup"
600): a release not published yet (a trainer Job of the same install publishes it) is waited for as long as the
startup probe allows. */}}
{{- define "memory3.serveArgs" -}}
- serve
- {{ .service }}
- --release
- {{ include "memory3.release" .root | quote }}
- --host
- {{ .root.Values.server.host | quote }}
- --port
- {{ include "memory3.int" .port | quote }}
- --metrics-port
- {{ include "memory3.int" .root.Values.metrics.port | quote }}
- --grace
- {{ include "memory3.string" .root.Values.server.grace | quote }}
- --max-connection-age
- {{ include "memory3.string" .root.Values.server.maxConnectionAge | quote }}
- --wait-for-release
- {{ include "memory3.int" .startup | quote }}
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
- {{ include "memory3.int" .Values.server.healthPort | quote }}
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

{{/* Seconds the decoder (and the KServe predictor) may take to start, for its startup probe and
`--wait-for-release`: its own, and a minute more than text's and memory's (it is ready only once they are, and
on an install their pods start with it). */}}
{{- define "memory3.decoderStartup" -}}
{{- $v := .Values -}}
{{- max (int $v.decoder.startupTimeoutSeconds) (add 60 (int $v.text.startupTimeoutSeconds)) (add 60 (int $v.memory.startupTimeoutSeconds)) -}}
{{- end -}}

{{/* Native gRPC probes: startup and readiness on the overall health, liveness on the `liveness` name (SERVING
while the process runs, so a lost dependency takes a pod out of rotation without restarting it; a decoder whose
engine cannot serve again, after a device fault or a stuck model pass, turns it NOT_SERVING to be restarted). With TLS they
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

{{/* preStop sleep (endpoints stop routing before SIGTERM starts the drain): the `sleep` action on Kubernetes 1.30+,
before it (where the action is missing or alpha) an exec of the image's `sleep`. */}}
{{- define "memory3.lifecycle" -}}
{{- $seconds := int .Values.server.preStopSleepSeconds -}}
{{- if gt $seconds 0 }}
lifecycle:
  preStop:
    {{- if semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version }}
    sleep:
      seconds: {{ $seconds }}
    {{- else }}
    exec:
      command: ["sleep", {{ $seconds | toString | quote }}]
    {{- end }}
{{- end }}
{{- end -}}

{{/* The pod's grace period: the drain, the preStop sleep and a margin. */}}
{{- define "memory3.terminationGracePeriod" -}}
{{- add (int (ceil (float64 .Values.server.grace))) (int .Values.server.preStopSleepSeconds) 10 -}}
{{- end -}}

{{/* The volumes of every pod that reads the store: for a read-only root filesystem, the release cache and /tmp
(HOME), writable; and the store's CA bundle (s3.caBundle), when set. */}}
{{- define "memory3.cacheVolumes" -}}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.server.cacheSizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- with .Values.s3.caBundle.secretName }}
- name: s3-ca
  secret:
    secretName: {{ . }}
    defaultMode: 0444
    items:
      - key: {{ $.Values.s3.caBundle.key }}
        path: {{ include "memory3.s3CaFile" $ }}
{{- end }}
{{- end -}}

{{/* Mounts of memory3.cacheVolumes. */}}
{{- define "memory3.cacheMounts" -}}
- name: cache
  mountPath: /var/cache/memory3
- name: tmp
  mountPath: /tmp
{{- if .Values.s3.caBundle.secretName }}
- name: s3-ca
  mountPath: {{ include "memory3.s3CaDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* imagePullSecrets of a pod (every pod of the chart: the memory3 image and the in-chart stores' mirrors), as a
pod spec field preceded by a newline; nothing when none are set. */}}
{{- define "memory3.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by every memory3 pod. */}}
{{- define "memory3.podSpecCommon" -}}
serviceAccountName: {{ include "memory3.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
{{- include "memory3.imagePullSecrets" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}


{{/* The generated TLS Secret as the cluster has it (empty without a cluster or before the install), as YAML. */}}
{{- define "memory3.tlsExistingSecret" -}}
{{- toYaml (lookup "v1" "Secret" .Release.Namespace (include "memory3.tlsSecretName" .)) -}}
{{- end -}}

{{/* The DNS names the generated certificate needs now: localhost, and the 4 forms of every text (or text index
shard), memory and decoder Service's name, with tls.generated.extraDnsNames; a YAML list. */}}
{{- define "memory3.tlsNames" -}}
{{- $t := .Values.tls -}}
{{- $names := list "localhost" -}}
{{- $contexts := concat (include "memory3.textShards" . | fromYamlArray) (list (dict "component" "memory") (dict "component" "decoder")) -}}
{{- range $ctx := $contexts -}}
{{- $service := include "memory3.componentName" (set $ctx "root" $) -}}
{{- $ns := $.Release.Namespace -}}
{{- $names = concat $names (list $service (printf "%s.%s" $service $ns) (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.%s" $service $ns $t.clusterDomain)) -}}
{{- end -}}
{{- toYaml (concat $names (default list $t.generated.extraDnsNames) | uniq) -}}
{{- end -}}

{{/* What the generated TLS Secret does on this render. Call with (dict "root" $ "existing" <the Secret or empty>):
new: none in the cluster (or it lacks a key): a new CA and certificate;
keep: the kept certificate names every Service the chart renders now (its memory3.io/tls-names annotation);
reissue: it does not, or its names are unknown, and the Secret holds its CA's key: a new certificate from that CA;
stale: it does not, or its names are unknown, and without the CA key (a Secret from an older chart): kept as is. */}}
{{- define "memory3.tlsCertStatus" -}}
{{- $data := default dict (dig "data" dict .existing) -}}
{{- if not (and (hasKey $data "tls.crt") (hasKey $data "tls.key") (hasKey $data "ca.crt")) -}}
new
{{- else -}}
{{- $recorded := dig "metadata" "annotations" "memory3.io/tls-names" "" .existing -}}
{{- $covered := true -}}
{{- if not $recorded -}}
{{- $covered = false -}}
{{- else -}}
{{- $have := splitList "," $recorded -}}
{{- range $needed := include "memory3.tlsNames" .root | fromYamlArray -}}
{{- if not (has $needed $have) }}{{ $covered = false }}{{ end -}}
{{- end -}}
{{- end -}}
{{- if $covered -}}keep{{- else if hasKey $data "ca.key" -}}reissue{{- else -}}stale{{- end -}}
{{- end -}}
{{- end -}}

{{/* Where the pods of a component that may run on a GPU go: with its gpu.enabled, the GPU's runtime class,
and its node selector and tolerations added to the component's nodeSelector and tolerations; and the
component's affinity. Call with its values: .Values.decoder (the Deployment and the KServe predictor),
.Values.trainer.job or .Values.encoding. A null list or map, or one the component lacks, counts as empty. */}}
{{- define "memory3.gpuPlacement" -}}
{{- $gpu := .gpu -}}
{{- $nodeSelector := default dict .nodeSelector -}}
{{- $tolerations := default list .tolerations -}}
{{- if $gpu.enabled -}}
{{- $nodeSelector = merge (dict) (default dict $gpu.nodeSelector) $nodeSelector -}}
{{- $tolerations = concat $tolerations (default list $gpu.tolerations) -}}
{{- end -}}
{{- if and $gpu.enabled $gpu.runtimeClassName }}
runtimeClassName: {{ $gpu.runtimeClassName }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A container's resources with, when the GPU is enabled, its limit added (gpu.resourceName: gpu.count, 1 where
the component has no count). Call with (dict "resources" .Values.decoder.resources "gpu" .Values.decoder.gpu). */}}
{{- define "memory3.gpuResources" -}}
{{- $resources := deepCopy (default (dict) .resources) -}}
{{- if .gpu.enabled -}}
{{- $limits := default (dict) $resources.limits -}}
{{- $_ := set $limits .gpu.resourceName (dig "count" 1 .gpu) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/* Where the KServe predictor mounts the chat template of `kserve.chatTemplateConfigMap`. */}}
{{- define "memory3.chatTemplateDir" -}}/etc/memory3/chat-template{{- end -}}
