{{/* Chart name, truncated to 63 (DNS label limit). */}}
{{- define "pagedserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>" unless the release name already contains the chart name. */}}
{{- define "pagedserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's objects. Call with (dict "root" $ "component" "router"). */}}
{{- define "pagedserve.componentName" -}}
{{- $base := include "pagedserve.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base .component -}}
{{- end -}}

{{- define "pagedserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component (immutable: never add to these). */}}
{{- define "pagedserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pagedserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Standard labels of one component. */}}
{{- define "pagedserve.labels" -}}
helm.sh/chart: {{ include "pagedserve.chart" .root }}
{{ include "pagedserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: pagedserve
{{- end -}}

{{/* Labels of a Service whose `metrics` port Prometheus scrapes; job = pagedserve-<component>. */}}
{{- define "pagedserve.metricsServiceLabels" -}}
pagedserve.io/metrics: "true"
pagedserve.io/job: pagedserve-{{ .component }}
{{- end -}}

{{- define "pagedserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pagedserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* image for a component: its own fields win over the shared image. (dict "root" $ "image" .image) */}}
{{- define "pagedserve.image" -}}
{{- $shared := .root.Values.image -}}
{{- $repo := default $shared.repository .image.repository -}}
{{- $tag := default (default .root.Chart.AppVersion $shared.tag) .image.tag -}}
image: {{ printf "%s:%s" $repo $tag | quote }}
imagePullPolicy: {{ default $shared.pullPolicy .image.pullPolicy }}
{{- end -}}

{{/* The one probe helper: native gRPC probes against grpc.health.v1, except readiness with an
     HTTP port: GET /health on port `http` (the router's OpenAI-compatible API). With mTLS
     ("tls" true) TCP connects: the kubelet's probes carry no client certificate.
     (dict "port" N "probes" map ["httpPort" H] ["tls" bool]) */}}
{{- define "pagedserve.grpcProbes" -}}
{{- $port := .port -}}
{{- $httpPort := .httpPort -}}
{{- $tls := .tls -}}
{{- range $kind := list "startup" "liveness" "readiness" }}
{{- with (get $.probes $kind) }}
{{ $kind }}Probe:
  {{- if $tls }}
  tcpSocket:
    port: {{ $port }}
  {{- else if and (eq $kind "readiness") $httpPort }}
  httpGet:
    path: /health
    port: http
  {{- else }}
  grpc:
    port: {{ $port }}
  {{- end }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Container ports: `grpc`, `metrics`, and `http` when the component has an httpPort (the
     router's OpenAI-compatible API). (dict "port" N "metricsPort" M ["httpPort" H]) */}}
{{- define "pagedserve.ports" -}}
ports:
  - name: grpc
    containerPort: {{ .port }}
    protocol: TCP
  - name: metrics
    containerPort: {{ .metricsPort }}
    protocol: TCP
  {{- with .httpPort }}
  - name: http
    containerPort: {{ . }}
    protocol: TCP
  {{- end }}
{{- end -}}

{{/* Pod annotations incl. annotation-based scraping. (dict "root" $ "c" .Values.router) */}}
{{- define "pagedserve.podAnnotations" -}}
{{- $ann := dict -}}
{{- if .root.Values.metrics.podAnnotations -}}
{{- $_ := set $ann "prometheus.io/scrape" "true" -}}
{{- $_ := set $ann "prometheus.io/port" (toString .c.metricsPort) -}}
{{- $_ := set $ann "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- $ann = merge (deepCopy .c.podAnnotations) $ann -}}
{{- with $ann }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod spec fields common to every component. (dict "root" $ "c" component-values) */}}
{{- define "pagedserve.podCommon" -}}
serviceAccountName: {{ include "pagedserve.serviceAccountName" .root }}
terminationGracePeriodSeconds: {{ .c.terminationGracePeriodSeconds }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Model volume for router and worker pods (nothing for source=image). */}}
{{- define "pagedserve.modelVolume" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ $m.hostPath.path }}
    type: {{ $m.hostPath.type }}
{{- end }}
{{- end -}}

{{- define "pagedserve.modelMount" -}}
{{- if ne .Values.model.source "image" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "pagedserve.modelArgs" -}}
{{- with .Values.model.path }}
- --model
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Address of a component's Service: "<name>:<port>". */}}
{{- define "pagedserve.address" -}}
{{- printf "%s:%v" (include "pagedserve.componentName" (dict "root" .root "component" .component)) .port -}}
{{- end -}}

{{/* True when the scheduler reads the Redis URL from a Secret. */}}
{{- define "pagedserve.externalRedis" -}}
{{- if and (eq .Values.kvstore.backend "redis") (not .Values.redis.enabled) }}true{{ end -}}
{{- end -}}

{{/* NetworkPolicy ingress rule opening a component's metrics port to networkPolicy.metricsFrom. */}}
{{- define "pagedserve.metricsIngress" -}}
- from:
    {{- with .root.Values.networkPolicy.metricsFrom }}
    {{- toYaml . | nindent 4 }}
    {{- else }}
    - namespaceSelector: {}
    {{- end }}
  ports:
    - port: {{ .c.metricsPort }}
      protocol: TCP
{{- end -}}

{{/* Alert rule groups. deploy/prometheus/alerts.yaml is exactly this with default values
     (tests/unit/test_helm_chart.py keeps the two in step). */}}
{{- define "pagedserve.alertGroups" -}}
{{- $a := .Values.alerts -}}
groups:
  - name: pagedserve
    rules:
      - alert: PagedserveKVCacheNearlyFull
        expr: max by (worker) (pagedserve_scheduler_kv_cache_usage_ratio) > {{ $a.kvUsageThreshold }}
        for: {{ $a.kvUsageFor }}
        labels:
          severity: warning
        annotations:
          summary: "KV cache of worker {{ "{{" }} $labels.worker {{ "}}" }} is over {{ mulf $a.kvUsageThreshold 100 }}% full"
          description: "Requests will queue or be preempted; add workers or lower max batch size."
      - alert: PagedserveHighPreemptionRate
        expr: sum(rate(pagedserve_scheduler_preemptions_total[5m])) > {{ $a.preemptionsPerSecond }}
        for: {{ $a.preemptionFor }}
        labels:
          severity: warning
        annotations:
          summary: "Scheduler preempts {{ "{{" }} $value | humanize {{ "}}" }} sequence groups/s"
          description: "KV memory is thrashing (swap/recompute); throughput and latency suffer."
      - alert: PagedserveWorkerDown
        expr: up{job="pagedserve-worker"} == 0
        for: {{ $a.workerDownFor }}
        labels:
          severity: critical
        annotations:
          summary: "Worker {{ "{{" }} $labels.instance {{ "}}" }} is down"
          description: "Prometheus cannot scrape this worker; the scheduler re-places its requests."
      - alert: PagedserveNoWorkers
        expr: absent(up{job="pagedserve-worker"} == 1)
        for: {{ $a.workerDownFor }}
        labels:
          severity: critical
        annotations:
          summary: "No pagedserve worker is up"
          description: "No worker target is scraped successfully; generation is unavailable."
      - alert: PagedserveTTFTSLOBreached
        expr: histogram_quantile(0.99, sum by (le) (rate(pagedserve_router_time_to_first_token_seconds_bucket[5m]))) > {{ $a.ttftP99SloSeconds }}
        for: {{ $a.ttftFor }}
        labels:
          severity: warning
        annotations:
          summary: "TTFT p99 is {{ "{{" }} $value | humanizeDuration {{ "}}" }}, SLO {{ $a.ttftP99SloSeconds }}s"
          description: "Time to first token p99 over 5m exceeds the SLO."
{{- end -}}

{{/* The Secret holding a component's certificate. (dict "root" $ "component" "router") */}}
{{- define "pagedserve.tlsSecret" -}}
{{- default (printf "%s-tls" (include "pagedserve.componentName" .)) (get .root.Values.tls.secrets .component) -}}
{{- end -}}

{{/* A component's --tls-* flags (tls.enabled): its certificate, key and CA (mTLS); workers admit
     only the scheduler's certificate, the scheduler only the router's and checks the workers'
     name (it reaches them by pod IP). (dict "root" $ "component" "router") */}}
{{- define "pagedserve.tlsArgs" -}}
{{- $t := .root.Values.tls -}}
{{- if $t.enabled }}
- --tls-cert-file
- {{ printf "%s/tls.crt" $t.mountPath | quote }}
- --tls-key-file
- {{ printf "%s/tls.key" $t.mountPath | quote }}
- --tls-ca-file
- {{ printf "%s/ca.crt" $t.mountPath | quote }}
{{- if eq .component "worker" }}
- --tls-client-identity
- {{ default (include "pagedserve.componentName" (dict "root" .root "component" "scheduler")) $t.schedulerIdentity | quote }}
{{- else if eq .component "scheduler" }}
- --tls-client-identity
- {{ default (include "pagedserve.componentName" (dict "root" .root "component" "router")) $t.routerIdentity | quote }}
- --worker-tls-server-name
- {{ include "pagedserve.componentName" (dict "root" .root "component" "worker") | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The certificate volume of a component's pod (tls.enabled). (dict "root" $ "component" c) */}}
{{- define "pagedserve.tlsVolume" -}}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "pagedserve.tlsSecret" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "pagedserve.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The router's API key file (router.apiKeys.existingSecret). */}}
{{- define "pagedserve.apiKeysDir" -}}/etc/pagedserve/api-keys{{- end -}}

{{- define "pagedserve.apiKeysVolume" -}}
{{- with .Values.router.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: {{ $.Values.router.apiKeys.secretKey }}
        path: api-keys
{{- end }}
{{- end -}}

{{- define "pagedserve.apiKeysMount" -}}
{{- if .Values.router.apiKeys.existingSecret }}
- name: api-keys
  mountPath: {{ include "pagedserve.apiKeysDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The router's --api-key-file, --rate-limit-* and --prefix-cache-isolation flags. */}}
{{- define "pagedserve.routerAuthArgs" -}}
{{- $c := .Values.router -}}
{{- if $c.apiKeys.existingSecret }}
- --api-key-file
- {{ printf "%s/api-keys" (include "pagedserve.apiKeysDir" .) | quote }}
{{- else if eq $c.prefixCacheIsolation "api-key" }}
{{- fail "router.prefixCacheIsolation=api-key needs router.apiKeys.existingSecret: without API keys every caller is one tenant" }}
{{- end }}
- --prefix-cache-isolation
- {{ $c.prefixCacheIsolation | quote }}
{{- range $flag, $key := dict "rps" "requestsPerSecond" "burst" "requestBurst" "tps" "tokensPerSecond" "token-burst" "tokenBurst" }}
{{- with (get $c.rateLimit $key) }}
- --rate-limit-{{ $flag }}
- {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* --log-format for every service's container (logFormat). */}}
{{- define "pagedserve.logArgs" -}}
- --log-format
- {{ .Values.logFormat | quote }}
{{- end -}}
