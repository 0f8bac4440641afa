# syntax=docker/dockerfile:1
# ACE-Step on Triton: the production GPU server (target `gpu`: the six components served by the
# torch runtime, bf16 with compiled DiT blocks and CUDA graphs, or with `--runtime tensorrt` as
# TensorRT `tensorrt_plan` models; the task endpoints as Python-backend models).
#
#   docker build -f docker/server.gpu.Dockerfile -t acestep-triton-server:0.1.0-gpu .
#   docker run --gpus 1 --shm-size 8g -p 8000-8002:8000-8002 \
#     -v $PWD/checkpoints/ACE-Step-v1-3.5B:/models/checkpoint:ro -v acestep-models:/models \
#     -v acestep-compile-cache:/cache acestep-triton-server:0.1.0-gpu
#
# Base image pin: nvcr.io/nvidia/tritonserver:25.01-py3 (Triton 2.54). Why this tag:
# * it ships the python and tensorrt backends we use, and Ubuntu 24.04 with Python 3.12 (the
#   first releases with 3.12 are 24.12+): the Python-backend stub is built against the image's
#   own interpreter, so the project is installed into exactly that Python, which our pins cover
#   (requires-python <3.13);
# * the image installs the Python backend with numpy<2, which is what the project pins (the
#   stub's pb_utils.as_numpy() is only known to work with numpy 1, see pyproject.toml);
# * an exact yy.mm tag, never `latest`: the TensorRT inside decides which engines load, so the
#   tag is part of the deployment's identity (engines are rebuilt when it changes).
# Move to a newer release deliberately: rebuild, and let the engines be rebuilt (the entry point
# notices the new TensorRT version). The TensorRT Python package that builds the engines is
# chosen from the image itself (below), so it always matches the backend that loads them.
#
# Model repository: `docker/entrypoint-server.sh` serves /models/repository if it exists, else
# builds it from /models/checkpoint (ONNX export, then TensorRT engines). Engines are built on
# the GPU the container runs on (they only run on that GPU model and TensorRT version), so the
# first start on a new GPU type takes long; keep /models on a volume to build once per GPU.
FROM nvcr.io/nvidia/tritonserver:25.01-py3

# torch from PyPI is the CUDA build: the engine build step (acestep_triton.export.engine_build)
# needs CUDA to see the GPU it builds for; the orchestrators' sampling loop runs in it too.
ARG TORCH_INDEX_URL=https://pypi.org/simple
# The NGC image installs its Python packages system-wide (the backend stub embeds that Python).
ARG PIP_BREAK_SYSTEM_PACKAGES=1
ARG PIP_NO_CACHE_DIR=1
ARG PIP_DISABLE_PIP_VERSION_CHECK=1

LABEL org.opencontainers.image.title="acestep-triton-server" \
      org.opencontainers.image.description="ACE-Step v1 music generation on Triton (GPU, TensorRT)" \
      org.opencontainers.image.version="0.1.0"

WORKDIR /opt/acestep

# torch first and alone (its own index), so the project install below finds it satisfied.
RUN python3 -m pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"

# The project is installed editable from /opt/acestep: the renderer reads model_repository/ and
# ensemble_configs/ from the project root. Extras: export (ONNX export + parity) and download;
# not `serve`, whose nvidia-pytriton only brings the pip-bundled tritonserver that this image
# already has natively, and not `gpu`, whose tensorrt pin is for machines without this image.
# The TensorRT builder is the wheel of this image's own TensorRT version and CUDA major
# (`check_tensorrt.py --pip-requirement`, e.g. tensorrt-cu12==10.8.0.*): engines only load in
# the TensorRT that built them. check_tensorrt.py then fails the build if they still differ.
COPY --chmod=0755 docker/entrypoint-server.sh docker/healthcheck.py docker/check_tensorrt.py docker/
COPY client/ client/
COPY pyproject.toml ./
COPY src/ src/
COPY model_repository/ model_repository/
COPY ensemble_configs/ ensemble_configs/
RUN python3 -m pip install -e ./client -e ".[export,download]" \
 && python3 -m pip install "$(python3 docker/check_tensorrt.py --pip-requirement)" \
 && python3 -m pip install --no-deps "py3langid==0.3.0" \
 && python3 -c "import numpy, sys; v = numpy.__version__; sys.exit(0 if v.startswith('1.') else f'numpy must stay < 2 for the Python backend stub, got {v}')" \
 && python3 -c "import acestep_triton.serving.orchestrator, acestep_triton.export.engine_build, acestep_client.params" \
 && python3 docker/check_tensorrt.py

# uid 1000 is the image's own non-root `triton-server` user; /models is its writable volume.
RUN mkdir -p /models /cache/torchinductor /cache/triton && chown -R 1000:1000 /models /cache
# Compile cache (torch runtime): the DiT decoder compiles its blocks with TorchInductor and
# captures CUDA graphs while it loads (the `warmup` shapes), before the server reports ready.
# Graphs live in GPU memory and are captured again on every start (seconds); the compiled
# kernels are what takes minutes, and TorchInductor caches them on disk: its FX-graph and
# AOTAutograd caches and the generated code under TORCHINDUCTOR_CACHE_DIR, the Triton kernel
# binaries under TRITON_CACHE_DIR. Both point into /cache, a volume: a restarted container (or
# pod, deploy/overlays/gpu) finds them there and loads instead of compiling. Entries are keyed
# by the torch/Triton versions, the GPU and the code, so a stale or foreign entry is a miss,
# never wrong, and one cache can be shared by several servers (writes are atomic renames).
ENV ACESTEP_MODELS_DIR=/models \
    ACESTEP_TARGET=gpu \
    ACESTEP_HTTP_PORT=8000 \
    ACESTEP_GRPC_PORT=8001 \
    ACESTEP_METRICS_PORT=8002 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TORCHINDUCTOR_FX_GRAPH_CACHE=1 \
    TORCHINDUCTOR_AUTOGRAD_CACHE=1 \
    TRITON_CACHE_DIR=/cache/triton \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/models", "/cache"]
USER 1000:1000

EXPOSE 8000 8001 8002
# Ready = every model loaded (--strict-readiness). The start period covers a first start that
# exports and builds the engines (tens of minutes for the 3.5B model); later starts take seconds.
# --components: also unhealthy while a dead model process is being reloaded (Triton's
# /v2/health/ready keeps answering 200 then).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60m --retries=3 \
  CMD ["python3", "/opt/acestep/docker/healthcheck.py", "--path", "/v2/health/ready", \
       "--components", "ready", "--port-env", "ACESTEP_HTTP_PORT", "--default-port", "8000"]
ENTRYPOINT ["/opt/acestep/docker/entrypoint-server.sh"]
CMD ["run"]
