{{/* The Jobs' specs and names. A Job's pod template is immutable, so each Job is named after a hash of its
whole spec: any change (image, chart version, arguments, resources, shards) makes a new Job instead of an
upgrade the API server refuses. Every command runs with --exist-ok, so a new Job for a release already
published finds it and exits at once. */}}

{{/* The name of a Job: <fullname>-<kind>-<10 hex digits of its spec's hash>, at most 63 characters. The Indexed
Job's pods are named <Job name>-<index> as their hostname, a DNS label of 63 characters at most too: its name leaves
room for "-" and the last index (the API server refuses the Job otherwise). Call with (dict "root" $ "kind" "train"
"spec" (include "memory3.trainJobSpec" $)), adding "completions" <count> for an Indexed Job. */}}
{{- define "memory3.jobName" -}}
{{- $suffix := printf "-%s-%s" .kind (.spec | sha256sum | trunc 10) -}}
{{- $index := 0 -}}
{{- if hasKey . "completions" -}}
{{- $index = add 1 (len (toString (sub (int .completions) 1))) -}}
{{- end -}}
{{- printf "%s%s" (include "memory3.fullname" .root | trunc (int (sub (sub 63 (len $suffix)) $index)) | trimSuffix "-") $suffix -}}
{{- end -}}

{{/* The trainer's release: trainer.job.release, else release. */}}
{{- define "memory3.trainerRelease" -}}
{{- include "memory3.string" (default .Values.release .Values.trainer.job.release) -}}
{{- end -}}

{{/* The encoding Jobs' base release: encoding.release, else release. */}}
{{- define "memory3.encodingBase" -}}
{{- include "memory3.string" (default .Values.release .Values.encoding.release) -}}
{{- end -}}

{{/* The release the merge Job publishes: encoding.merge.name, else <base>-encoded. */}}
{{- define "memory3.encodingMerged" -}}
{{- include "memory3.string" (default (printf "%s-encoded" (include "memory3.encodingBase" .)) .Values.encoding.merge.name) -}}
{{- end -}}

{{/* TMPDIR of a Job's container: a publication writes the model's weights to a temporary directory (the full
release's size), too much for the 1Gi /tmp. Call with the mount path of a volume sized for it: the trainer's work
volume, the encoding Jobs' release cache. */}}
{{- define "memory3.jobTmpEnv" -}}
- name: TMPDIR
  value: {{ . | quote }}
{{- end -}}

