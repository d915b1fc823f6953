{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "dllm-serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "dllm-serving.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* InferenceService name = served model name. KServe derives "<name>-predictor-..." from it, hence 45. */}}
{{- define "dllm-serving.modelName" -}}
{{- $n := default .Release.Name .Values.model.name }}
{{- if gt (len $n) 45 }}
{{- fail (printf "model.name %q is %d characters; KServe needs at most 45 (it appends -predictor-...)" $n (len $n)) }}
{{- end }}
{{- $n }}
{{- end }}

{{- define "dllm-serving.runtimeName" -}}
{{- default (include "dllm-serving.fullname" .) .Values.runtime.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dllm-serving.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "dllm-serving.cacheClaim" -}}
{{- default (printf "%s-model-cache" (include "dllm-serving.fullname" .)) .Values.cache.existingClaim }}
{{- end }}

{{/* Folder inside the cache claim: the repo id with "/" -> "--" (the Hub's own cache convention). */}}
{{- define "dllm-serving.cacheSubPath" -}}
{{- default (.Values.model.repoId | replace "/" "--") .Values.cache.subPath }}
{{- end }}

{{/* Written by the download Job after a complete download; the predictor's init container waits for it. */}}
{{- define "dllm-serving.doneMarker" -}}
.dllm-download-complete
{{- end }}

{{/* Job name: a hash of what it downloads, so a changed model starts a new Job (Job specs are immutable). */}}
{{- define "dllm-serving.downloadJobName" -}}
{{- $h := printf "%s@%s>%s/%s" .Values.model.repoId .Values.model.revision (include "dllm-serving.cacheClaim" .) (include "dllm-serving.cacheSubPath" .) | sha256sum | trunc 8 }}
{{- printf "%s-download-%s" (include "dllm-serving.fullname" . | trunc 43 | trimSuffix "-") $h }}
{{- end }}

{{/* storageUri of the InferenceService for each model.source. */}}
{{- define "dllm-serving.storageUri" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "download" }}
{{- printf "pvc://%s/%s" (include "dllm-serving.cacheClaim" .) (include "dllm-serving.cacheSubPath" .) }}
{{- else if eq $m.source "hf" }}
{{- if or (eq $m.revision "main") (eq $m.revision "") }}
{{- printf "hf://%s" $m.repoId }}
{{- else }}
{{- printf "hf://%s:%s" $m.repoId $m.revision }}
{{- end }}
{{- else }}
{{- required "model.storageUri is required when model.source=uri" $m.storageUri }}
{{- end }}
{{- end }}

{{- define "dllm-serving.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "dllm-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dllm-serve
{{- end }}

{{/* restricted-v2 (OpenShift) / "restricted" Pod Security: non-root, arbitrary UID, no escalation. */}}
{{- define "dllm-serving.containerSecurityContext" -}}
allowPrivilegeEscalation: false
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The predictor pods, for monitors and alert expressions. */}}
{{- define "dllm-serving.selectorMatch" -}}
serving.kserve.io/inferenceservice: {{ include "dllm-serving.modelName" . }}
{{- end }}
