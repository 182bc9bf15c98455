{{/* Chart name, at most 63 characters. */}}
{{- define "frouter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, with the chart name unless the release already has it. */}}
{{- define "frouter.fullname" -}}
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

{{- define "frouter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "frouter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "frouter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "frouter.labels" -}}
helm.sh/chart: {{ include "frouter.chart" . }}
{{ include "frouter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: failover-router
failover-router/datacenter: {{ include "frouter.datacenter" . | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The datacenter, required. */}}
{{- define "frouter.datacenter" -}}
{{- required "datacenter is required: one release per datacenter" .Values.datacenter }}
{{- end }}

{{- define "frouter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "frouter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "frouter.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "frouter.topologyConfigMap" -}}
{{- default (printf "%s-topology" (include "frouter.fullname" .)) .Values.existingTopologyConfigMap }}
{{- end }}

{{/*
Seconds of a topology duration, as the router reads it: "250ms", "1.5s", "2m", "1h" or a
number of seconds.
*/}}
{{- define "frouter.seconds" -}}
{{- $v := toString . | trim }}
{{- if hasSuffix "ms" $v }}
{{- divf (trimSuffix "ms" $v | trim | float64) 1000 }}
{{- else if hasSuffix "s" $v }}
{{- trimSuffix "s" $v | trim | float64 }}
{{- else if hasSuffix "m" $v }}
{{- mulf (trimSuffix "m" $v | trim | float64) 60 }}
{{- else if hasSuffix "h" $v }}
{{- mulf (trimSuffix "h" $v | trim | float64) 3600 }}
{{- else }}
{{- float64 $v }}
{{- end }}
{{- end }}

{{/*
The largest write deadline of the topology's clusters, in seconds (router/engine.py
write_deadline): a cluster's write_deadline, else max(60, 4 x (max_retries + 1) x write_timeout).
*/}}
{{- define "frouter.maxWriteDeadline" -}}
{{- $max := 60.0 }}
{{- if .Values.existingTopologyConfigMap }}
{{- $max = float64 .Values.assumedWriteDeadlineSeconds }}
{{- else }}
{{- range $name, $c := .Values.topology.clusters }}
{{- $d := 0.0 }}
{{- if and (hasKey $c "write_deadline") (not (kindIs "invalid" $c.write_deadline)) }}
{{- $d = include "frouter.seconds" $c.write_deadline | float64 }}
{{- else }}
{{- $timeout := 5.0 }}
{{- if and (hasKey $c "write_timeout") (not (kindIs "invalid" $c.write_timeout)) }}
{{- $timeout = include "frouter.seconds" $c.write_timeout | float64 }}
{{- end }}
{{- $retries := 3.0 }}
{{- if and (hasKey $c "max_retries") (not (kindIs "invalid" $c.max_retries)) }}
{{- $retries = float64 $c.max_retries }}
{{- end }}
{{- $d = maxf 60.0 (mulf 4.0 (addf $retries 1.0) $timeout) }}
{{- end }}
{{- $max = maxf $max $d }}
{{- end }}
{{- end }}
{{- $max }}
{{- end }}

{{/* terminationGracePeriodSeconds: the values' number, else the largest write deadline + margin. */}}
{{- define "frouter.gracePeriod" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- addf (include "frouter.maxWriteDeadline" . | float64) (float64 .Values.shutdownMarginSeconds) | ceil | int64 }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds | int64 }}
{{- end }}
{{- end }}

{{/* Where a secret is mounted: /etc/failover-router/secrets/<mountName or secretName>. */}}
{{- define "frouter.secretDir" -}}
{{- printf "/etc/failover-router/secrets/%s" (default .secretName .mountName) }}
{{- end }}
