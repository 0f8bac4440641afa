# syntax=docker/dockerfile:1
# ACE-Step on Triton: the CPU demo server. A real tritonserver (the one bundled in the
# nvidia-pytriton wheel, with its Python backend) serving the tiny random checkpoint, rendered
# for the `cpu` target (each component's ONNX run by onnxruntime inside a Python-backend model).
# Same endpoints, tensor names and streaming as the GPU server; the audio is noise-like because
# the weights are random. Good for trying the client, the front end and the deployment files
# without a GPU or a 3.5B checkpoint.
#
#   docker build -f docker/cpu-demo.Dockerfile -t acestep-triton-cpu-demo:0.1.0 .
#   docker run --shm-size 1g -p 8000-8002:8000-8002 acestep-triton-cpu-demo:0.1.0
#
# Base image: the exact CPython the project is developed and tested with (3.11 on Debian 12;
# the wheel's server needs glibc >= 2.35, Debian 12 has 2.36).
FROM python:3.11.13-slim-bookworm

# The CPU build of torch (the default PyPI wheel is the multi-GB CUDA build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_NO_CACHE_DIR=1
ARG PIP_DISABLE_PIP_VERSION_CHECK=1

LABEL org.opencontainers.image.title="acestep-triton-cpu-demo" \
      org.opencontainers.image.description="ACE-Step on Triton, CPU demo (tiny random checkpoint)" \
      org.opencontainers.image.version="0.1.0"

RUN useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin acestep

WORKDIR /opt/acestep
RUN python -m pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"

# Editable install: the renderer reads model_repository/ and ensemble_configs/ from the project
# root. `serve` brings nvidia-pytriton (the server), `export` the ONNX exporter.
COPY client/ client/
COPY pyproject.toml ./
COPY src/ src/
COPY model_repository/ model_repository/
COPY ensemble_configs/ ensemble_configs/
RUN python -m pip install -e ./client -e ".[export,serve]" \
 && python -m pip install --no-deps "py3langid==0.3.0" \
 && python -m acestep_triton.serving.server prepare

COPY --chmod=0755 docker/entrypoint-server.sh docker/healthcheck.py docker/

RUN mkdir -p /models && chown 1000:1000 /models
ENV ACESTEP_MODELS_DIR=/models \
    ACESTEP_TARGET=cpu \
    ACESTEP_TINY_CHECKPOINT=1 \
    ACESTEP_HTTP_PORT=8000 \
    ACESTEP_GRPC_PORT=8001 \
    ACESTEP_METRICS_PORT=8002 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 1000:1000

# The tiny deployment is built into the image now (checkpoint → ONNX with parity → repository),
# so the container serves at once; as the non-root user, so the files are its own.
RUN /opt/acestep/docker/entrypoint-server.sh build

EXPOSE 8000 8001 8002
# Every endpoint's Python stubs import torch: about a minute to ready on 2 cores.
# --components: also unhealthy while a dead model process is being reloaded (Triton's
# /v2/health/ready keeps answering 200 then).
HEALTHCHECK --interval=15s --timeout=5s --start-period=5m --retries=3 \
  CMD ["python", "/opt/acestep/docker/healthcheck.py", "--path", "/v2/health/ready", \
       "--components", "ready", "--port-env", "ACESTEP_HTTP_PORT", "--default-port", "8000"]
ENTRYPOINT ["/opt/acestep/docker/entrypoint-server.sh"]
CMD ["run"]
