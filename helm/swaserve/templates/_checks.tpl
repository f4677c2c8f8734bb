{{/* Cross-field rules values.schema.json cannot say. Included once, by router/deployment.yaml. */}}
{{- define "swaserve.checks" -}}
{{- /* length buckets: ordered, contiguous, no gaps or overlaps, distinct names */ -}}
{{- $prev := 0 -}}
{{- $names := dict -}}
{{- range $i, $p := .Values.prefill.pools -}}
{{- $min := int64 $p.minTokens -}}
{{- $max := int64 $p.maxTokens -}}
{{- if hasKey $names $p.name -}}
{{- fail (printf "prefill.pools[%d]: the name %q is used twice; each length bucket needs its own name" $i $p.name) -}}
{{- end -}}
{{- $_ := set $names $p.name true -}}
{{- if ne $min $prev -}}
{{- if eq $i 0 -}}
{{- fail (printf "prefill.pools[0] (%s): minTokens is %d, the first pool must start at 0" $p.name $min) -}}
{{- else if lt $min $prev -}}
{{- fail (printf "prefill.pools[%d] (%s): minTokens %d overlaps the previous pool, which ends at %d; set minTokens: %d" $i $p.name $min $prev $prev) -}}
{{- else -}}
{{- fail (printf "prefill.pools[%d] (%s): minTokens %d leaves a gap after the previous pool, which ends at %d; set minTokens: %d" $i $p.name $min $prev $prev) -}}
{{- end -}}
{{- end -}}
{{- if le $max $min -}}
{{- fail (printf "prefill.pools[%d] (%s): maxTokens %d must be above minTokens %d (pools are ordered by length)" $i $p.name $max $min) -}}
{{- end -}}
{{- $prev = $max -}}
{{- end -}}
{{- /* models */ -}}
{{- $m := .Values.models -}}
{{- if and (eq $m.source "builtin") (not (has $m.name (list "mimo-tiny" "smollm2"))) -}}
{{- fail (printf "models.name %q: a builtin model is mimo-tiny or smollm2; for your own checkpoint set models.source to pvc or hostPath" $m.name) -}}
{{- end -}}
{{- if and (eq $m.source "pvc") (not $m.pvc.claimName) (not $m.pvc.create) -}}
{{- fail "models.source pvc: set models.pvc.claimName (a PVC holding the checkpoint) or models.pvc.create: true" -}}
{{- end -}}
{{- if and (eq $m.source "hostPath") (not $m.hostPath) -}}
{{- fail "models.source hostPath: set models.hostPath (the directory holding models.name on every node)" -}}
{{- end -}}
{{- /* security */ -}}
{{- $k := .Values.security.apiKeys -}}
{{- if and $k.enabled (eq $k.store "secret") (not $k.existingSecret) -}}
{{- fail "security.apiKeys.store secret: set security.apiKeys.existingSecret (a Secret holding the file `swaserve keys add --file keys.json --name NAME` made), or use store: redis" -}}
{{- end -}}
{{- /* redis */ -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) -}}
{{- fail "redis.enabled is false: set redis.external.url or redis.external.existingSecret (swaserve needs a Redis)" -}}
{{- end -}}
{{- /* services not built yet */ -}}
{{- if .Values.encoder.enabled -}}
{{- fail "encoder.enabled: the multimodal encoder service is not built yet; leave it false" -}}
{{- end -}}
{{- /* L3 is restored through L2 */ -}}
{{- if .Values.gcache.enabled -}}
{{- range $p := .Values.prefill.pools -}}
{{- $spec := include "swaserve.deepMerge" (list $.Values.prefill.defaults (omit $p "name" "minTokens" "maxTokens")) | fromJson -}}
{{- if le (int64 $spec.engine.hostKvTokens) 0 -}}
{{- fail (printf "gcache.enabled: prefill pool %s needs engine.hostKvTokens > 0 (L3 is restored through L2); set prefill.defaults.engine.hostKvTokens" $p.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.router.hpa.enabled (lt (int64 .Values.router.hpa.maxReplicas) (int64 .Values.router.hpa.minReplicas)) -}}
{{- fail "router.hpa: maxReplicas must be >= minReplicas" -}}
{{- end -}}
{{- if and (eq .Values.router.discovery "kubernetes") (not .Values.rbac.create) (not .Values.serviceAccount.name) -}}
{{- fail "router.discovery kubernetes needs to list and watch pods: keep rbac.create, or name a serviceAccount that may" -}}
{{- end -}}
{{- end -}}