{{/* The spec of the Job in trainer/job.yaml. With trainer.job.gpu.enabled it trains on the GPU (`--device cuda`);
with more than one GPU, data-parallel: torchrun starts one `memory3 train` per GPU (each takes cuda:$LOCAL_RANK,
and they talk over NCCL, which needs a /dev/shm larger than the container runtime's 64 MiB). */}}
{{- define "memory3.trainJobSpec" -}}
{{- $t := .Values.trainer.job }}
{{- $gpu := $t.gpu }}
{{- $release := include "memory3.trainerRelease" . -}}
{{- $processes := ternary (int $gpu.count) 1 (and $gpu.enabled (gt (int $gpu.count) 1)) -}}
backoffLimit: {{ $t.backoffLimit }}
ttlSecondsAfterFinished: {{ $t.ttlSecondsAfterFinished }}
{{- with $t.activeDeadlineSeconds }}
# The Job's whole run, retries included: past it the pod is stopped and the Job fails (a hung trainer frees its GPUs).
activeDeadlineSeconds: {{ include "memory3.int" . }}
{{- end }}
template:
  metadata:
    labels:
      {{- include "memory3.labels" (dict "root" $ "component" "trainer") | nindent 6 }}
    annotations:
      memory3.io/release: {{ $release | quote }}
  spec:
    {{- include "memory3.podSpecCommon" . | nindent 4 }}
    restartPolicy: Never
    containers:
      - name: trainer
        image: {{ include "memory3.image" (dict "root" $ "flavor" (include "memory3.imageFlavor" $t)) }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        {{- if gt $processes 1 }}
        command: ["torchrun"]
        args:
          - --standalone
          - --nproc-per-node
          - {{ $processes | quote }}
          # Its workers' logs: in the pod's /tmp, not in TMPDIR (the work volume), where each attempt would leave some.
          - --log-dir
          - /tmp/torchelastic
          - --no-python
          - memory3
          - train
        {{- else }}
        command: ["memory3"]
        args:
          - train
        {{- end }}
          - --release
          - {{ $release | quote }}
          {{- with $t.preset }}
          - --preset
          - {{ . | quote }}
          {{- end }}
          {{- if $t.quick }}
          - --quick
          {{- end }}
          - --codec
          - {{ $t.codec }}
          - --index-kind
          - {{ $t.indexKind | quote }}
          - --seed
          - {{ include "memory3.int" $t.seed | quote }}
          - --work-dir
          {{- /* A run resumes with as many processes as wrote its checkpoints: another count starts its own ('+' is in no release name). */}}
          - {{ printf "/var/lib/memory3/work/%s%s" $release (ternary (printf "+%d-processes" $processes) "" (gt $processes 1)) | quote }}
          # A Job run again (after its TTL, by a later `helm upgrade`) finds its release and does nothing.
          - --exist-ok
          {{- if $gpu.enabled }}
          - --device
          - cuda
          {{- end }}
          {{- include "memory3.s3Args" . | nindent 10 }}
          {{- with $t.extraArgs }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        env:
          {{- include "memory3.s3Env" . | nindent 10 }}
          {{- include "memory3.jobTmpEnv" "/var/lib/memory3/work" | nindent 10 }}
        resources:
          {{- include "memory3.gpuResources" (dict "resources" $t.resources "gpu" $gpu) | nindent 10 }}
        securityContext:
          {{- toYaml .Values.securityContext | nindent 10 }}
        volumeMounts:
          {{- include "memory3.cacheMounts" . | nindent 10 }}
          - name: work
            mountPath: /var/lib/memory3/work
          {{- if gt $processes 1 }}
          - name: shm
            mountPath: /dev/shm
          {{- end }}
    volumes:
      {{- include "memory3.cacheVolumes" . | nindent 6 }}
      - name: work
        {{- if $t.workVolumeClaim }}
        persistentVolumeClaim:
          claimName: {{ $t.workVolumeClaim }}
        {{- else }}
        emptyDir: {}
        {{- end }}
      {{- if gt $processes 1 }}
      - name: shm
        emptyDir:
          medium: Memory
          sizeLimit: {{ $t.shmSize }}
      {{- end }}
    {{- with include "memory3.gpuPlacement" $t | trim }}
    {{- . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The spec of the Job in trainer/encoding-job.yaml. With encoding.gpu.enabled each index encodes its shard's
memories on one GPU (`kb add --device cuda`: one process). */}}
{{- define "memory3.encodeJobSpec" -}}
{{- $e := .Values.encoding }}
{{- $base := include "memory3.encodingBase" . -}}
# One completion index per reference shard; Kubernetes sets JOB_COMPLETION_INDEX in each pod.
completionMode: Indexed
completions: {{ $e.shards }}
parallelism: {{ $e.parallelism }}
{{- if semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version }}
# Retries per index (Kubernetes 1.29+): one bad shard does not use up the others' retries.
backoffLimitPerIndex: {{ $e.backoffLimitPerIndex }}
{{- else }}
# Kubernetes before 1.29 has no per-index limit: the same number of retries per shard, shared by all.
backoffLimit: {{ mul (int $e.backoffLimitPerIndex) (int $e.shards) }}
{{- end }}
ttlSecondsAfterFinished: {{ $e.ttlSecondsAfterFinished }}
{{- with $e.activeDeadlineSeconds }}
# Every index's run, retries included: past it the running pods are stopped and the Job fails.
activeDeadlineSeconds: {{ include "memory3.int" . }}
{{- end }}
template:
  metadata:
    labels:
      {{- include "memory3.labels" (dict "root" $ "component" "encoder") | nindent 6 }}
  spec:
    {{- include "memory3.podSpecCommon" . | nindent 4 }}
    restartPolicy: Never
    containers:
      - name: encoder
        image: {{ include "memory3.image" (dict "root" $ "flavor" (include "memory3.imageFlavor" $e)) }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        command: ["memory3"]
        # Kubernetes expands $(JOB_COMPLETION_INDEX) in arguments (no shell needed).
        args:
          - kb
          - add
          - {{ printf "%s/shard-$(JOB_COMPLETION_INDEX).txt" $e.shardsPath | quote }}
          - --release
          - {{ $base | quote }}
          - --name
          - {{ printf "%s-shard-$(JOB_COMPLETION_INDEX)" $base | quote }}
          - --exist-ok
          {{- if $e.gpu.enabled }}
          - --device
          - cuda
          {{- end }}
          {{- include "memory3.s3Args" . | nindent 10 }}
        env:
          {{- include "memory3.s3Env" . | nindent 10 }}
          {{- include "memory3.jobTmpEnv" "/var/cache/memory3" | nindent 10 }}
        resources:
          {{- include "memory3.gpuResources" (dict "resources" $e.resources "gpu" $e.gpu) | nindent 10 }}
        securityContext:
          {{- toYaml .Values.securityContext | nindent 10 }}
        volumeMounts:
          {{- include "memory3.cacheMounts" . | nindent 10 }}
          - name: shards
            mountPath: {{ $e.shardsPath }}
            readOnly: true
    volumes:
      {{- include "memory3.cacheVolumes" . | nindent 6 }}
      - name: shards
        persistentVolumeClaim:
          claimName: {{ $e.shardsVolumeClaim | default "unset" }}
          readOnly: true
    {{- with include "memory3.gpuPlacement" $e | trim }}
    {{- . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The spec of the Job in trainer/encoding-merge-job.yaml. It encodes nothing: CPU image, no GPU, whatever
encoding.gpu says. */}}
{{- define "memory3.mergeJobSpec" -}}
{{- $e := .Values.encoding }}
{{- $base := include "memory3.encodingBase" . }}
{{- $merged := include "memory3.encodingMerged" . -}}
# Started with the Indexed Job: `kb merge --wait` waits for every shard's release, then publishes
# the merged one. A retry cannot bring a failed shard back, so it gets one.
backoffLimit: 1
ttlSecondsAfterFinished: {{ $e.ttlSecondsAfterFinished }}
{{- with $e.merge.activeDeadlineSeconds }}
activeDeadlineSeconds: {{ include "memory3.int" . }}
{{- end }}
template:
  metadata:
    labels:
      {{- include "memory3.labels" (dict "root" $ "component" "encoder") | nindent 6 }}
  spec:
    {{- include "memory3.podSpecCommon" . | nindent 4 }}
    restartPolicy: Never
    containers:
      - name: merge
        image: {{ include "memory3.image" (dict "root" $ "flavor" "cpu") }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        command: ["memory3"]
        args:
          - kb
          - merge
          {{- range $i := until (int $e.shards) }}
          - {{ printf "%s-shard-%d" $base $i | quote }}
          {{- end }}
          - --release
          - {{ $base | quote }}
          - --name
          - {{ $merged | quote }}
          - --wait
          - {{ include "memory3.string" $e.merge.waitSeconds | quote }}
          - --exist-ok
          {{- include "memory3.s3Args" . | nindent 10 }}
        env:
          {{- include "memory3.s3Env" . | nindent 10 }}
          {{- include "memory3.jobTmpEnv" "/var/cache/memory3" | nindent 10 }}
        # Its own, smaller requests: it mostly waits for the shards (encoding.merge.resources).
        resources:
          {{- toYaml $e.merge.resources | nindent 10 }}
        securityContext:
          {{- toYaml .Values.securityContext | nindent 10 }}
        volumeMounts:
          {{- include "memory3.cacheMounts" . | nindent 10 }}
    volumes:
      {{- include "memory3.cacheVolumes" . | nindent 6 }}
{{- end -}}
