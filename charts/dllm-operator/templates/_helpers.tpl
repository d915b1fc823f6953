{{- define "dllm-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dllm-operator.fullname" -}}
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

{{- define "dllm-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dllm-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dllm-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dllm-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dllm-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dllm-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dllm-serve
{{- end }}

{{/* Namespaces the operator watches when watch.scope=namespaced. */}}
{{- define "dllm-operator.watchNamespaces" -}}
{{- $ns := .Values.watch.namespaces }}
{{- if not $ns }}{{ $ns = list .Release.Namespace }}{{ end }}
{{- toJson $ns }}
{{- end }}

{{/*
The operator's permissions: files/rbac-rules.yaml, copied by hack/render-manifests.py from
manifests/operator/rbac.yaml (the one list, owned by the operator; tests/charts checks the copy).
*/}}
{{- define "dllm-operator.rules" -}}
{{ .Files.Get "files/rbac-rules.yaml" }}
{{- end }}

{{/* Resources that are cluster-scoped: their rules always live in a ClusterRole. */}}
{{- define "dllm-operator.clusterScopedResources" -}}
[customresourcedefinitions, namespaces, clusterservingruntimes]
{{- end }}
