{{/* Names, labels, and the pieces every pod shares. */}}

{{- define "swaserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "swaserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* selector labels of one component: dict "root" $ "component" "router" */}}
{{- define "swaserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "swaserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "swaserve.labels" -}}
{{ include "swaserve.selectorLabels" . }}
app.kubernetes.io/part-of: swaserve
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "swaserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) .Values.image.tag) -}}
{{- end -}}

{{- define "swaserve.serviceAccountName" -}}
{{- default (printf "%s-router" (include "swaserve.fullname" .)) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "swaserve.redisHost" -}}
{{- printf "%s-redis" (include "swaserve.fullname" .) -}}
{{- end -}}

{{- define "swaserve.redisSecretName" -}}
{{- default (printf "%s-redis" (include "swaserve.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{- define "swaserve.internalTokenSecretName" -}}
{{- default (printf "%s-internal-token" (include "swaserve.fullname" .)) .Values.security.internalToken.existingSecret -}}
{{- end -}}

{{/* internal gRPC security for every service (services/common/grpc_auth.py reads these) */}}
{{- define "swaserve.securityEnv" -}}
{{- $t := .Values.security.internalToken -}}
{{- if $t.enabled }}
- name: SWASERVE_INTERNAL_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "swaserve.internalTokenSecretName" . }}
      key: {{ $t.existingSecretKey }}
{{- end }}
{{- with .Values.security.internalTls }}
{{- if .existingSecret }}
- name: SWASERVE_TLS_CERT
  value: /etc/swaserve/tls/tls.crt
- name: SWASERVE_TLS_KEY
  value: /etc/swaserve/tls/tls.key
- name: SWASERVE_TLS_CA
  value: /etc/swaserve/tls/ca.crt
- name: SWASERVE_TLS_SERVER_NAME
  value: {{ .serverName | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "swaserve.tlsMount" -}}
{{- if .Values.security.internalTls.existingSecret }}
- name: internal-tls
  mountPath: /etc/swaserve/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "swaserve.tlsVolume" -}}
{{- if .Values.security.internalTls.existingSecret }}
- name: internal-tls
  secret:
    secretName: {{ .Values.security.internalTls.existingSecret }}
    defaultMode: 0440  # group: the pods' fsGroup
{{- end }}
{{- end -}}

{{/* the router's API key flags (services/router/auth_args.py) */}}
{{- define "swaserve.apiKeyArgs" -}}
{{- $k := .Values.security.apiKeys -}}
{{- if $k.enabled -}}
{{- if eq $k.store "redis" -}}
- --api-keys-redis
{{- else -}}
- --api-keys=/etc/swaserve/api-keys/{{ $k.existingSecretKey }}
{{- end }}
- --api-key-refresh={{ $k.refreshSeconds }}
{{- end -}}
{{- end -}}

