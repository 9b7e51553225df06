{{/* The Service of a gRPC component: the grpc port and the metrics port. Call with (dict "root" $ "component" "text"). */}}
{{- define "memory3.grpcService" -}}
{{- $c := index .root.Values .component -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "memory3.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "memory3.labels" . | nindent 4 }}
  {{- $annotations := merge (dict) (default dict (dig "service" "annotations" (dict) $c)) (default dict .root.Values.commonAnnotations) }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ dig "service" "type" "ClusterIP" $c }}
  selector:
    {{- include "memory3.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $c.port }}
      targetPort: grpc
      protocol: TCP
      {{- /* What a mesh or gateway reads the port as: with TLS it carries TLS, which one that took it for gRPC
      (plaintext HTTP/2, as Istio reads `grpc`) would fail to parse; `tls` has it passed through as is. */}}
      appProtocol: {{ ternary "tls" "grpc" .root.Values.tls.enabled }}
    {{- if not (and (eq .component "decoder") (include "memory3.decoderMetricsService" .root)) }}
    - name: metrics
      port: {{ .root.Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
    {{- end }}
{{- end -}}

{{/* "true" when the decoder's Service is published outside the cluster (decoder.service.type NodePort or
LoadBalancer): its metrics port is then left off it, on a ClusterIP Service of its own (decoder/metrics-service.yaml)
that the ServiceMonitor scrapes. */}}
{{- define "memory3.decoderMetricsService" -}}
{{- if ne (dig "service" "type" "ClusterIP" .Values.decoder) "ClusterIP" -}}true{{- end -}}
{{- end -}}

{{/* The fewest pods a component's Deployment (each, for the text service's index shards) runs: the autoscaler's
minReplicas, or replicaCount without autoscaling. Call with (dict "root" $ "component" "text"). */}}
{{- define "memory3.minPods" -}}
{{- $c := index .root.Values .component -}}
{{- ternary $c.autoscaling.minReplicas $c.replicaCount $c.autoscaling.enabled | int -}}
{{- end -}}

{{/* "true" when a component gets a PodDisruptionBudget: its pdb is enabled and it runs at least 2 pods. With one
pod a budget either lets a drain evict it (maxUnavailable 1) or blocks the drain for good (0), so none is made. */}}
{{- define "memory3.pdbEnabled" -}}
{{- $c := index .root.Values .component -}}
{{- if and $c.pdb.enabled (ge (int (include "memory3.minPods" .)) 2) -}}true{{- end -}}
{{- end -}}

{{/* A PodDisruptionBudget for a component when memory3.pdbEnabled. */}}
{{- define "memory3.pdb" -}}
{{- $c := index .root.Values .component -}}
{{- if include "memory3.pdbEnabled" . }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "memory3.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "memory3.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ $c.pdb.maxUnavailable }}
  # A pod that is not ready serves nothing: a drain may evict it whatever the budget. With the default
  # (IfHealthyBudget), pods not ready together (text or memory down, or a decoder in its startup probe) would hold
  # every node drain until they are ready again.
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "memory3.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/* An autoscaling/v2 HPA on CPU utilization (text and memory), and on queued retrievals (text, optional). */}}
{{- define "memory3.cpuHPA" -}}
{{- $c := index .root.Values .component -}}
{{- if $c.autoscaling.enabled }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "memory3.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "memory3.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "memory3.componentName" . }}
  minReplicas: {{ $c.autoscaling.minReplicas }}
  maxReplicas: {{ $c.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $c.autoscaling.targetCPUUtilizationPercentage }}
    {{- $queue := dig "targetRequestsWaiting" 0 $c.autoscaling }}
    {{- if gt (float64 $queue) 0.0 }}
    # Queued retrieval requests per pod, as prometheus-adapter serves them from the pods' /metrics
    # (a rule exposing memory3_retrieval_requests_waiting as a Pods metric: see docs/deployment.md).
    - type: Pods
      pods:
        metric:
          name: memory3_retrieval_requests_waiting
        target:
          type: AverageValue
          averageValue: {{ $queue | quote }}
    {{- end }}
{{- end }}
{{- end -}}
