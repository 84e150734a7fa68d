{{/* Worker pods. With worker.tensorParallelSize 1 one StatefulSet of independent workers; with
     N > 1 one StatefulSet per group of N ranks (statefulset-worker.yaml), whose pod ordinal is
     the rank, pod 0 the leader. */}}

{{/* StatefulSet of worker group g: "<fullname>-worker-<g>", at most 52 characters, so that
     its pods ("-<rank>") and the controller's revision label ("-<hash>") fit in 63.
     (dict "root" $ "group" g) */}}
{{- define "pagedserve.workerGroupName" -}}
{{- $suffix := printf "worker-%v" .group -}}
{{- $base := include "pagedserve.fullname" .root | trunc (int (sub 51 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $suffix -}}
{{- end -}}

{{/* The headless Service that gives every rank of every group a stable DNS name
     (<pod>.<service>.<namespace>.svc), ready or not: ranks meet before they serve. */}}
{{- define "pagedserve.workerRanksName" -}}
{{- include "pagedserve.componentName" (dict "root" . "component" "worker-ranks") -}}
{{- end -}}

{{/* Group g's rendezvous (--tensor-parallel-master): its pod 0, which hosts the TCP store.
     (dict "root" $ "group" g) */}}
{{- define "pagedserve.tensorParallelMaster" -}}
{{- printf "%s-0.%s.%s.svc:%v" (include "pagedserve.workerGroupName" .) (include "pagedserve.workerRanksName" .root) .root.Release.Namespace .root.Values.worker.tensorParallelPort -}}
{{- end -}}

{{/* A rank is its pod's apps.kubernetes.io/pod-index label, which StatefulSets set from
     Kubernetes 1.28 on. */}}
{{- define "pagedserve.checkTensorParallel" -}}
{{- if not (semverCompare ">=1.28.0-0" .Capabilities.KubeVersion.Version) -}}
{{- fail "worker.tensorParallelSize > 1 needs Kubernetes >= 1.28 (a rank is its pod's apps.kubernetes.io/pod-index label)" -}}
{{- end -}}
{{- end -}}

{{/* The worker pod template. (dict "root" $) for independent workers, (dict "root" $ "group" g)
     for the ranks of group g. */}}
{{- define "pagedserve.workerPod" -}}
{{- $root := .root -}}
{{- $c := $root.Values.worker -}}
{{- $ctx := dict "root" $root "component" "worker" -}}
{{- $grouped := hasKey . "group" -}}
metadata:
  {{- include "pagedserve.podAnnotations" (dict "root" $root "c" $c) | nindent 2 }}
  labels:
    {{- include "pagedserve.labels" $ctx | nindent 4 }}
    {{- if $grouped }}
    pagedserve.io/worker-group: {{ .group | quote }}
    {{- end }}
    {{- with $c.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- include "pagedserve.podCommon" (dict "root" $root "c" $c) | nindent 2 }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: worker
      {{- include "pagedserve.image" (dict "root" $root "image" $c.image) | nindent 6 }}
      args:
        - worker
        - --host
        - 0.0.0.0
        - --port
        - {{ $c.port | quote }}
        - --metrics-port
        - {{ $c.metricsPort | quote }}
        {{- include "pagedserve.modelArgs" $root | nindent 8 }}
        - --gpu-memory-utilization
        - {{ $c.gpuMemoryUtilization | quote }}
        - --swap-space
        - {{ $c.swapSpaceGiB | quote }}
        {{- include "pagedserve.tlsArgs" $ctx | nindent 8 }}
        {{- include "pagedserve.logArgs" $root | nindent 8 }}
        {{- if $grouped }}
        - --worker-id
        - {{ include "pagedserve.workerGroupName" . | quote }}
        - --tensor-parallel-size
        - {{ $c.tensorParallelSize | quote }}
        - --tensor-parallel-master
        - {{ include "pagedserve.tensorParallelMaster" . | quote }}
        - --tensor-parallel-timeout-s
        - {{ $c.tensorParallelTimeoutSeconds | quote }}
        {{- end }}
        {{- with $c.extraArgs }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if or $c.env $grouped }}
      env:
        {{- if $grouped }}
        # The rank (--tensor-parallel-rank) is the pod's ordinal: 0 leads the group.
        - name: PAGEDSERVE_WORKER_TENSOR_PARALLEL_RANK
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        {{- end }}
        {{- with $c.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      {{- include "pagedserve.ports" $c | nindent 6 }}
        {{- if $grouped }}
        - name: rendezvous
          containerPort: {{ $c.tensorParallelPort }}
          protocol: TCP
        {{- end }}
      {{- include "pagedserve.grpcProbes" (dict "port" $c.port "probes" $c.probes "tls" $root.Values.tls.enabled) | nindent 6 }}
      resources:
        {{- $res := deepCopy $c.resources }}
        {{- if gt (int $c.gpu.count) 0 }}
        {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int $c.gpu.count)) (default dict $res.limits)) }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        {{- include "pagedserve.modelMount" $root | nindent 8 }}
        {{- include "pagedserve.tlsMount" $root | nindent 8 }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $c.shmSizeLimit }}
    {{- include "pagedserve.modelVolume" $root | nindent 4 }}
    {{- include "pagedserve.tlsVolume" $ctx | nindent 4 }}
{{- end -}}
