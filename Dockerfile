# Jumping VPN images: one Dockerfile, one target per service of docker-compose.yml,
# every one on the same Debian base (the packages the local cluster runs, too).
#
#   docker compose build                                   # or, one target by hand:
#   docker build --target gateway -t jumping-vpn/gateway:dev .
#   podman build --format docker --target gateway -t jumping-vpn/gateway:dev .
#
# BASE_IMAGE is any Debian bookworm image: debian:bookworm-slim from a registry,
# or one made with debootstrap where no registry is reachable
# (deploy/containers/debian-base.sh; README.md, "Containers without a registry").
# Podman needs `--format docker` here: its default OCI image format drops
# HEALTHCHECK (docker-compose.yml repeats the gateway's check, so it is defined either way).
#
# Targets:
#   gateway     jvpn-gateway (also `jvpn` and `jvpn-agent`); reads
#               /etc/jvpn/gateway.toml (deploy/gateway.toml) and its static key
#               and KEK from /run/secrets
#   redis       redis-server and redis-cli (the redis user is uid 999, as the
#               files deploy/redis/init.py writes expect)
#   nginx       nginx with the stream and njs modules, and
#               deploy/containers/nginx-entrypoint.sh (the upstream list from DNS)
#   prometheus  Prometheus
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*


FROM base AS gateway
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PATH=/opt/jvpn/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/jvpn
# The dependencies first, in their own layer: a change to the code reuses it.
COPY pyproject.toml /src/
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /src/requirements.txt \
 && pip install -r /src/requirements.txt
COPY README.md /src/
COPY session /src/session
COPY settings /src/settings
COPY store /src/store
COPY gateway /src/gateway
COPY agent /src/agent
COPY jvpn /src/jvpn
COPY netdev /src/netdev
COPY history /src/history
# The compiled data plane: the abi3 wheel `make dataplane-wheel` built on the host
# beforehand (dataplane/wheels/; README.md, "Containers"); without one the image runs
# the Python data plane, and the gateway says which at start.
COPY dataplane/wheels/ /src/wheels/
RUN for w in /src/wheels/*.whl; do if [ -e "$w" ]; then pip install --no-deps "$w"; fi; done \
 && pip install --no-deps /src \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin jvpn \
 && mkdir -p /etc/jvpn /run/secrets \
 && chown jvpn /run/secrets \
 && rm -rf /src

COPY deploy/gateway.toml /etc/jvpn/gateway.toml
COPY deploy/containers/gateway-entrypoint.sh /usr/local/bin/jvpn-gateway-entrypoint
COPY deploy/containers/gateway-healthcheck.py /usr/local/bin/jvpn-gateway-healthcheck
WORKDIR /
USER jvpn
ENV JVPN_GATEWAY_CONFIG=/etc/jvpn/gateway.toml

# UDP and TCP transports on one port; admin HTTP (/metrics /healthz /readyz).
EXPOSE 51820/udp 51820/tcp 9100/tcp
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["jvpn-gateway-healthcheck"]
# Names the node after its container (deploy/containers/gateway-entrypoint.sh), then
# runs jvpn-gateway with the arguments given.
ENTRYPOINT ["jvpn-gateway-entrypoint"]


FROM base AS redis
RUN groupadd --system --gid 999 redis \
 && useradd --system --uid 999 --gid redis --home-dir /var/lib/redis --shell /usr/sbin/nologin redis \
 && apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data \
 && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379/tcp
CMD ["redis-server"]


FROM base AS nginx
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx libnginx-mod-stream libnginx-mod-stream-js gettext-base \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
 && mkdir -p /etc/nginx/templates /etc/nginx/njs
COPY deploy/containers/nginx-entrypoint.sh /usr/local/bin/jvpn-nginx-entrypoint
EXPOSE 51820/udp 51820/tcp
ENTRYPOINT ["jvpn-nginx-entrypoint"]


FROM base AS prometheus
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus \
 && chown prometheus:prometheus /prometheus
USER prometheus
WORKDIR /prometheus
EXPOSE 9090/tcp
ENTRYPOINT ["/usr/bin/prometheus"]
