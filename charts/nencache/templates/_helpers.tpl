{{/* Base name of the release's objects. */}}
{{- define "nencache.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "nencache.selectorLabels" -}}
app.kubernetes.io/name: nencache-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "nencache.labels" -}}
{{ include "nencache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "nencache.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{- define "nencache.helperImage" -}}
{{- printf "%s:%s" .Values.agents.helperImage.repository (default .Chart.AppVersion .Values.agents.helperImage.tag) -}}
{{- end -}}

{{- define "nencache.webhookService" -}}
{{- printf "%s-webhook" (include "nencache.fullname" .) -}}
{{- end -}}

{{- define "nencache.webhookConfig" -}}
{{- include "nencache.fullname" . -}}
{{- end -}}
