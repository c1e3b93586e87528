{{/* Chart name. */}}
{{- define "larder.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name. */}}
{{- define "larder.fullname" -}}
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

{{/* Labels of every object. */}}
{{- define "larder.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "larder.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: larder
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: include with (list $ "proxy"). */}}
{{- define "larder.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "larder.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* The larder image reference. */}}
{{- define "larder.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Names of the components' objects. */}}
{{- define "larder.proxyName" -}}{{ include "larder.fullname" . }}-proxy{{- end -}}
{{- define "larder.webhookName" -}}{{ include "larder.fullname" . }}-webhook{{- end -}}
{{- define "larder.controllerName" -}}{{ include "larder.fullname" . }}-controller{{- end -}}
{{- define "larder.registryName" -}}{{ include "larder.fullname" . }}-registry{{- end -}}
{{- define "larder.certSecret" -}}{{ default (printf "%s-webhook-certs" (include "larder.fullname" .)) .Values.certs.secretName }}{{- end -}}

{{/* The cache registry's URL as the proxy and the controller reach it; empty when there is none. */}}
{{- define "larder.cacheRegistryUrl" -}}
{{- if .Values.cacheRegistry.enabled -}}
{{- printf "http://%s.%s.svc:%v" (include "larder.registryName" .) .Release.Namespace .Values.cacheRegistry.port -}}
{{- else -}}
{{- .Values.cacheRegistry.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* Whether the controller container runs: enabled, and a cache registry to copy into. */}}
{{- define "larder.controllerEnabled" -}}
{{- if and .Values.controller.enabled (include "larder.cacheRegistryUrl" .) -}}true{{- end -}}
{{- end -}}

{{/* Whether the controller may GET Secrets in every namespace: only when private images are
enabled (controller.privateImages), or implied by webhook.pullSecrets=derive, which already
grants the shared ServiceAccount get on Secrets everywhere and makes pods with pull secrets
managed. */}}
{{- define "larder.controllerReadsPullSecrets" -}}
{{- if and (include "larder.controllerEnabled" .) (or .Values.controller.privateImages (and .Values.webhook.enabled (eq .Values.webhook.pullSecrets "derive"))) -}}true{{- end -}}
{{- end -}}

{{/* Whether the controller runs the Precache readiness gate (patch on Nodes, narrowed by the
ValidatingAdmissionPolicy in readiness-gate.yaml). */}}
{{- define "larder.readinessGate" -}}
{{- if and (include "larder.controllerEnabled" .) .Values.controller.readinessGate.enabled -}}true{{- end -}}
{{- end -}}

{{/* Tolerations of a component that must run before a gated node is released: the given list,
plus the readiness gate's startup taint when the gate is on. Include with (list $ tolerations). */}}
{{- define "larder.tolerations" -}}
{{- $root := index . 0 -}}
{{- $tol := index . 1 | default list -}}
{{- if include "larder.readinessGate" $root -}}
{{- $tol = append $tol (dict "key" "larder.dev/precache-pending" "operator" "Exists" "effect" "NoSchedule") -}}
{{- end -}}
{{- with $tol }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* Whether the Deployment (webhook and/or controller) exists. */}}
{{- define "larder.deploymentEnabled" -}}
{{- if or .Values.webhook.enabled (include "larder.controllerEnabled" .) -}}true{{- end -}}
{{- end -}}

{{/* A restricted container securityContext for larder's own containers: include with (list uid gid). */}}
{{- define "larder.restrictedSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ index . 0 }}
runAsGroup: {{ index . 1 }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
