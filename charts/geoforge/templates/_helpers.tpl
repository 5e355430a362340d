{{/* Chart name. */}}
{{- define "geoforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of the release's objects: the operator Deployment, its Service and RBAC. */}}
{{- define "geoforge.fullname" -}}
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

{{- define "geoforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "geoforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "geoforge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "geoforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: geoforge
{{- end -}}

{{- define "geoforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "geoforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator image; also the default sidecar image. */}}
{{- define "geoforge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* "true" when leader election is on: more than one replica, or forced on. */}}
{{- define "geoforge.leaderElection" -}}
{{- if or (gt (int .Values.replicas) 1) .Values.leaderElection.enabled -}}true{{- else -}}false{{- end -}}
{{- end -}}

{{/* In-cluster URL of the proxy-config API (what the sidecars of local secondaries poll). */}}
{{- define "geoforge.proxyConfigUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "geoforge.fullname" .) .Release.Namespace (int .Values.proxyConfig.port) -}}
{{- end -}}
