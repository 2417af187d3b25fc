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
# The image's defaults live in a settings file, not in MESHGATE_* variables: variables win over any settings file,
# so ones set here would make an operator's file powerless. Replace this file (mount yours over it, or point
# MESHGATE_SETTINGS at yours); MESHGATE_* variables and flags still win over it. It stays out of /etc/meshgate,
# where the policy is mounted (a volume there, as in istio/, would hide it).
RUN mkdir -p /usr/local/etc/meshgate \
 && printf '%s\n' \
      '# meshgate image defaults (README, "Operating it"). A settings file of yours replaces this one whole:' \
      '# keep host: 0.0.0.0 in it, or the services listen on the loopback of the container only.' \
      'host: 0.0.0.0' 'grpc_port: 9001' 'http_port: 9002' 'admin_port: 9090' \
      > /usr/local/etc/meshgate/settings.yaml
USER 10001
ENV PYTHONUNBUFFERED=1 \
    MESHGATE_SETTINGS=/usr/local/etc/meshgate/settings.yaml
EXPOSE 9001 9002 9090
# GET /healthz on the admin port the server really uses: `meshgate healthcheck` reads the serving process's flags,
# environment and settings file, else its listening sockets (python + the CLI's light imports, no framework).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["meshgate", "healthcheck"]
ENTRYPOINT ["meshgate"]
CMD ["serve", "extauthz", "--config", "/etc/meshgate/policy.yaml"]
