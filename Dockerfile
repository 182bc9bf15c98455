# failover-router container image.
#
#   docker build -t failover-router:0.1.0 .
#
# Two stages: the build stage installs the router and its pinned dependencies into a venv
# (confluent-kafka's manylinux wheel carries librdkafka, so no compiler is needed); the
# runtime stage is the slim Python base, that venv, and a non-root user. The Helm chart runs it
# with a read-only root filesystem: bytecode is compiled at build time.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/failover-router
COPY pyproject.toml README.md ./
COPY router ./router
COPY health ./health
COPY devstack ./devstack
RUN /opt/failover-router/bin/pip install . \
 && /opt/failover-router/bin/python -m compileall -q /opt/failover-router

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 frouter \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin frouter
COPY --from=build /opt/failover-router /opt/failover-router
ENV PATH=/opt/failover-router/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080
# The console script as PID 1: it handles SIGTERM itself (flush, commit, leave, deregister).
ENTRYPOINT ["failover-router"]
CMD ["run", "--topology", "/etc/failover-router/topology/topology.yaml", "--listen", "0.0.0.0:8080"]
