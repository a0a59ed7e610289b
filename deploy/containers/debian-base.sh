#!/bin/sh
# A Debian base image made with debootstrap, for machines that reach a Debian
# mirror (or apt proxy) but no image registry. Usage (as root):
#
#   deploy/containers/debian-base.sh [podman|docker]
#
# Prints the image name to use as the Dockerfile's BASE_IMAGE. Environment:
#   JVPN_BASE_SUITE   Debian suite (bookworm)
#   JVPN_BASE_MIRROR  mirror (the first http(s) URI in /etc/apt/sources.list*,
#                     else http://deb.debian.org/debian)
#   JVPN_BASE_CACHE   where the root filesystem tarball is kept between runs
#                     (/var/tmp/jvpn-containers: one per machine, survives clones)
#   JVPN_BASE_IMAGE   the image name (localhost/jvpn-base:<suite>)
#
# The tarball is made once (debootstrap --variant=minbase, ~35 s on a 2-core VM
# near the mirror); later runs only import it when the engine lacks the image.
# The certificates in /usr/local/share/ca-certificates (a TLS-inspecting proxy's
# CA, say) are added to the image's trust store, so apt and pip inside the build
# trust what this machine trusts.
set -eu

engine=${1:-podman}
suite=${JVPN_BASE_SUITE:-bookworm}
cache=${JVPN_BASE_CACHE:-/var/tmp/jvpn-containers}
image=${JVPN_BASE_IMAGE:-localhost/jvpn-base:$suite}
tarball=$cache/debian-$suite-minbase.tar

if [ -z "${JVPN_BASE_MIRROR:-}" ]; then
    JVPN_BASE_MIRROR=$(sed -n 's,^\(URIs:\|deb\) *\(https\?://[^ ]*/debian\)/\?\( .*\)\?$,\2,p' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null | head -n 1)
fi
mirror=${JVPN_BASE_MIRROR:-http://deb.debian.org/debian}

if [ "$(id -u)" != 0 ]; then
    echo "debian-base: run as root (debootstrap and the engine need it)" >&2
    exit 1
fi
command -v "$engine" >/dev/null || { echo "debian-base: no $engine" >&2; exit 1; }
mkdir -p "$cache"

# One builder at a time per cache (a second run waits, then finds the tarball).
exec 9>"$cache/.lock"
flock -w 900 9 || { echo "debian-base: $cache/.lock held for 15 min" >&2; exit 1; }

if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { echo "debian-base: no debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs" "$tarball.tmp"' EXIT
    echo "debian-base: debootstrap $suite from $mirror (once per machine)" >&2
    debootstrap --variant=minbase --include=ca-certificates "$suite" "$rootfs" "$mirror" \
        >"$cache/debootstrap.log" 2>&1 \
        || { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
    found=0
    for crt in /usr/local/share/ca-certificates/*.crt; do
        [ -f "$crt" ] || continue
        cp "$crt" "$rootfs/usr/local/share/ca-certificates/"
        found=1
    done
    [ "$found" = 0 ] || chroot "$rootfs" update-ca-certificates >/dev/null
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/tmp/*
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
fi

if ! "$engine" image inspect "$image" >/dev/null 2>&1; then
    "$engine" import --change 'CMD ["/bin/bash"]' "$tarball" "$image" >/dev/null
fi
echo "$image"
