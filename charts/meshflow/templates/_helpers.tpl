{{/*
Full name: the release name when it already says meshflow, else "<release>-meshflow".
*/}}
{{- define "meshflow.fullname" -}}
{{- if contains "meshflow" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-meshflow" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of the control plane's Deployment, Service, ServiceAccount, Role, PDB. */}}
{{- define "meshflow.controlPlane" -}}
{{- printf "%s-control-plane" (include "meshflow.fullname" .) -}}
{{- end -}}

{{/* Cluster-scoped names carry the namespace, so one release name may exist in several. */}}
{{- define "meshflow.controlPlane.clusterName" -}}
{{- printf "%s-%s" (include "meshflow.controlPlane" .) .Release.Namespace | trunc 253 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshflow.selectorLabels" -}}
app.kubernetes.io/name: meshflow
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end -}}

{{- define "meshflow.labels" -}}
{{ include "meshflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "meshflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "meshflow.controlPlane" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret the CA lives in: the user's, or the one the control plane generates. */}}
{{- define "meshflow.caSecretName" -}}
{{- default .Values.ca.secretName .Values.ca.existingSecret -}}
{{- end -}}

{{/* The MutatingWebhookConfiguration (cluster-scoped: carries the namespace). */}}
{{- define "meshflow.injector.webhookName" -}}
{{- printf "%s-injector-%s" (include "meshflow.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshflow.proxyImage" -}}
{{- printf "%s:%s" .Values.proxy.image.repository (default .Chart.AppVersion .Values.proxy.image.tag) -}}
{{- end -}}

{{- define "meshflow.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The SQLite file is on a claim (created here or existing). */}}
{{- define "meshflow.sqliteOnClaim" -}}
{{- if and (eq .Values.store.type "sqlite") .Values.store.sqlite.persistence.enabled -}}true{{- end -}}
{{- end -}}

{{- define "meshflow.sqliteClaimName" -}}
{{- default (printf "%s-store" (include "meshflow.controlPlane" .)) .Values.store.sqlite.persistence.existingClaim -}}
{{- end -}}

{{/*
Checks the schema cannot express with a readable message; included by the Deployment.
*/}}
{{- define "meshflow.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (ne .Values.store.type "postgres") -}}
{{- fail "replicas > 1 needs store.type=postgres: replicas cannot share one SQLite file (see ci/ha-values.yaml)" -}}
{{- end -}}
{{- if and (eq .Values.store.type "postgres") (not .Values.store.postgres.existingSecret) -}}
{{- fail "store.type=postgres needs store.postgres.existingSecret: the Secret holding the PostgreSQL URL" -}}
{{- end -}}
{{- end -}}
