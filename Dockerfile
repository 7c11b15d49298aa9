# The homepage engine: `homepage serve` (API), `homepage worker` (the loop) and every other command.
# CPU-only torch, pinned to the version pyproject.toml requires.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOMEPAGE_DATA_DIR=/data

RUN pip install 'torch==2.13.0' --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY allocator allocator
COPY bandits bandits
COPY rankers rankers
COPY simulator simulator
COPY policy_api policy_api
COPY migrations migrations
COPY homepage_client homepage_client
# the request path's compiled kernels are compiled once here, into the installed package's cache
RUN pip install . && python -c "import allocator; allocator.warm_kernels()" \
    && useradd --system --uid 10001 --home-dir /data homepage \
    && mkdir -p /data && chown homepage /data

USER homepage
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=1)"
# bind to all interfaces inside the container; the config comes from HOMEPAGE_CONFIG or --config
CMD ["homepage", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--no-loop"]
