{{/* Check the values before anything renders; fail once, listing every problem with what to set. */}}
{{- define "memory3.validateValues" -}}
{{- $messages := list -}}
{{- $v := .Values -}}
{{- if not $v.release -}}
{{- $messages = append $messages "release: set the trainer release to serve, e.g. --set release=small-v1 (the release's directory in the bucket)" -}}
{{- else if not (include "memory3.isReleaseName" (include "memory3.release" .)) -}}
{{- $messages = append $messages (printf "release: %q is not a release name (%s)" (include "memory3.release" .) (include "memory3.releaseNameRule" .)) -}}
{{- end -}}
{{- if and $v.kserve.chatTemplate $v.kserve.chatTemplateConfigMap.name -}}
{{- $messages = append $messages "kserve.chatTemplate and kserve.chatTemplateConfigMap.name are both set: set one (the ConfigMap's template, or a built-in such as qa)" -}}
{{- end -}}
{{- $bucket := include "memory3.string" $v.s3.bucket -}}
{{- if not (include "memory3.isBucketName" $bucket) -}}
{{- $messages = append $messages (printf "s3.bucket: %q is not an S3 bucket name (3-63 of a-z, 0-9, '.' and '-', starting and ending with a letter or digit, without '..', '.-' or '-.', not an IP address)" $bucket) -}}
{{- end -}}
{{- if $v.s3.inChart.enabled -}}
{{- if $v.s3.endpoint -}}
{{- $messages = append $messages "s3: s3.endpoint is set but s3.inChart.enabled uses the in-chart store; unset one of them" -}}
{{- end -}}
{{- if $v.s3.secure -}}
{{- $messages = append $messages "s3.secure: the in-chart store speaks plain HTTP inside the cluster; unset s3.secure, or use your own store over HTTPS" -}}
{{- end -}}
{{- else -}}
{{- if not $v.s3.endpoint -}}
{{- $messages = append $messages "s3.endpoint: set host:port of your S3-compatible store, or --set s3.inChart.enabled=true for a minimal in-chart one" -}}
{{- else if contains "://" $v.s3.endpoint -}}
{{- $messages = append $messages (printf "s3.endpoint: %q must be host:port without a scheme (use s3.secure=true for HTTPS)" $v.s3.endpoint) -}}
{{- end -}}
{{- if and $v.s3.caBundle.secretName (not $v.s3.secure) -}}
{{- $messages = append $messages "s3.caBundle.secretName: a CA bundle is for HTTPS; set s3.secure=true too" -}}
{{- end -}}
{{- if not $v.s3.existingSecret -}}
{{- $messages = append $messages (printf "s3.existingSecret: name a Secret with keys %q and %q holding the store's credentials (kubectl create secret generic memory3-s3 --from-literal=%s=... --from-literal=%s=...)" $v.s3.accessKeyKey $v.s3.secretKeyKey $v.s3.accessKeyKey $v.s3.secretKeyKey) -}}
{{- end -}}
{{- end -}}
{{- if $v.redis.url -}}
{{- /* A password or user name in the URL's userinfo, or in its query (?password=, ?sentinel_password=, ...). */}}
{{- if or (contains "@" $v.redis.url) (regexMatch "(?i)[?&](sentinel_)?(password|username)=" $v.redis.url) -}}
{{- $messages = append $messages "redis.url: it holds credentials; put the URL in a Secret and set redis.existingSecret (and redis.urlKey) instead" -}}
{{- else if not (regexMatch "^rediss?(\\+sentinel|\\+cluster)?://" $v.redis.url) -}}
{{- $messages = append $messages (printf "redis.url: %q must start with redis://, redis+sentinel:// or redis+cluster:// (rediss… for TLS)" $v.redis.url) -}}
{{- end -}}
{{- end -}}
{{- if and $v.redis.url $v.redis.existingSecret -}}
{{- $messages = append $messages "redis: set either redis.url or redis.existingSecret, not both" -}}
{{- end -}}
{{- if and $v.redis.inChart.enabled (or $v.redis.url $v.redis.existingSecret) -}}
{{- $messages = append $messages "redis: redis.inChart.enabled runs Redis in the chart; unset redis.url and redis.existingSecret (they name an external one)" -}}
{{- end -}}
{{- range $component := list "text" "memory" "decoder" -}}
{{- $c := index $v $component -}}
{{- if $c.autoscaling.enabled -}}
{{- if lt (int $c.autoscaling.minReplicas) 1 -}}
{{- $messages = append $messages (printf "%s.autoscaling.minReplicas: must be at least 1 (got %v)" $component $c.autoscaling.minReplicas) -}}
{{- end -}}
{{- if gt (int $c.autoscaling.minReplicas) (int $c.autoscaling.maxReplicas) -}}
{{- $messages = append $messages (printf "%s.autoscaling: minReplicas (%v) is greater than maxReplicas (%v)" $component $c.autoscaling.minReplicas $c.autoscaling.maxReplicas) -}}
{{- end -}}
{{- if and (ne $component "decoder") (not (dig "requests" "cpu" "" (default dict $c.resources))) -}}
{{- $messages = append $messages (printf "%s.resources.requests.cpu: the CPU autoscaler needs a CPU request (or set %s.autoscaling.enabled=false)" $component $component) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $v.decoder.autoscaling.keda.enabled (not $v.decoder.autoscaling.enabled) -}}
{{- $messages = append $messages "decoder.autoscaling.keda.enabled: KEDA scales between decoder.autoscaling.minReplicas and maxReplicas; set decoder.autoscaling.enabled=true too" -}}
{{- else if and $v.decoder.autoscaling.keda.enabled (not $v.decoder.autoscaling.keda.query) (not $v.metrics.serviceMonitor.enabled) -}}
{{- $messages = append $messages "decoder.autoscaling.keda.enabled: its query reads memory3_num_requests_waiting labelled by the decoder's Service, as the ServiceMonitors scrape it; set metrics.serviceMonitor.enabled=true too, or give your own query in decoder.autoscaling.keda.query" -}}
{{- end -}}
{{- /* The parts that may run on a GPU (the Jobs when they are rendered): a GPU with the CPU image is torch without CUDA. */}}
{{- $gpuParts := dict "decoder" $v.decoder -}}
{{- if $v.trainer.job.enabled }}{{ $_ := set $gpuParts "trainer.job" $v.trainer.job }}{{ end -}}
{{- if $v.encoding.enabled }}{{ $_ := set $gpuParts "encoding" $v.encoding }}{{ end -}}
{{- range $path, $c := $gpuParts -}}
{{- if and $c.gpu.enabled (eq (include "memory3.imageFlavor" $c) "cpu") -}}
{{- $messages = append $messages (printf "%s.gpu.enabled: a GPU is requested but %s.imageFlavor is cpu; the CPU image has no CUDA build of torch. Set %s.imageFlavor=auto (or cuda)" $path $path $path) -}}
{{- end -}}
{{- end -}}
{{- if and (not $v.decoder.gpu.enabled) (has $v.decoder.dtype (list "bfloat16" "float16")) -}}
{{- $messages = append $messages (printf "decoder.dtype: %s on CPU is slow or unsupported; use float32, or set decoder.gpu.enabled=true" $v.decoder.dtype) -}}
{{- end -}}
{{- if and $v.decoder.gpu.enabled (lt (int $v.decoder.gpu.count) 1) -}}
{{- $messages = append $messages "decoder.gpu.count: must be at least 1 when decoder.gpu.enabled" -}}
{{- else if and $v.decoder.gpu.enabled (gt (int $v.decoder.gpu.count) 1) -}}
{{- $messages = append $messages (printf "decoder.gpu.count: the decoder and the KServe predictor each run one process on one device, so %d GPUs per pod would leave %d idle; set decoder.gpu.count=1 and scale with replicas (decoder.autoscaling.maxReplicas)" (int $v.decoder.gpu.count) (sub (int $v.decoder.gpu.count) 1)) -}}
{{- end -}}
{{- if and $v.trainer.job.enabled $v.trainer.job.gpu.enabled (lt (int $v.trainer.job.gpu.count) 1) -}}
{{- $messages = append $messages "trainer.job.gpu.count: must be at least 1 when trainer.job.gpu.enabled" -}}
{{- end -}}
{{- if and $v.trainer.job.enabled $v.trainer.job.gpu.enabled (gt (int $v.trainer.job.gpu.count) 1) (contains "mig-" $v.trainer.job.gpu.resourceName) -}}
{{- $messages = append $messages (printf "trainer.job.gpu.count: a CUDA process sees one MIG device however many the pod gets, so %d training processes cannot each have one; train on whole GPUs (trainer.job.gpu.resourceName=nvidia.com/gpu) or set trainer.job.gpu.count=1" (int $v.trainer.job.gpu.count)) -}}
{{- end -}}
{{- range $path, $c := $gpuParts -}}
{{- if and (ne $path "decoder") (not $c.gpu.enabled) (eq (include "memory3.imageFlavor" $c) "cpu") -}}
{{- $limits := default dict (dig "limits" dict (default dict $c.resources)) -}}
{{- if or (hasKey $limits $c.gpu.resourceName) (hasKey $limits $v.decoder.gpu.resourceName) -}}
{{- $messages = append $messages (printf "%s.resources: a GPU limit is set but the CPU image has no CUDA build of torch; set %s.gpu.enabled=true instead (it adds the limit, --device cuda and the CUDA image)" $path $path) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $v.trainer.job.enabled $v.trainer.job.release (not (include "memory3.isReleaseName" (include "memory3.string" $v.trainer.job.release))) -}}
{{- $messages = append $messages (printf "trainer.job.release: %q is not a release name (%s)" (include "memory3.string" $v.trainer.job.release) (include "memory3.releaseNameRule" .)) -}}
{{- end -}}
{{- if $v.encoding.enabled -}}
{{- $base := include "memory3.encodingBase" . -}}
{{- if and $v.encoding.release (not (include "memory3.isReleaseName" $base)) -}}
{{- $messages = append $messages (printf "encoding.release: %q is not a release name (%s)" $base (include "memory3.releaseNameRule" .)) -}}
{{- else if and (include "memory3.isReleaseName" $base) (gt (int $v.encoding.shards) 0) -}}
{{- $lastShard := printf "%s-shard-%d" $base (sub (int $v.encoding.shards) 1) -}}
{{- if not (include "memory3.isReleaseName" $lastShard) -}}
{{- $messages = append $messages (printf "encoding.release: the shards' releases, up to %q, are longer than a release name may be (63 characters); use a shorter base release" $lastShard) -}}
{{- end -}}
{{- end -}}
{{- if $v.encoding.merge.enabled -}}
{{- $deadline := float64 (default 0 $v.encoding.merge.activeDeadlineSeconds) -}}
{{- if and (gt $deadline 0.0) (le $deadline (float64 $v.encoding.merge.waitSeconds)) -}}
{{- $messages = append $messages (printf "encoding.merge.activeDeadlineSeconds: %v would stop the merge Job while it waits for the shards (encoding.merge.waitSeconds, %v); set it above the wait, with time for the merge itself, or 0 for none" $v.encoding.merge.activeDeadlineSeconds $v.encoding.merge.waitSeconds) -}}
{{- end -}}
{{- $merged := include "memory3.encodingMerged" . -}}
{{- if and $v.encoding.merge.name (not (include "memory3.isReleaseName" $merged)) -}}
{{- $messages = append $messages (printf "encoding.merge.name: %q is not a release name (%s)" $merged (include "memory3.releaseNameRule" .)) -}}
{{- else if and (not $v.encoding.merge.name) (include "memory3.isReleaseName" $base) (not (include "memory3.isReleaseName" $merged)) -}}
{{- $messages = append $messages (printf "encoding.merge.name: the default merged release %q is longer than a release name may be (63 characters); name it" $merged) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $v.kserve.enabled -}}
{{- $model := include "memory3.string" $v.kserve.modelName -}}
{{- if not (regexMatch "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$" $model) -}}
{{- $messages = append $messages (printf "kserve.modelName: %q is not a model name (1-63 of letters, digits, '.', '_' and '-', starting with a letter or digit: it is a path segment of the v2 routes)" $model) -}}
{{- end -}}
{{- end -}}
{{- range $component := list "text" "memory" "decoder" -}}
{{- $c := index $v $component -}}
{{- $ctx := dict "root" $ "component" $component -}}
{{- $most := $c.pdb.maxUnavailable -}}
{{- if and $c.pdb.enabled (eq (int (ternary (trimSuffix "%" (toString $most)) $most (kindIs "string" $most))) 0) -}}
{{- $messages = append $messages (printf "%s.pdb.maxUnavailable: %v lets no pod go, so a node drain or cluster upgrade waits on it for good; set it to 1 or more (or %s.pdb.enabled=false for no budget)" $component $most $component) -}}
{{- else if include "memory3.pdbEnabled" $ctx -}}
{{- $pods := int (include "memory3.minPods" $ctx) -}}
{{- $down := 0 -}}
{{- if kindIs "string" $most -}}
{{- $down = div (add (mul (int (trimSuffix "%" $most)) $pods) 99) 100 -}}
{{- else -}}
{{- $down = int $most -}}
{{- end -}}
{{- if ge (int $down) $pods -}}
{{- $messages = append $messages (printf "%s.pdb.maxUnavailable: %v lets a drain take all %d pods of the minimum at once; set it below %d (e.g. 1) so one keeps serving" $component $most $pods $pods) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* Each in-process cache against the memory limit of the pods that hold it: the decoder's is also the
KServe predictor's. */}}
{{- $caches := list (dict "component" "memory" "cache" "ramCacheMB" "pods" "memory") (dict "component" "decoder" "cache" "memoryCacheMB" "pods" "decoder") -}}
{{- if $v.kserve.enabled -}}
{{- $caches = append $caches (dict "component" "decoder" "cache" "memoryCacheMB" "pods" "kserve") -}}
{{- end -}}
{{- range $check := $caches -}}
{{- $cache := index $v $check.component $check.cache -}}
{{- $limit := dig "limits" "memory" "" (default dict (index $v $check.pods).resources) -}}
{{- $limitMiB := include "memory3.quantityMiB" $limit -}}
{{- $cacheMiB := float64 $cache -}}
{{- if and $limitMiB (gt $cacheMiB 0.0) (ge $cacheMiB (float64 $limitMiB)) -}}
{{- $messages = append $messages (printf "%s.%s: %v MiB of cache does not fit the memory limit %v (%s.resources.limits.memory); lower it, or raise the limit above it with room for the process" $check.component $check.cache $cache $limit $check.pods) -}}
{{- end -}}
{{- end -}}
{{- if and $v.trainer.job.enabled $v.encoding.enabled $v.encoding.merge.enabled (eq (include "memory3.trainerRelease" .) (include "memory3.encodingMerged" .)) -}}
{{- $messages = append $messages (printf "trainer.job.release: the trainer would publish %q, the release the merge Job publishes; pin the trainer's own release (--set trainer.job.release=%s) or set trainer.job.enabled=false" (include "memory3.trainerRelease" .) (include "memory3.encodingBase" .)) -}}
{{- end -}}
{{- if and $v.auth.decoder.enabled (not $v.tls.enabled) -}}
{{- $messages = append $messages "auth.decoder.enabled: a token goes over TLS only; set tls.enabled=true too" -}}
{{- end -}}
{{- if and $v.auth.decoder.enabled (not $v.auth.decoder.existingSecret) -}}
{{- $messages = append $messages (printf "auth.decoder.existingSecret: name a Secret whose key %q holds the token the decoder's clients send (kubectl create secret generic memory3-clients --from-literal=%s=...)" $v.auth.decoder.tokenKey $v.auth.decoder.tokenKey) -}}
{{- end -}}
{{- if and $v.tls.clientAuth (not $v.tls.enabled) -}}
{{- $messages = append $messages "tls.clientAuth: mutual TLS needs tls.enabled=true" -}}
{{- end -}}
{{- if and $v.metrics.prometheusRule.enabled (not $v.metrics.serviceMonitor.enabled) -}}
{{- $messages = append $messages "metrics.prometheusRule.enabled: its rules read the series the ServiceMonitors scrape (labelled by Service); set metrics.serviceMonitor.enabled=true too" -}}
{{- end -}}
{{- if and $v.encoding.enabled (not $v.encoding.shardsVolumeClaim) -}}
{{- $messages = append $messages "encoding.shardsVolumeClaim: the Indexed Job reads shard-<i>.txt from a PersistentVolumeClaim; name it" -}}
{{- end -}}
{{- if and $v.encoding.enabled (lt (int $v.encoding.shards) 1) -}}
{{- $messages = append $messages "encoding.shards: must be at least 1" -}}
{{- end -}}
{{- if and $v.kserve.enabled (gt (int $v.kserve.minReplicas) (int $v.kserve.maxReplicas)) -}}
{{- $messages = append $messages (printf "kserve: minReplicas (%v) is greater than maxReplicas (%v)" $v.kserve.minReplicas $v.kserve.maxReplicas) -}}
{{- end -}}
{{- $ports := list (int $v.text.port) (int $v.memory.port) (int $v.decoder.port) -}}
{{- if has (int $v.metrics.port) $ports -}}
{{- $messages = append $messages (printf "metrics.port: %v is also a gRPC port; pick another" $v.metrics.port) -}}
{{- end -}}
{{- if $v.tls.enabled -}}
{{- if $v.tls.existingSecret -}}
{{- range $key, $what := dict "certKey" "the PEM certificate" "keyKey" "its private key" "caKey" "the CA certificate" -}}
{{- if not (index $v.tls $key) -}}
{{- $messages = append $messages (printf "tls.%s: name the key of %s in the Secret %q (cert-manager's: tls.crt, tls.key, ca.crt)" $key $what $v.tls.existingSecret) -}}
{{- end -}}
{{- end -}}
{{- else if lt (int $v.tls.generated.validityDays) 1 -}}
{{- $messages = append $messages (printf "tls.generated.validityDays: must be at least 1 (got %v)" $v.tls.generated.validityDays) -}}
{{- end -}}
{{- if has (int $v.server.healthPort) (append $ports (int $v.metrics.port)) -}}
{{- $messages = append $messages (printf "server.healthPort: %v is also a gRPC or the metrics port; the probes' plaintext health port needs its own" $v.server.healthPort) -}}
{{- end -}}
{{- else if $v.tls.existingSecret -}}
{{- $messages = append $messages (printf "tls.existingSecret: %q is set but tls.enabled=false, so it would not be used; set tls.enabled=true or unset it" $v.tls.existingSecret) -}}
{{- end -}}
{{- if $messages -}}
{{- fail (printf "\n\nVALUES VALIDATION:\n- %s\n" (join "\n- " $messages)) -}}
{{- end -}}
{{- end -}}

{{/* The rule of a release name (services/release/manifest.py check_release_name), in words. */}}
{{- define "memory3.releaseNameRule" -}}
1-63 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit
{{- end -}}

{{/* "true" when the text is a release name: the rule of memory3.releaseNameRule. */}}
{{- define "memory3.isReleaseName" -}}
{{- if regexMatch "^[a-z0-9][a-z0-9._-]{0,62}$" (toString .) -}}true{{- end -}}
{{- end -}}

{{/* "true" when the text is an S3 bucket name as S3 and the object-store client accept it. */}}
{{- define "memory3.isBucketName" -}}
{{- $name := toString . -}}
{{- if and (regexMatch "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$" $name) (not (regexMatch "\\.\\.|\\.-|-\\." $name))
  (not (regexMatch "^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+$" $name)) (not (hasPrefix "xn--" $name))
  (not (hasSuffix "-s3alias" $name)) (not (hasSuffix "--ol-s3" $name)) -}}true{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity of bytes (2Gi, 512M, 1.5e9, 2147483648) in MiB; empty when it is not one. */}}
{{- define "memory3.quantityMiB" -}}
{{- $quantity := include "memory3.string" . -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+)?" $quantity -}}
{{- $units := dict "" 1.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18
  "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 -}}
{{- $suffix := trimPrefix $number $quantity -}}
{{- if and $number (hasKey $units $suffix) -}}
{{- divf (mulf (float64 $number) (get $units $suffix)) 1048576.0 -}}
{{- end -}}
{{- end -}}
