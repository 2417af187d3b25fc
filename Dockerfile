# syntax=docker/dockerfile:1
# Multi-stage: build a wheel with the toolchain, run it on a slim image as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY meshgate ./meshgate
COPY extauthz ./extauthz
COPY ratelimit ./ratelimit
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin meshgate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENV PYTHONUNBUFFERED=1 \
    MESHGATE_HOST=0.0.0.0 \
    MESHGATE_GRPC_PORT=9001 \
    MESHGATE_HTTP_PORT=9002 \
    MESHGATE_ADMIN_PORT=9090
EXPOSE 9001 9002 9090
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MESHGATE_ADMIN_PORT', '9090'), timeout=2)"]
ENTRYPOINT ["meshgate"]
CMD ["serve", "extauthz", "--config", "/etc/meshgate/policy.yaml"]
