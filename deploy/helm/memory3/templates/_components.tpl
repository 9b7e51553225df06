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
  {{- $annotations := merge (dict) (dig "service" "annotations" (dict) $c) .root.Values.commonAnnotations }}
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
      appProtocol: grpc
    - name: metrics
      port: {{ .root.Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end -}}

{{/* A PodDisruptionBudget for a component when its pdb is enabled. */}}
{{- define "memory3.pdb" -}}
{{- $c := index .root.Values .component -}}
{{- if $c.pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "memory3.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "memory3.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ $c.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "memory3.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/* An autoscaling/v2 HPA on CPU utilization (text and memory). */}}
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
{{- end }}
{{- end -}}
