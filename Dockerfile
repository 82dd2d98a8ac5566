# zostream engine image: gRPC on 50051, Prometheus /metrics on 9400.
#
# Build:  docker build -t zostream .
# Run:    docker run --gpus all --ulimit memlock=-1 \
#           -v /path/to/hf-model:/models:ro -v zostream-data:/data \
#           -p 50051:50051 -p 9400:9400 zostream [extra serve flags, e.g. --codec nf4]
#
# --ulimit memlock=-1 is needed: the streamer registers the read-only mmap of the model's
# safetensors with cudaHostRegister (page-locked, ~54 GB/s host->GPU). With the default
# memlock limit (8 MiB) registration fails and the engine falls back to a pinned staging
# ring (slower, extra host copies). deploy/docker-compose.yml sets it.
#
# The model folder is mounted READ-ONLY at /models: the base is never written (full-parameter
# jobs write a working copy into their job directory). All state (jobs, update logs,
# checkpoints, the codec cache) lives in the /data volume.

# The CUDA runtime libraries come from the base; torch's CUDA wheel also bundles its own, and
# bitsandbytes finds cuBLAS / cudart here. The host needs an NVIDIA driver recent enough for
# CUDA 12.8 and the NVIDIA container toolkit.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# torch is installed first, from the CUDA wheel index, so that installing zostream (which
# only asks for torch>=2.4) never pulls a different build. Override both for another CUDA:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu 24.04's python3 is 3.12 (zostream needs >= 3.11); a venv because the system
# Python is externally managed (PEP 668).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The big layer, cached independently of the source.
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

# The project itself (a regular, non-editable install), then the sources are dropped.
COPY pyproject.toml /tmp/src/
COPY engine /tmp/src/engine
COPY server /tmp/src/server
COPY clients /tmp/src/clients
COPY proto /tmp/src/proto
COPY zostream /tmp/src/zostream
RUN pip install /tmp/src && rm -rf /tmp/src && zostream --version

# Non-root user; /data belongs to it (VOLUME after chown keeps the ownership in a fresh volume).
RUN useradd --system --uid 10001 --create-home --home-dir /home/zostream --shell /usr/sbin/nologin zostream \
    && mkdir -p /data /models \
    && chown zostream:zostream /data
# Never reach a model hub at run time; the codec cache lives with the rest of the state.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ZOSTREAM_CACHE_DIR=/data/cache \
    ZOSTREAM_DATA_DIR=/data \
    HOME=/home/zostream
# /models: mount the Hugging Face model folder read-only (-v /host/model:/models:ro).
VOLUME /data
USER zostream
WORKDIR /home/zostream

EXPOSE 50051 9400

# grpc.health.v1 against the server's overall status ("" service); health is exempt from the
# API key. start-period covers loading (and, the first time, encoding) a large model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(service=''), timeout=5); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

# Extra `docker run ... IMAGE <flags>` are appended (e.g. --codec nf4 --gpu-memory 60GiB).
ENTRYPOINT ["zostream", "serve", "--model", "/models", "--data-dir", "/data", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9400", "--metrics-addr", "0.0.0.0"]
CMD []
