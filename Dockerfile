# syntax=docker/dockerfile:1
# The ingest service image: built in one stage, run from a slim one without compilers.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY ingest ./ingest
COPY pipelines ./pipelines
RUN /opt/venv/bin/pip install --no-compile ".[fast,tickets]"

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INGEST_HTTP_HOST=0.0.0.0 \
    INGEST_HTTP_PORT=8000 \
    INGEST_LOG_FORMAT=json
RUN groupadd --system --gid 10001 ingest \
    && useradd --system --uid 10001 --gid ingest --home-dir /app ingest
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY config ./config
# var/uploads exists in the image so that a named volume mounted there starts owned by
# the service's user (Docker copies the directory's ownership into a new volume).
RUN mkdir -p /app/var/uploads && chown -R 10001:10001 /app/var
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('INGEST_HTTP_PORT', '8000')}/healthz\", timeout=4)"]
# Exec form: ingest runs as PID 1 and receives SIGTERM itself, so it drains.
ENTRYPOINT ["ingest"]
CMD ["run"]
