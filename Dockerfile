# Jumping VPN gateway image (also runs `jvpn` and `jvpn-agent`).
#   docker build -t jumping-vpn .        # or: docker compose build
# The gateway reads /etc/jvpn/gateway.toml (deploy/gateway.toml; docker compose
# mounts the same file) and its static key and KEK from /run/secrets.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY session ./session
COPY settings ./settings
COPY store ./store
COPY gateway ./gateway
COPY agent ./agent
COPY jvpn ./jvpn
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin jvpn \
 && mkdir -p /etc/jvpn /run/secrets \
 && chown jvpn /run/secrets \
 && rm -rf /src

COPY deploy/gateway.toml /etc/jvpn/gateway.toml
WORKDIR /
USER jvpn
ENV JVPN_GATEWAY_CONFIG=/etc/jvpn/gateway.toml

# UDP and TCP transports on one port; admin HTTP (/metrics /healthz /readyz).
EXPOSE 51820/udp 51820/tcp 9100/tcp
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9100/readyz', timeout=2).status != 200)"]
ENTRYPOINT ["jvpn-gateway"]
