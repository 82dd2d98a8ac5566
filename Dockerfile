# zostream engine image: gRPC on 50051, the OpenAI-compatible HTTP API on 8000, Prometheus /metrics on 9400.
#
# Build:  docker build -t zostream .                                   (CUDA build of torch)
#         docker build --build-arg TORCH_VARIANT=cpu -t zostream:cpu .  (CPU build of torch)
#         tools/image.sh build                    (docker where it runs, else buildah; see README)
# Run:    docker run --gpus 1 --ulimit memlock=-1 \
#           -v /path/to/hf-model:/models:ro -v zostream-data:/data -v ./api-key:/run/secrets/api-key:ro \
#           -p 127.0.0.1:50051:50051 -p 127.0.0.1:8000:8000 -p 127.0.0.1:9400:9400 \
#           zostream --api-key-file /run/secrets/api-key
#
# --ulimit memlock=-1 is needed: the streamer registers the read-only mmap of the model's
# safetensors with cudaHostRegister (page-locked, ~54 GB/s host->GPU). With the default
# memlock limit (8 MiB) registration fails and the engine falls back to a pinned staging
# ring (slower, extra host copies). deploy/docker-compose.yml sets it.
#
# The model folder is mounted READ-ONLY at /models: the base is never written (full-parameter
# jobs write a working copy into their job directory). All state (jobs, update logs,
# checkpoints, the codec cache) lives in the /data volume.
#
# No CUDA base image: torch's CUDA wheels carry the CUDA runtime libraries (nvidia-* wheels from
# PyPI) and bitsandbytes finds them there. The host needs an NVIDIA driver recent enough for the
# wheels' CUDA and the NVIDIA container toolkit. Debian bookworm's python3 is 3.11.

ARG BASE_IMAGE=debian:bookworm-slim

# ---- deps: a venv with torch and every pinned dependency -----------------------------------------
# Its layers change only with deploy/constraints.txt or the torch build arguments, so a rebuild after a
# source change reuses them (and the runtime stage's copy of this venv).
FROM ${BASE_IMAGE} AS deps

# cuda: PyPI's Linux wheel of torch (bundles CUDA); cpu: the +cpu build (~200 MB instead of GBs).
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Build-time pip settings of the building machine (a certificate bundle for a TLS-inspecting proxy,
# a local wheel folder). Empty by default; they exist in the build stages only, never in the image.
ARG BUILD_PIP_CERT=
ARG BUILD_PIP_FIND_LINKS=

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/tmp/constraints.txt

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Every dependency but torch (and the CUDA wheels torch pins itself) at an exact version.
COPY deploy/constraints.txt /tmp/constraints.txt

# The big layer. The CPU build comes from the local wheel folder when one is given, else from the
# PyTorch CPU index.
RUN set -eu; \
    case "$TORCH_VARIANT" in \
      cuda) spec="torch==$TORCH_VERSION"; index="" ;; \
      cpu) spec="torch==$TORCH_VERSION+cpu"; index="$TORCH_CPU_INDEX"; [ -z "$BUILD_PIP_FIND_LINKS" ] || index="" ;; \
      *) echo "TORCH_VARIANT must be cuda or cpu, not '$TORCH_VARIANT'" >&2; exit 2 ;; \
    esac; \
    env ${BUILD_PIP_CERT:+PIP_CERT="$BUILD_PIP_CERT"} ${BUILD_PIP_FIND_LINKS:+PIP_FIND_LINKS="$BUILD_PIP_FIND_LINKS"} \
      pip install ${index:+--extra-index-url "$index"} "$spec"; \
    python -c "import torch; print('torch', torch.__version__)"

# The pinned dependencies themselves (the constraints file read as requirements).
RUN env ${BUILD_PIP_CERT:+PIP_CERT="$BUILD_PIP_CERT"} ${BUILD_PIP_FIND_LINKS:+PIP_FIND_LINKS="$BUILD_PIP_FIND_LINKS"} \
      pip install -r /tmp/constraints.txt

# ---- wheel: the project as a wheel (built offline with the pinned setuptools) -------------------
FROM deps AS wheel
COPY pyproject.toml README.md /tmp/src/
COPY engine /tmp/src/engine
COPY server /tmp/src/server
COPY clients /tmp/src/clients
COPY proto /tmp/src/proto
COPY zostream /tmp/src/zostream
RUN pip wheel --no-deps --no-build-isolation --no-index -w /tmp/wheel /tmp/src

# ---- runtime: python3, the deps venv, the project; non-root --------------------------------------
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /tmp/wheel /tmp/wheel
# The project with its engine extra, resolved offline against the venv: an install that finds a dependency
# missing fails here, and pip check then finds none broken (constraints.txt left nothing out).
RUN PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 pip install --no-index "$(ls /tmp/wheel/*.whl)[engine]" \
    && pip check \
    && rm -rf /tmp/wheel \
    && pip uninstall -y -q pip

# Non-root user; /data belongs to it (VOLUME after chown keeps the ownership in a fresh volume).
RUN useradd --system --uid 10001 --create-home --home-dir /home/zostream --shell /usr/sbin/nologin zostream \
    && mkdir -p /data /models \
    && chown zostream:zostream /data \
    && zostream --version
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

EXPOSE 50051 8000 9400

# grpc.health.v1 against the server's overall status ("" service); health is exempt from the API
# key. The probe speaks TLS when the server does (see server/healthcheck.py; ZOSTREAM_TLS_CA for a
# certificate signed by a CA). start-period covers loading (and, the first time, encoding) a model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-m", "zostream.server.healthcheck", "127.0.0.1:50051"]

# Extra `docker run ... IMAGE <flags>` are appended (e.g. --api-key-file F --codec nf4).
ENTRYPOINT ["zostream", "serve", "--model", "/models", "--data-dir", "/data", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", "--metrics-port", "9400", "--metrics-addr", "0.0.0.0"]
CMD []
