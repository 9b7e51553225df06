{{/* A NetworkPolicy peer: this release's pods of the given components. Call with (dict "root" $ "components" (list ...)). */}}
{{- define "memory3.podPeer" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/name: {{ include "memory3.name" .root }}
      app.kubernetes.io/instance: {{ .root.Release.Name }}
    matchExpressions:
      - key: app.kubernetes.io/component
        operator: In
        values: {{ toJson .components }}
{{- end -}}

{{/* Egress to cluster DNS, on networkPolicy.dnsPorts: the ports of the DNS pods, which a NetworkPolicy matches
after the DNS Service has mapped its port 53 to them (OpenShift's: 5353). */}}
{{- define "memory3.egressDNS" -}}
- ports:
    {{- range $port := .Values.networkPolicy.dnsPorts | default (list 53) | uniq }}
    - port: {{ int $port }}
      protocol: UDP
    - port: {{ int $port }}
      protocol: TCP
    {{- end }}
{{- end -}}

{{/* Egress to the object store: the in-chart store's pods, or the external endpoint's port and
networkPolicy.externalS3Ports (optionally limited to peers). */}}
{{- define "memory3.egressS3" -}}
{{- if .Values.s3.inChart.enabled }}
- to:
    {{- include "memory3.podPeer" (dict "root" . "components" (list "s3")) | nindent 4 }}
  ports:
    - port: {{ int .Values.s3.inChart.port }}
      protocol: TCP
{{- else }}
{{- $ports := list (include "memory3.s3Port" . | int) }}
{{- range .Values.networkPolicy.externalS3Ports }}
{{- $ports = append $ports (int .) }}
{{- end }}
- ports:
    {{- range uniq $ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .Values.networkPolicy.externalS3To }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Ingress to /metrics from the configured scrapers (any when none are listed). */}}
{{- define "memory3.ingressMetrics" -}}
- ports:
    - port: metrics
      protocol: TCP
  {{- with .Values.networkPolicy.metricsIngressFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Metadata of a NetworkPolicy for a component. */}}
{{- define "memory3.networkPolicyMeta" -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "memory3.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "memory3.labels" . | nindent 4 }}
{{- end -}}

{{/* With TLS: ingress to the plaintext health-only port from the kubelet (it probes from the node, so any source
unless networkPolicy.probeIngressFrom lists peers). Renders nothing without TLS: include it with `with`. */}}
{{- define "memory3.ingressProbes" -}}
{{- if .Values.tls.enabled -}}
- ports:
    - port: health
      protocol: TCP
  {{- with .Values.networkPolicy.probeIngressFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}
