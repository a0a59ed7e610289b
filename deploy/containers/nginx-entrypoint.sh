#!/bin/sh
# Balancer container entrypoint: render deploy/nginx/nginx.conf.template with the
# gateways' addresses, run nginx, and follow the replicas.
#
# The upstream blocks list one `server <address>:<port>;` per address (and
# JVPN_UDP_NODES / JVPN_TCP_NODES the same addresses, for jvpn.js's route hints) that the
# name $JVPN_UPSTREAM_HOST (the compose service, "gateway") resolves to, through
# the container's own resolver (whatever /etc/resolv.conf names: Docker's
# embedded DNS, Podman's aardvark-dns, a cluster DNS). Every
# $JVPN_UPSTREAM_REFRESH_S seconds the name is resolved again; when the set
# changes (a replica added, stopped or restarted with a new address) the file is
# rendered again, checked with `nginx -t` and nginx reloaded. So nginx needs no
# `resolver` directive and no `server ... resolve` (nginx >= 1.27.3): any nginx
# with the stream and njs modules works, Debian bookworm's 1.22 included.
#
# The other JVPN_* placeholders come from the environment, as in
# docker-compose.yml; jvpn-lab cluster renders the same template for local runs.
set -eu

template=${JVPN_NGINX_TEMPLATE:-/etc/nginx/templates/nginx.conf.template}
conf=${JVPN_NGINX_CONF:-/etc/nginx/nginx.conf}
host=${JVPN_UPSTREAM_HOST:-gateway}
port=${JVPN_UPSTREAM_PORT:-51820}
quic_port=${JVPN_UPSTREAM_QUIC_PORT:-51821}
refresh=${JVPN_UPSTREAM_REFRESH_S:-1}

log() { echo "jvpn-nginx-entrypoint: $*" >&2; }

addresses() {
    getent ahostsv4 "$host" | awk '!seen[$1]++ { print $1 }' | sort -t . -k1,1n -k2,2n -k3,3n -k4,4n
}

render() {
    servers=""
    nodes=""
    quic=""
    for a in $1; do
        servers="$servers server $a:$port;"
        nodes="${nodes:+$nodes }$a:$port"
        quic="$quic server $a:$quic_port;"
    done
    # No replica resolves (yet): a placeholder marked down keeps the file valid.
    [ -n "$servers" ] || servers="server 127.0.0.1:$port down;"
    [ -n "$quic" ] || quic="server 127.0.0.1:$quic_port down;"
    JVPN_UDP_SERVERS=$servers JVPN_TCP_SERVERS=$servers JVPN_QUIC_SERVERS=$quic
    # The same addresses for jvpn.js's route hints (its copy of the ring; none: no hints).
    JVPN_UDP_NODES=$nodes JVPN_TCP_NODES=$nodes
    export JVPN_UDP_SERVERS JVPN_TCP_SERVERS JVPN_QUIC_SERVERS JVPN_UDP_NODES JVPN_TCP_NODES
    # Only ${JVPN_*} is replaced; nginx's own $variables stay.
    envsubst "$(env | sed -n 's/^\(JVPN_[A-Za-z0-9_]*\)=.*/${\1}/p')" <"$template" >"$conf.new"
    nginx -t -q -c "$conf.new" && mv "$conf.new" "$conf"
}

current=$(addresses | paste -sd ' ' -)
log "upstream $host: ${current:-none yet}"
render "$current"
nginx -g 'daemon off;' &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT
trap 'kill -QUIT "$pid" 2>/dev/null || true' QUIT

empty=0
while kill -0 "$pid" 2>/dev/null; do
    sleep "$refresh" &
    wait $! || true
    kill -0 "$pid" 2>/dev/null || break
    found=$(addresses | paste -sd ' ' -)
    # No address at all is believed only three times in a row: one lost DNS answer
    # must not empty the upstreams (scaled to zero, the stack has none for real).
    if [ -z "$found" ]; then
        empty=$((empty + 1))
        [ "$empty" -ge 3 ] || continue
    else
        empty=0
    fi
    [ "$found" != "$current" ] || continue
    if render "$found"; then
        log "upstream $host: ${current:-none} -> ${found:-none}; reloading"
        current=$found
        kill -HUP "$pid"
    else
        log "upstream $host: ${found:-none}: nginx -t failed, nginx keeps the running config"
    fi
done
rc=0
wait "$pid" || rc=$?
exit "$rc"