{{/* deep merge: dict b over dict a (maps merge, everything else replaces; unlike mergeOverwrite,
     a zero value such as 0, false or "" does replace). Returns JSON. */}}
{{- define "swaserve.deepMerge" -}}
{{- $out := deepCopy (index . 0) -}}
{{- range $k, $v := index . 1 -}}
{{- $old := get $out $k -}}
{{- if and (kindIs "map" $v) (kindIs "map" $old) -}}
{{- $_ := set $out $k (include "swaserve.deepMerge" (list $old $v) | fromJson) -}}
{{- else -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* the model's path inside every pod */}}
{{- define "swaserve.modelPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.models.mountPath) .Values.models.name -}}
{{- end -}}

{{- define "swaserve.servedName" -}}
{{- default .Values.models.name .Values.models.servedName -}}
{{- end -}}

{{/* the env every swaserve container gets: who it is, and where Redis is (REDIS_URL) */}}
{{- define "swaserve.env" -}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: SWASERVE_HOME
  value: /var/lib/swaserve
- name: PYTHONUNBUFFERED
  value: "1"
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "swaserve.redisSecretName" . }}
      key: {{ .Values.redis.auth.existingSecretKey }}
- name: REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:%d/0" (include "swaserve.redisHost" .) (int64 .Values.redis.port) | quote }}
{{- else if .Values.redis.external.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- else }}
- name: REDIS_URL
  value: {{ .Values.redis.external.url | quote }}
{{- end }}
{{- with (include "swaserve.securityEnv" . | trim) }}
{{ . }}
{{- end }}
{{- end -}}

{{/* user env after ours: dict "root" $ "spec" $spec */}}
{{- define "swaserve.extraEnv" -}}
{{- range .spec.extraEnv }}
- name: {{ .name }}
  value: {{ .value | quote }}
{{- end }}
{{- end -}}

{{/* resources with the GPU count folded into limits; every quantity a string (server-side apply
     refuses numbers there) */}}
{{- define "swaserve.resources" -}}
{{- $out := dict -}}
{{- range $kind := list "requests" "limits" -}}
{{- $q := dict -}}
{{- range $k, $v := (index $.resources $kind | default dict) }}{{ $_ := set $q $k (toString $v) }}{{ end -}}
{{- if and (eq $kind "limits") (gt (int64 (default 0 $.gpus)) 0) }}{{ $_ := set $q "nvidia.com/gpu" (toString (int64 $.gpus)) }}{{ end -}}
{{- with $q }}{{ $_ := set $out $kind . }}{{ end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* nodeSelector, tolerations, affinity, priorityClassName of a pod spec */}}
{{- define "swaserve.placement" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
{{- range . }}
- {{- with .key }}
  key: {{ . | quote }}
  {{- end }}
  operator: {{ .operator }}
  {{- with .value }}
  value: {{ . | quote }}
  {{- end }}
  {{- with .effect }}
  effect: {{ . }}
  {{- end }}
  {{- if hasKey . "tolerationSeconds" }}
  tolerationSeconds: {{ int64 .tolerationSeconds }}
  {{- end }}
{{- end }}
{{- end }}
{{- $aff := dict -}}
{{- range $k, $v := (default dict .affinity) }}{{ if $v }}{{ $_ := set $aff $k $v }}{{ end }}{{ end -}}
{{- with $aff }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* the three probes: dict "probes" $spec.probes "startup" HANDLER "liveness" HANDLER "readiness" HANDLER
     (a handler is a YAML snippet: httpGet or tcpSocket) */}}
{{- define "swaserve.probes" -}}
{{- range $kind := list "startup" "liveness" "readiness" }}
{{- $p := index $.probes $kind }}
{{ $kind }}Probe:
  {{- index $ $kind | nindent 2 }}
  initialDelaySeconds: {{ int64 $p.initialDelaySeconds }}
  periodSeconds: {{ int64 $p.periodSeconds }}
  timeoutSeconds: {{ int64 $p.timeoutSeconds }}
  failureThreshold: {{ int64 $p.failureThreshold }}
{{- end }}
{{- end -}}

{{- define "swaserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
{{- end -}}

{{- define "swaserve.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "swaserve.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
- name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* the model volume (read-only checkpoint, or an emptyDir the init container fills) */}}
{{- define "swaserve.modelVolume" -}}
- name: models
{{- if eq .Values.models.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.models.pvc.claimName | default (printf "%s-models" (include "swaserve.fullname" .)) }}
    readOnly: true
{{- else if eq .Values.models.source "hostPath" }}
  hostPath:
    path: {{ .Values.models.hostPath }}
    type: Directory
{{- else }}
  emptyDir: {}
{{- end }}
- name: home
  emptyDir: {}
{{- end -}}

{{- define "swaserve.modelMount" -}}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: {{ ne .Values.models.source "builtin" }}
- name: home
  mountPath: /var/lib/swaserve
{{- end -}}

{{/* builtin models: an init container writes the model (seeded: every pod gets the same weights) */}}
{{- define "swaserve.modelInit" -}}
{{- if eq .Values.models.source "builtin" }}
initContainers:
- name: model
  image: {{ include "swaserve.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if eq .Values.models.name "smollm2" }}
  args: ["model", "import-gguf", "--out", {{ include "swaserve.modelPath" . | quote }}]
  {{- else }}
  args: ["model", "init", "--preset", {{ .Values.models.name | quote }}, "--seed", "0", "--out", {{ include "swaserve.modelPath" . | quote }}]
  {{- end }}
  env:
  - name: SWASERVE_HOME
    value: /var/lib/swaserve
  securityContext:
    {{- with (include "swaserve.containerSecurityContext" . | trim) }}{{ . | nindent 4 }}{{ end }}
  volumeMounts:
    {{- with (include "swaserve.modelMount" . | trim) }}{{ . | nindent 4 }}{{ end }}
{{- end }}
{{- end -}}

{{/* One worker Deployment (prefill pool or decode): dict "root" $ "role" "prefill"|"decode" "spec" $merged
     "pool" $pool (prefill only). The image's entrypoint is `tini -- swaserve`: args start with the service. */}}
{{- define "swaserve.workerDeployment" -}}
{{- $root := .root -}}
{{- $s := .spec -}}
{{- $e := $s.engine -}}
{{- $ctx := dict "root" $root "component" .role -}}
{{- $name := printf "%s-%s" (include "swaserve.fullname" $root) .role -}}
{{- if .pool }}{{ $name = printf "%s-%s" $name .pool.name }}{{ end -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- with (include "swaserve.labels" $ctx | trim) }}{{ . | nindent 4 }}{{ end }}
    {{- with .pool }}
    swaserve.io/bucket: {{ .name }}
    {{- end }}
spec:
  replicas: {{ int64 $s.replicas }}
  selector:
    matchLabels:
      {{- with (include "swaserve.selectorLabels" $ctx | trim) }}{{ . | nindent 6 }}{{ end }}
      {{- with .pool }}
      swaserve.io/bucket: {{ .name }}
      {{- end }}
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxUnavailable: 0, maxSurge: 1}
  template:
    metadata:
      labels:
        {{- with (include "swaserve.labels" $ctx | trim) }}{{ . | nindent 8 }}{{ end }}
        {{- with .pool }}
        swaserve.io/bucket: {{ .name }}
        swaserve.io/min-tokens: {{ int64 .minTokens | quote }}
        swaserve.io/max-tokens: {{ int64 .maxTokens | quote }}
        {{- end }}
        {{- with $s.podLabels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        swaserve.io/grpc-port: "7000"
        swaserve.io/metrics-port: "9090"
        {{- with $s.podAnnotations }}{{ toYaml . | nindent 8 }}{{ end }}
    spec:
      terminationGracePeriodSeconds: {{ int64 $s.terminationGracePeriodSeconds }}
      automountServiceAccountToken: false
      {{- if and (eq .role "prefill") $root.Values.gcache.enabled $root.Values.gcache.sameHostShm }}
      hostPID: true
      {{- end }}
      securityContext:
        {{- with (include "swaserve.podSecurityContext" $root | trim) }}{{ . | nindent 8 }}{{ end }}
      {{- with (include "swaserve.imagePullSecrets" $root | trim) }}{{ . | nindent 6 }}{{ end }}
      {{- with (include "swaserve.modelInit" $root | trim) }}{{ . | nindent 6 }}{{ end }}
      {{- with (include "swaserve.placement" $s | trim) }}{{ . | nindent 6 }}{{ end }}
      containers:
      - name: {{ .role }}
        image: {{ include "swaserve.image" $root }}
        imagePullPolicy: {{ $root.Values.image.pullPolicy }}
        args:
        - {{ .role }}
        - --model={{ include "swaserve.modelPath" $root }}
        - --host=0.0.0.0
        - --port=7000
        - --advertise-host=$(POD_IP)
        - --metrics-port=9090
        - --redis-url=$(REDIS_URL)
        - --page-size={{ int64 $e.pageSize }}
        - --max-total-tokens={{ int64 $e.maxTotalTokens }}
        - --chunk-size={{ int64 $e.chunkSize }}
        - --max-batch-tokens={{ int64 $e.maxBatchTokens }}
        - --max-running={{ int64 $e.maxRunning }}
        {{- with $e.queuePolicy }}
        - --queue-policy={{ . }}
        {{- end }}
        {{- if not $e.prefixCache }}
        - --no-prefix-cache
        {{- end }}
        {{- if gt (int64 $e.hostKvTokens) 0 }}
        - --host-kv-tokens={{ int64 $e.hostKvTokens }}
        {{- end }}
        - --dtype={{ $e.dtype }}
        {{- if gt (int64 $e.torchThreads) 0 }}
        - --torch-threads={{ int64 $e.torchThreads }}
        {{- end }}
        {{- if eq .role "prefill" }}
        - --bucket={{ .pool.name }}
        - --kv-transport={{ $s.kvTransport }}
        - --timeout={{ $s.timeout }}
        {{- if not $s.kvEvents }}
        - --no-kv-events
        {{- end }}
        {{- if $root.Values.gcache.enabled }}
        - --gcache-redis-url=$(REDIS_URL)
        {{- end }}
        {{- else }}
        - --reserve-ttl={{ $s.reserveTtl }}
        - --pending-ttl={{ $s.pendingTtl }}
        - --kv-wait={{ $s.kvWait }}
        {{- end }}
        {{- range $s.extraArgs }}
        - {{ . | quote }}
        {{- end }}
        env:
          {{- with (include "swaserve.env" $root | trim) }}{{ . | nindent 10 }}{{ end }}
          - name: SWASERVE_WORKER_ID
            value: $(POD_NAME)
          {{- if and (eq .role "prefill") $root.Values.gcache.enabled $root.Values.gcache.sameHostShm }}
          - name: SWASERVE_HOST_ID
            value: $(NODE_NAME)
          {{- end }}
          {{- with (include "swaserve.extraEnv" (dict "spec" $s) | trim) }}{{ . | nindent 10 }}{{ end }}
        ports:
        - {name: grpc, containerPort: 7000, protocol: TCP}
        - {name: metrics, containerPort: 9090, protocol: TCP}
        {{- include "swaserve.probes" (dict "probes" $s.probes "startup" "httpGet: {path: /health, port: metrics}" "liveness" "httpGet: {path: /health, port: metrics}" "readiness" "httpGet: {path: /ready, port: metrics}") | trim | nindent 8 }}
        resources:
          {{- with (include "swaserve.resources" (dict "resources" $s.resources "gpus" $s.gpus) | trim) }}{{ . | nindent 10 }}{{ end }}
        securityContext:
          {{- with (include "swaserve.containerSecurityContext" $root | trim) }}{{ . | nindent 10 }}{{ end }}
        volumeMounts:
          {{- with (include "swaserve.modelMount" $root | trim) }}{{ . | nindent 10 }}{{ end }}
          {{- with (include "swaserve.tlsMount" $root | trim) }}{{ . | nindent 10 }}{{ end }}
          - name: dshm
            mountPath: /dev/shm
      volumes:
        {{- with (include "swaserve.modelVolume" $root | trim) }}{{ . | nindent 8 }}{{ end }}
        {{- with (include "swaserve.tlsVolume" $root | trim) }}{{ . | nindent 8 }}{{ end }}
        - name: dshm
          {{- if and (eq .role "prefill") $root.Values.gcache.enabled $root.Values.gcache.sameHostShm }}
          hostPath: {path: /dev/shm, type: Directory}
          {{- else }}
          emptyDir: {medium: Memory, sizeLimit: {{ $s.shmSize | toString | quote }}}
          {{- end }}
{{- end -}}

{{/* how the router finds workers */}}
{{- define "swaserve.routerDiscoveryArgs" -}}
{{- if eq .Values.router.discovery "kubernetes" -}}
- --discovery=kubernetes
- --k8s-namespace=$(POD_NAMESPACE)
- --k8s-label-selector=app.kubernetes.io/name={{ include "swaserve.name" . }},app.kubernetes.io/instance={{ .Release.Name }}
{{- else -}}
- --discovery=redis
{{- end -}}
{{- end -}}
