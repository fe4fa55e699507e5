{{/*
Chart name, shortened to the 63 characters of a label value.
*/}}
{{- define "kco.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects. Cluster-scoped objects carry it too, so
two releases never share one.
*/}}
{{- define "kco.fullname" -}}
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

{{- define "kco.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "kco.labels" -}}
helm.sh/chart: {{ include "kco.chart" . }}
{{ include "kco.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kameleoon-cohort-operator
{{- end }}

{{/*
Labels that select the operator's Pods.
*/}}
{{- define "kco.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kco.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kco.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kco.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
"true" when leader election is on: as set, or when more than one replica runs.
*/}}
{{- define "kco.leaderElect" -}}
{{- if kindIs "bool" .Values.leaderElection.enabled }}
{{- if .Values.leaderElection.enabled }}true{{ end }}
{{- else if gt (int .Values.replicaCount) 1 }}true
{{- end }}
{{- end }}

{{- define "kco.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Rules of the operator's ClusterRole or of its Role in each watched namespace.
Each rule is there because the code makes that request:
- list and watch both kinds: the controllers' watches; get for single reads;
- patch on cohortsyncs: adding and removing the finalizer;
- patch on both status subresources: server-side apply of status;
- Secrets get: reading credentials; list and watch: noticing credential
  rotation (metadata only) and finding the member Secrets of a sync; create
  and delete: writing and replacing the member Secrets;
- events.k8s.io events create and patch: Events, patched when they repeat.
*/}}
{{- define "kco.operatorRules" -}}
- apiGroups: ["cohortsync.io"]
  resources: ["cohortsyncs", "kameleoonconnections"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["cohortsync.io"]
  resources: ["cohortsyncs"]
  verbs: ["patch"]
- apiGroups: ["cohortsync.io"]
  resources: ["cohortsyncs/status", "kameleoonconnections/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
`run` flags a duration, number or URL setting maps to, rendered only when set.
*/}}
{{- define "kco.operatorArgs" -}}
{{- $flags := dict
  "revalidateInterval" "--revalidate-interval"
  "failureBackoffBase" "--failure-backoff-base"
  "failureBackoffMax" "--failure-backoff-max"
  "requestAttempts" "--request-attempts"
  "requestRetryBase" "--request-retry-base"
  "requestTimeout" "--request-timeout"
  "maxBodyBytes" "--max-body-bytes"
  "exportsPerProject" "--exports-per-project"
  "kubeApiConcurrency" "--kube-api-concurrency"
  "progressInterval" "--progress-interval"
  "cohortCacheTtl" "--cohort-cache-ttl"
  "mixpanelUrl" "--mixpanel-url"
  "kameleoonApiUrl" "--kameleoon-api-url"
  "kameleoonDataUrl" "--kameleoon-data-url" }}
{{- range $key := keys $flags | sortAlpha }}
{{- $value := index $.Values.operator $key }}
{{- /* YAML numbers arrive as float64, which %v would print as 1.048576e+06. */}}
{{- if kindIs "float64" $value }}
{{- $value = int64 $value }}
{{- end }}
{{- if not (or (kindIs "invalid" $value) (eq (toString $value) "")) }}
- {{ printf "%s=%v" (index $flags $key) $value | quote }}
{{- end }}
{{- end }}
{{- if .Values.operator.countFollowUpPages }}
- "--count-follow-up-pages"
{{- end }}
{{- end }}
