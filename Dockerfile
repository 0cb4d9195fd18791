# vserve container image.
#
#   CPU  (default): docker build -t vserve:0.1.0 .
#   CUDA          : docker build --build-arg VARIANT=cuda -t vserve:0.1.0-cuda .
#
# Run:  docker run -p 8000:8000 vserve:0.1.0 demo --api-server-count 2
# (ENTRYPOINT is `vserve serve`; arguments replace CMD — VSERVE_HOST=0.0.0.0 keeps the
# server reachable from outside the container even then.)
#
# Build arguments (see docs/design/deployment.md):
#   VARIANT          cpu | cuda: picks the base image and the default torch index.
#   CPU_BASE_IMAGE   base of the cpu variant (python:3.11-slim).
#   CUDA_BASE_IMAGE  base of the cuda variant (an NVIDIA CUDA runtime image; Python comes
#                    from the distribution; torch's wheels bring their own CUDA libraries,
#                    cuDNN and NCCL included). The legacy (non-BuildKit) builder builds every
#                    stage, this one too: without BuildKit, a CPU build needs this image
#                    pullable, or set it to the CPU base.
#   TORCH_VERSION    torch release to install (matches the Makefile's pin).
#   TORCH_CUDA       CUDA flavour of the cuda variant's torch wheels (cu130).
#   TORCH_INDEX_URL  where torch comes from. Empty: the PyTorch index of the variant,
#                    https://download.pytorch.org/whl/cpu or .../whl/${TORCH_CUDA}.
#   TORCH_FIND_LINKS optional extra wheel location (a directory URL) searched for torch,
#                    e.g. an internal mirror; scripts/docker-test.sh uses it on machines
#                    where download.pytorch.org is unreachable.
# The rest of vserve's dependencies come from the default index (PyPI, or PIP_INDEX_URL).

ARG VARIANT=cpu
ARG CPU_BASE_IMAGE=python:3.11-slim
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# ---- base images: one per variant; both leave `python3` (with venv) on PATH ----------------
FROM ${CPU_BASE_IMAGE} AS base-cpu

FROM ${CUDA_BASE_IMAGE} AS base-cuda
# The CUDA images carry no Python; the distribution's python3 (3.12 on Ubuntu 24.04) is fine:
# vserve needs 3.10+. Skipped when the image already has one.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---- builder: a virtual environment with torch and vserve ---------------------------------
# base-${VARIANT} is one of the stages above, not an image tag (hence DL3006 off).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
ARG TORCH_INDEX_URL=
ARG TORCH_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/sh", "-eu", "-c"]
RUN python3 -m venv /opt/venv
# torch first, in a layer of its own: it is most of the image and changes least often.
RUN case "${VARIANT}" in \
        cpu)  default_index=https://download.pytorch.org/whl/cpu ;; \
        cuda) default_index="https://download.pytorch.org/whl/${TORCH_CUDA}" ;; \
        *)    echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 1 ;; \
    esac; \
    index="${TORCH_INDEX_URL:-$default_index}"; \
    echo "torch==${TORCH_VERSION} from ${index}${TORCH_FIND_LINKS:+ and ${TORCH_FIND_LINKS}}"; \
    /opt/venv/bin/pip install --no-cache-dir --index-url "${index}" \
        ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vserve ./vserve
# Not editable: the final image holds no source tree. torch is already satisfied. torch/test
# holds C++ test binaries (~80 MB) that nothing imports.
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/vserve --version \
    && rm -rf /opt/venv/lib/python3*/site-packages/torch/test

# ---- runtime: the venv, a non-root user, nothing else --------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="vserve" \
      org.opencontainers.image.description="OpenAI-compatible LLM server (vserve), ${VARIANT} build" \
      org.opencontainers.image.licenses="Apache-2.0"
# UID/GID 10001: numeric, so that Kubernetes' runAsNonRoot can verify it; the home directory
# holds the Hugging Face cache and the demo model (~/.cache); Kubernetes mounts an emptyDir
# there because the root filesystem is read-only.
RUN groupadd --system --gid 10001 vserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/vserve --create-home \
        --shell /usr/sbin/nologin vserve
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VSERVE_HOST=0.0.0.0 \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/vserve \
    HF_HOME=/home/vserve/.cache/huggingface \
    TMPDIR=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VSERVE_HEALTHCHECK_URL=http://127.0.0.1:8000/health
USER 10001:10001
WORKDIR /home/vserve
EXPOSE 8000
# Liveness as Docker sees it (Kubernetes ignores this and uses the chart's probes). The start
# period covers loading a large model. Set VSERVE_HEALTHCHECK_URL when serving on another port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['VSERVE_HEALTHCHECK_URL'], timeout=4)"]
# vserve's supervisor runs as PID 1 and handles SIGTERM itself (drain, then exit 0). It waits
# for its own children; `docker run --init` adds a reaper for anything they orphan.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vserve", "serve"]
CMD ["demo", "--host", "0.0.0.0", "--port", "8000"]
