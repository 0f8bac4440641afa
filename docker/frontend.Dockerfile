# syntax=docker/dockerfile:1
# ACE-Step on Triton: the Gradio front end (port 7865). It talks to the server only through the
# thin gRPC client, so the image holds the client, the front end and the `ui` extra's pins, and
# nothing else: no torch, no weights (a few hundred MB instead of several GB). The front end
# is the acestep_triton.frontend subpackage, which (like the package's __init__) imports no
# torch: the package is installed without its core dependencies (--no-deps), and the build
# fails if torch is importable anyway.
#
#   docker build -f docker/frontend.Dockerfile -t acestep-triton-frontend:0.1.0 .
#   docker run -p 7865:7865 -e ACESTEP_URL=my-server:8001 acestep-triton-frontend:0.1.0
#
# Base image: an exact CPython patch release on Debian 12 (slim); the client's wheels
# (grpcio, numpy, soundfile with its bundled libsndfile) need no compiler there.
FROM python:3.12.11-slim-bookworm

ARG PIP_NO_CACHE_DIR=1
ARG PIP_DISABLE_PIP_VERSION_CHECK=1

LABEL org.opencontainers.image.title="acestep-triton-frontend" \
      org.opencontainers.image.description="Gradio front end for ACE-Step on Triton (gRPC client only)" \
      org.opencontainers.image.version="0.1.0"

RUN useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin acestep

WORKDIR /opt/acestep
COPY --chmod=0755 docker/entrypoint-frontend.sh docker/healthcheck.py docker/extra_requirements.py docker/
COPY client/ client/
COPY pyproject.toml ./
COPY src/ src/
RUN python -m pip install ./client \
 && python docker/extra_requirements.py pyproject.toml ui > /tmp/ui-requirements.txt \
 && python -m pip install -r /tmp/ui-requirements.txt \
 && python -m pip install --no-deps . \
 && rm /tmp/ui-requirements.txt \
 && python -c "import importlib.util, sys; sys.exit('torch must not be in the front-end image' if importlib.util.find_spec('torch') else 0)" \
 && python -c "import acestep_triton.frontend"

ENV ACESTEP_URL=server:8001 \
    ACESTEP_FRONTEND_HOST=0.0.0.0 \
    ACESTEP_FRONTEND_PORT=7865 \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_TEMP_DIR=/tmp/gradio \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 1000:1000

EXPOSE 7865
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "/opt/acestep/docker/healthcheck.py", "--path", "/", \
       "--port-env", "ACESTEP_FRONTEND_PORT", "--default-port", "7865"]
ENTRYPOINT ["/opt/acestep/docker/entrypoint-frontend.sh"]
