# shim: slim multi-arch (amd64/arm64) image, dependencies built in a separate stage,
# no compilers in the final image, runs as a non-root user.
# Proved by tests/test_live_container.py: built as it stands, run --read-only with a tmpfs on /tmp.
FROM python:3.11-slim AS build
WORKDIR /build
COPY requirements.txt .
# Wheels only: the slim base has no compiler, and every pin has wheels for amd64 and arm64
# (tests/test_deploy.py), so a missing wheel fails here, clearly, instead of in a compiler.
RUN python -m venv /venv \
 && /venv/bin/pip install --no-cache-dir --disable-pip-version-check --only-binary=:all: \
      -r requirements.txt

FROM python:3.11-slim
# The project's version (pyproject.toml; tests/test_deploy.py keeps the two equal) and where its
# source lives; override either with --build-arg.
ARG SHIM_VERSION=0.1.0
ARG SHIM_SOURCE=
LABEL org.opencontainers.image.title="shim" \
      org.opencontainers.image.description="A self-hosted gateway for coding agents to Anthropic and Gemini" \
      org.opencontainers.image.version="$SHIM_VERSION" \
      org.opencontainers.image.source="$SHIM_SOURCE"
ENV PATH=/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN useradd --uid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin shim
COPY --from=build /venv /venv
WORKDIR /app
# Everything shim writes goes to /tmp (gunicorn's worker heartbeat files, the Prometheus
# multiprocess directory, the failed-secret table): run with --read-only --tmpfs /tmp.
USER shim
EXPOSE 8889 8890
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SHIM_ANTHROPIC_PORT', '8889'), timeout=2)"
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
# The code last: a change to it rebuilds these two layers only, not the settings above.
# gemini_keys.txt: bake it in for air-gapped deployments (uncomment), or mount it at
# /app/gemini_keys.txt; SHIM_GEMINI_KEYS in the environment wins over either.
# COPY gemini_keys.txt ./
COPY shim/ shim/
COPY wsgi.py gunicorn.conf.py ./
