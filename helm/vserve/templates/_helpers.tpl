{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "vserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vserve.fullname" -}}
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

{{- define "vserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels that select the serving pods (Deployment, Service, PDB, ServiceMonitor via the
     Service). The component label keeps the `helm test` pod out of the Service. */}}
{{- define "vserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "vserve.labels" -}}
helm.sh/chart: {{ include "vserve.chart" . }}
{{ include "vserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vserve
{{- end }}

{{- define "vserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vserve.image" -}}
{{- $tag := .Values.image.tag | default (ternary (printf "%s-cuda" .Chart.AppVersion) .Chart.AppVersion .Values.gpu.enabled) -}}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* GPUs per pod: gpu.count, else dataParallelSize x tensorParallelSize. */}}
{{- define "vserve.gpuCount" -}}
{{- if gt (int .Values.gpu.count) 0 }}{{ int .Values.gpu.count }}{{ else }}{{ mul (int .Values.server.dataParallelSize) (int .Values.server.tensorParallelSize) }}{{ end }}
{{- end }}

{{/* The model argument of `vserve serve`. */}}
{{- define "vserve.modelArg" -}}
{{- $s := .Values.model.storage -}}
{{- if eq $s.type "none" -}}
{{- .Values.model.name -}}
{{- else if $s.subPath -}}
{{- printf "%s/%s" (trimSuffix "/" $s.mountPath) (trimPrefix "/" $s.subPath) -}}
{{- else -}}
{{- $s.mountPath -}}
{{- end -}}
{{- end }}

{{/* terminationGracePeriodSeconds: computed, or the user's value checked against the drain. */}}
{{- define "vserve.terminationGracePeriodSeconds" -}}
{{- $drain := add (int .Values.preStopSleepSeconds) (int (ceil .Values.server.shutdownTimeoutSeconds)) -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $drain (int .Values.terminationGraceMarginSeconds) -}}
{{- else -}}
{{- $grace := int .Values.terminationGracePeriodSeconds -}}
{{- if le $grace (add $drain 5) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds (%d) + server.shutdownTimeoutSeconds (%v) + 5 = %d: Kubernetes would SIGKILL vserve while it drains in-flight requests. Raise it, lower server.shutdownTimeoutSeconds, or leave it null to have it computed." $grace (int .Values.preStopSleepSeconds) .Values.server.shutdownTimeoutSeconds (add $drain 5)) -}}
{{- end -}}
{{- $grace -}}
{{- end -}}
{{- end }}

{{/* Checks the schema cannot express; each fails rendering with the fix in its message. */}}
{{- define "vserve.validate" -}}
{{- $v := .Values -}}
{{- if and $v.gpu.enabled (ne (int $v.server.tensorParallelSize) 1) -}}
{{- fail (printf "server.tensorParallelSize=%v with gpu.enabled: vserve's tensor parallelism runs on CPU only so far (tensor parallel size 1 on GPUs); scale with server.dataParallelSize instead" $v.server.tensorParallelSize) -}}
{{- end -}}
{{- $managed := list "--host" "--port" "--uds" "--api-server-count" "-asc" "--data-parallel-size" "-dp" "--tensor-parallel-size" "-tp" "--shutdown-timeout" "--served-model-name" "--headless" "--cpu-threads" -}}
{{- range $v.server.extraArgs -}}
{{- $flag := regexReplaceAll "=.*$" (toString .) "" -}}
{{- if has $flag $managed -}}
{{- fail (printf "server.extraArgs must not contain %s: the chart sets it (see server.*, model.servedModelName) and derives the probes, the Service and the grace period from it" $flag) -}}
{{- end -}}
{{- end -}}
{{- $s := $v.model.storage -}}
{{- if and (eq $s.type "pvc") (not $s.pvc.claimName) -}}
{{- fail "model.storage.type=pvc needs model.storage.pvc.claimName" -}}
{{- end -}}
{{- if and (eq $s.type "hostPath") (not $s.hostPath.path) -}}
{{- fail "model.storage.type=hostPath needs model.storage.hostPath.path" -}}
{{- end -}}
{{- if and (eq $s.type "download") (not $s.download.repoId) -}}
{{- fail "model.storage.type=download needs model.storage.download.repoId (a Hugging Face repo id)" -}}
{{- end -}}
{{- if and (eq $s.type "none") (not $v.model.name) -}}
{{- fail "model.name is empty: set it (\"demo\", a hub id or a path in the image) or choose a model.storage.type" -}}
{{- end -}}
{{- if and (ne $s.type "none") $v.model.name (ne $v.model.name "demo") -}}
{{- fail (printf "model.name=%q is ignored with model.storage.type=%s (the chart serves the mounted directory); leave model.name empty and use model.servedModelName to name it" $v.model.name $s.type) -}}
{{- end -}}
{{- if and $v.podDisruptionBudget.enabled (not (include "vserve.pdbMinAvailable" .)) (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable) -}}
{{- fail "podDisruptionBudget: set maxUnavailable or minAvailable (or enabled: false)" -}}
{{- end -}}
{{- if $v.autoscaling.enabled -}}
{{- if gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas) -}}
{{- fail (printf "autoscaling.minReplicas (%v) > autoscaling.maxReplicas (%v)" $v.autoscaling.minReplicas $v.autoscaling.maxReplicas) -}}
{{- end -}}
{{- if and (eq $v.autoscaling.metric "cpu") (not (dig "requests" "cpu" "" $v.resources)) -}}
{{- fail "autoscaling.metric=cpu needs resources.requests.cpu: utilisation is measured against the request" -}}
{{- end -}}
{{- end -}}
{{- if and $v.gpu.enabled (lt (int (include "vserve.gpuCount" .)) (mul (int $v.server.dataParallelSize) (int $v.server.tensorParallelSize))) -}}
{{- fail (printf "gpu.count=%v is fewer than dataParallelSize x tensorParallelSize = %d: each engine needs its own GPU" $v.gpu.count (mul (int $v.server.dataParallelSize) (int $v.server.tensorParallelSize))) -}}
{{- end -}}
{{- end }}


{{/* PDB minAvailable when set (it then wins over maxUnavailable); "" otherwise. Not relying on
     a null in a values file deleting the default: `helm lint` does not do that. */}}
{{- define "vserve.pdbMinAvailable" -}}
{{- $m := .Values.podDisruptionBudget.minAvailable -}}
{{- if and (not (kindIs "invalid" $m)) (ne (toString $m) "") -}}{{ $m }}{{- end -}}
{{- end }}

{{/*
torch CPU threads per engine process: server.cpuThreads, else the whole CPUs of
resources.requests.cpu ("2", 2, "2500m") less one, divided among the engines' processes
(dataParallelSize x tensorParallelSize; at least 1);
empty when neither is set (the engine then sizes itself from its cgroup and affinity).
*/}}
{{- define "vserve.cpuThreads" -}}
{{- if .Values.server.cpuThreads -}}
{{- .Values.server.cpuThreads -}}
{{- else -}}
{{- $req := dig "requests" "cpu" "" (.Values.resources | default dict) | toString -}}
{{- if $req -}}
{{- $milli := 0 -}}
{{- if hasSuffix "m" $req -}}
{{- $milli = trimSuffix "m" $req | int -}}
{{- else -}}
{{- $milli = mulf (float64 $req) 1000.0 | int -}}
{{- end -}}
{{- max 1 (div (sub (div $milli 1000) 1) (max 1 (mul (int .Values.server.dataParallelSize) (int .Values.server.tensorParallelSize)))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
