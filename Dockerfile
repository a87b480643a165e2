# syntax=docker/dockerfile:1
# qbert runtime image for KubeRay head/worker pods, RayJob submitters and local GPU runs.
#   docker build -t ghcr.io/example/qbert:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
# The package set is exactly pyproject.toml's [project.dependencies]: torch/torchvision come
# from the PyTorch index of the CUDA build matching the base image, and the constraints file
# only pins versions (Ray must equal the RayCluster's rayVersion). No credentials are baked
# in: S3 / MLflow / Ray-token settings arrive as environment variables at run time.

ARG CUDA_VERSION=13.0.0
ARG UBUNTU_VERSION=24.04

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

FROM base AS build
# torch's CUDA build tag must match CUDA_VERSION (cu130 <-> 13.0): checked by tests/test_dockerfile.py.
ARG TORCH_CUDA=cu130
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG RAY_VERSION=2.60.0
ARG MLFLOW_VERSION=3.17.2
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN printf 'torch==%s\ntorchvision==%s\nray==%s\nmlflow==%s\n' \
      "${TORCH_VERSION}" "${TORCHVISION_VERSION}" "${RAY_VERSION}" "${MLFLOW_VERSION}" > /tmp/constraints.txt
RUN pip install --constraint /tmp/constraints.txt \
      --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" torch torchvision
COPY pyproject.toml README.md /src/
COPY qbert /src/qbert
RUN pip install --constraint /tmp/constraints.txt /src \
 && pip check

FROM base AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=https://github.com/example/qbert
LABEL org.opencontainers.image.title="qbert" \
      org.opencontainers.image.description="Q-BERT4Rec: quantized semantic-ID multimodal sequential recommendation on Ray" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid so Kubernetes can verify runAsNonRoot (the charts use 10001).
RUN groupadd --gid 10001 qbert \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/qbert --shell /bin/bash qbert
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=10001:10001 ray_jobs /app/ray_jobs
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/qbert \
    RAY_USAGE_STATS_ENABLED=0
USER 10001:10001
# KubeRay replaces the command with `ray start ...`; tini reaps zombies for plain runs.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["qbert", "--help"]
