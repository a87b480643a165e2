{{/*
Names. fullname is capped at 30 characters so that "<fullname>-extract-features" stays within
KubeRay's 47-character RayJob name limit (RayCluster names: 53) and every name is a DNS-1035
label.
*/}}
{{- define "qbert-stack.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 30 | trimSuffix "-" -}}
{{- end -}}

{{- define "qbert-stack.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "qbert-stack.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "qbert-stack.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: qbert
{{- end -}}

{{/* selectorLabels: call with (dict "ctx" $ "component" "mlflow") */}}
{{- define "qbert-stack.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qbert-stack.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "qbert-stack.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "qbert-stack.rayClusterName" -}}
{{- include "qbert-stack.fullname" . -}}
{{- end -}}

{{- define "qbert-stack.raySaName" -}}
{{- printf "%s-ray" (include "qbert-stack.fullname" .) -}}
{{- end -}}

{{- define "qbert-stack.appSaName" -}}
{{- printf "%s-app" (include "qbert-stack.fullname" .) -}}
{{- end -}}

{{- define "qbert-stack.configMapName" -}}
{{- printf "%s-config" (include "qbert-stack.fullname" .) -}}
{{- end -}}

{{- define "qbert-stack.s3Endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s-minio:9000" (include "qbert-stack.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "qbert-stack.mlflowTrackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow:%d" (include "qbert-stack.fullname" .) (int .Values.mlflow.port) -}}
{{- else -}}
{{- .Values.mlflow.externalTrackingUri -}}
{{- end -}}
{{- end -}}

{{- define "qbert-stack.runDir" -}}
{{- default (printf "s3://%s/runs/default" .Values.s3.bucket) .Values.jobs.runDir -}}
{{- end -}}

{{/* S3 credentials and endpoint: by reference only (secretKeyRef), never values. */}}
{{- define "qbert-stack.s3Env" -}}
{{- if .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.secretAccessKeyKey }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- with (include "qbert-stack.s3Endpoint" .) }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Environment of every Ray container (head, workers): MLflow, S3, writable dirs. */}}
{{- define "qbert-stack.rayEnv" -}}
{{- with (include "qbert-stack.mlflowTrackingUri" .) }}
- name: MLFLOW_TRACKING_URI
  value: {{ . | quote }}
{{- end }}
{{- include "qbert-stack.mlflowClientAuthEnv" . }}
{{- include "qbert-stack.s3Env" . }}
- name: QBERT_CONFIG
  value: /etc/qbert/config.yaml
- name: HOME
  value: /home/qbert
- name: TMPDIR
  value: /tmp
{{- end -}}

{{- define "qbert-stack.rayVolumeMounts" -}}
- name: qbert-config
  mountPath: /etc/qbert
  readOnly: true
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/qbert
{{- end -}}

{{/* rayVolumes: call with (dict "ctx" $ "group" .Values.ray.worker) */}}
{{- define "qbert-stack.rayVolumes" -}}
- name: qbert-config
  configMap:
    name: {{ include "qbert-stack.configMapName" .ctx }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .group.shmSize }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .group.tmpSize }}
- name: home
  emptyDir:
    sizeLimit: 10Gi
{{- end -}}

{{/*
The RayCluster spec, shared by the RayCluster (shared mode) and every RayJob's
rayClusterSpec (ephemeral mode) so both run identical pods.
*/}}
{{- define "qbert-stack.rayClusterSpec" -}}
{{- $v := .Values -}}
rayVersion: {{ $v.ray.version | quote }}
{{- if $v.ray.auth.enabled }}
authOptions:
  mode: token
  {{- with $v.ray.auth.existingSecret }}
  secretName: {{ . }}
  {{- end }}
{{- end }}
enableInTreeAutoscaling: {{ $v.ray.autoscaler.enabled }}
{{- if $v.ray.autoscaler.enabled }}
autoscalerOptions:
  idleTimeoutSeconds: {{ $v.ray.autoscaler.idleTimeoutSeconds }}
  upscalingMode: {{ $v.ray.autoscaler.upscalingMode }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  resources:
    {{- toYaml $v.ray.autoscaler.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: home
      mountPath: /home/qbert
{{- end }}
headGroupSpec:
  serviceType: {{ $v.ray.head.serviceType }}
  rayStartParams:
    {{- toYaml $v.ray.head.rayStartParams | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "qbert-stack.labels" . | nindent 8 }}
        app.kubernetes.io/component: ray-head
    spec:
      serviceAccountName: {{ include "qbert-stack.raySaName" . }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      {{- with $v.ray.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.ray.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ include "qbert-stack.image" . }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          ports:
            - {name: gcs-server, containerPort: 6379}
            - {name: dashboard, containerPort: 8265}
            - {name: client, containerPort: 10001}
            - {name: metrics, containerPort: 8080}
          env:
            {{- include "qbert-stack.rayEnv" . | trim | nindent 12 }}
          resources:
            {{- toYaml $v.ray.head.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "qbert-stack.rayVolumeMounts" . | nindent 12 }}
      volumes:
        {{- include "qbert-stack.rayVolumes" (dict "ctx" . "group" $v.ray.head) | nindent 8 }}
workerGroupSpecs:
  - groupName: {{ $v.ray.worker.groupName }}
    replicas: {{ $v.ray.worker.replicas }}
    minReplicas: {{ $v.ray.worker.minReplicas }}
    maxReplicas: {{ $v.ray.worker.maxReplicas }}
    rayStartParams:
      {{- toYaml $v.ray.worker.rayStartParams | nindent 6 }}
    template:
      metadata:
        labels:
          {{- include "qbert-stack.labels" . | nindent 10 }}
          app.kubernetes.io/component: ray-worker
      spec:
        serviceAccountName: {{ include "qbert-stack.raySaName" . }}
        # Workers never call the Kubernetes API.
        automountServiceAccountToken: false
        {{- with $v.imagePullSecrets }}
        imagePullSecrets:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        securityContext:
          {{- toYaml $v.podSecurityContext | nindent 10 }}
        {{- with $v.ray.worker.nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $v.ray.worker.tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        containers:
          - name: ray-worker
            image: {{ include "qbert-stack.image" . }}
            imagePullPolicy: {{ $v.image.pullPolicy }}
            env:
              {{- include "qbert-stack.rayEnv" . | trim | nindent 14 }}
            resources:
              requests:
                {{- toYaml $v.ray.worker.resources.requests | nindent 16 }}
                nvidia.com/gpu: {{ $v.ray.worker.gpusPerWorker }}
              limits:
                {{- toYaml $v.ray.worker.resources.limits | nindent 16 }}
                nvidia.com/gpu: {{ $v.ray.worker.gpusPerWorker }}
            securityContext:
              {{- toYaml $v.containerSecurityContext | nindent 14 }}
            volumeMounts:
              {{- include "qbert-stack.rayVolumeMounts" . | nindent 14 }}
        volumes:
          {{- include "qbert-stack.rayVolumes" (dict "ctx" . "group" $v.ray.worker) | nindent 10 }}
{{- end -}}

{{/* NetworkPolicy peer: pods of this release with one of the components; call with (dict "instance" NAME "components" LIST) */}}
{{- define "qbert-stack.npPeer" -}}
- podSelector:
    matchExpressions:
      - {key: app.kubernetes.io/instance, operator: In, values: [{{ .instance | quote }}]}
      - {key: app.kubernetes.io/component, operator: In, values: [{{ join ", " .components }}]}
{{- end -}}

{{/* The MLflow login of Ray pods and submitters when the bundled MLflow has basic auth. */}}
{{- define "qbert-stack.mlflowClientAuthEnv" -}}
{{- if and .Values.mlflow.enabled .Values.mlflow.auth.enabled }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ .Values.mlflow.auth.existingSecret }}, key: {{ .Values.mlflow.auth.adminUsernameKey }}}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .Values.mlflow.auth.existingSecret }}, key: {{ .Values.mlflow.auth.adminPasswordKey }}}
{{- end }}
{{- end -}}
