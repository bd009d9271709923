# shim: slim multi-arch (amd64/arm64) image, dependencies built in a separate stage,
# no compilers in the final image, runs as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /build
COPY requirements.txt .
RUN python -m venv /venv \
 && /venv/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt

FROM python:3.11-slim
ENV PATH=/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /venv /venv
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin shim
WORKDIR /app
COPY shim/ shim/
COPY wsgi.py gunicorn.conf.py ./
# gemini_keys.txt: bake it in for air-gapped deployments (uncomment), or mount it at
# /app/gemini_keys.txt; SHIM_GEMINI_KEYS in the environment wins over either.
# COPY gemini_keys.txt ./
USER shim
EXPOSE 8889 8890
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SHIM_ANTHROPIC_PORT', '8889'), timeout=2)"
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
