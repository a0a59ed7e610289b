#!/bin/sh
# Gateway container entrypoint: name the node after its container, then run
# jvpn-gateway with the arguments given.
#
# A replica of `docker compose up --scale gateway=N` has no name of its own
# inside (its hostname is a random container id), so unless JVPN_GATEWAY_NODE_ID
# (or --node-id) is set, the node id comes from the container's name, which is
# what `docker ps` / `podman ps` show: <project>-gateway-<n> (Docker Compose v2)
# or <project>_gateway_<n> (docker-compose v1, also on Podman). The node id is
# "<service>-<n>" (gateway-2; the service is $JVPN_NODE_SERVICE, default
# gateway): unique in the project, whose replicas share one store, and short
# enough for the wire (a node's name travels in 23 bytes). A container name
# without that ending is used whole.
#
# The name is found where each engine publishes it: Podman writes it beside the
# container's address in /etc/hosts; Docker's embedded DNS answers the address's
# reverse lookup with <name>.<network>. Neither: the gateway's own default,
# <hostname>-<udp port>.
set -eu

container_name() {
    host=$(cat /etc/hostname 2>/dev/null || true)
    [ -n "$host" ] || return 0
    addr=$(getent -s files hosts "$host" | awk 'NR == 1 { print $1 }')
    [ -n "$addr" ] || return 0
    # Podman: "<address> <hostname> <container name>" in /etc/hosts.
    name=$(awk -v a="$addr" -v h="$host" \
        '$1 == a { for (i = 2; i <= NF; i++) if ($i != h) { print $i; exit } }' /etc/hosts)
    if [ -z "$name" ]; then
        # Docker: the reverse lookup of the address, "<name>.<network>".
        name=$(getent -s dns hosts "$addr" | awk 'NR == 1 { split($2, p, "."); print p[1] }')
    fi
    # A node id is letters, digits, ". _ : -", at most 64 characters.
    printf '%s' "$name" | tr -c 'A-Za-z0-9._:-' '-' | cut -c 1-64
}

if [ -z "${JVPN_GATEWAY_NODE_ID:-}" ]; then
    name=$(container_name)
    service=${JVPN_NODE_SERVICE:-gateway}
    index=$(printf '%s' "$name" | sed -n "s/^.*[-_]$service[-_]\([0-9][0-9]*\)\$/\1/p")
    [ -z "$index" ] || name=$service-$index
    if [ -n "$name" ] && [ "$name" != "$(cat /etc/hostname)" ]; then
        JVPN_GATEWAY_NODE_ID=$name
        export JVPN_GATEWAY_NODE_ID
    fi
fi
exec jvpn-gateway "$@"
