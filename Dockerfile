# Chat gateway image: one Python virtual environment on python:3.11-slim,
# run as an unprivileged user.
#
#   docker build -t chat-gateway .
#   docker run --rm -p 8000:8000 -e CHAT_JWT_SECRET=... chat-gateway
#
# compose.yaml builds this image and wires it to MongoDB, Qdrant and the
# OpenTelemetry Collector.

# One patch release, pinned, so rebuilds are reproducible. The tag names the
# Debian release (trixie) too, because the slim tags move between Debian
# releases.
ARG PYTHON_IMAGE=python:3.11.16-slim-trixie

# ---------------------------------------------------------------------------
# Client stage: the Socket.IO browser client for the chat page, from npm with
# the versions package-lock.json pins.
# ---------------------------------------------------------------------------
FROM node:22.12.0-slim AS client

WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

# ---------------------------------------------------------------------------
# Build stage: install the package and its dependencies into /opt/venv.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, in their own layer, so a change under service/ does not
# reinstall them. The list is read from pyproject.toml, so it has one source.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The package itself. README.md is the project's `readme`, which setuptools
# reads during the build.
# NOTE: every dependency is installed from a wheel on linux/amd64. Other
# platforms are untested, and a dependency without a wheel there needs a
# compiler in this stage.
COPY README.md ./
COPY service ./service
RUN pip install --no-deps .

# ---------------------------------------------------------------------------
# Runtime stage: the virtual environment, an unprivileged user, nothing else.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed UID lets operators chown bind mounts before the first start.
# /data is created here and owned by that user, so a new named volume mounted
# on it starts with the same owner. Mount a volume there: without one the
# gateway's data lives in the container's writable layer.
RUN groupadd --system --gid 10001 chat \
    && useradd --system --uid 10001 --gid chat --create-home --home-dir /home/chat chat \
    && mkdir /data \
    && chown chat:chat /data

COPY --from=build /opt/venv /opt/venv
COPY --from=client /src/node_modules/socket.io-client/dist/socket.io.min.js /opt/chat/socket.io.min.js
ENV CHAT_SOCKETIO_CLIENT_JS=/opt/chat/socket.io.min.js

USER chat:chat
WORKDIR /home/chat

# Socket.IO, /metrics, /healthz and /readyz share this port.
EXPOSE 8000

# /readyz answers 503 while MongoDB or another dependency is unavailable, and
# urlopen raises on any status other than 2xx. So "unhealthy" here means
# "not ready for traffic". Docker does not restart unhealthy containers, but
# load balancers and `depends_on: condition: service_healthy` act on it.
# The URL assumes the default --port 8000 below.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]

CMD ["chat-gateway", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
