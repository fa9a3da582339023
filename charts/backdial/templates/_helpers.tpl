{{/*
Names. The operator's objects have fixed names (the Services are part of the operator's TLS
names and of the URL injected into every acceptor), so the chart installs once per cluster.
*/}}
{{- define "backdial.operatorName" -}}backdial-operator{{- end }}
{{- define "backdial.webhookService" -}}backdial-webhook{{- end }}
{{- define "backdial.metricsService" -}}backdial-metrics-api{{- end }}
{{- define "backdial.tlsSecret" -}}backdial-operator-tls{{- end }}
{{- define "backdial.injectConfig" -}}backdial-inject{{- end }}

{{- define "backdial.serviceAccountName" -}}
{{- default (include "backdial.operatorName" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "backdial.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "backdial.labels" -}}
helm.sh/chart: {{ include "backdial.chart" . }}
{{ include "backdial.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: backdial
{{- end }}

{{/* Labels that select the operator's pods (never change them on upgrade). */}}
{{- define "backdial.selectorLabels" -}}
app.kubernetes.io/name: backdial
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* repository:tag or repository@digest of the operator's image. */}}
{{- /* Set by the acting operator replica on its own pod (operator/backdial/operator/role.py). */}}
{{- define "backdial.activeLabel" -}}
backdial.dev/operator-role: active
{{- end }}

{{- define "backdial.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{/* The image the webhook injects: inject.image.*, else the operator's image. */}}
{{- define "backdial.injectImage" -}}
{{- if or .Values.inject.image.repository .Values.inject.image.tag -}}
{{ .Values.inject.image.repository | default .Values.image.repository }}:{{ .Values.inject.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- else -}}
{{ include "backdial.image" . }}
{{- end }}
{{- end }}

{{/* The Service the acceptors dial for their config (SHAPES §2). */}}
{{- define "backdial.operatorURL" -}}
https://{{ include "backdial.operatorName" . }}.{{ .Release.Namespace }}.svc:{{ .Values.operator.ports.config }}
{{- end }}

{{/* Annotation that makes cert-manager's CA injector fill caBundle. */}}
{{- define "backdial.injectCAFrom" -}}
{{- if .Values.certManager.enabled }}
annotations:
  cert-manager.io/inject-ca-from: {{ .Release.Namespace }}/{{ include "backdial.tlsSecret" . }}
{{- end }}
{{- end }}
