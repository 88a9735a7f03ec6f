#!/bin/sh
# A Debian bookworm base image with Python, made from Debian's packages: for machines that
# cannot pull `python:3.12-slim` from a registry. Needs root and debootstrap.
#   deploy/docker/base-image.sh [IMAGE] [MIRROR]
# IMAGE defaults to model-gateway-base:bookworm; MIRROR to the Debian mirror this machine's
# apt sources name (else deb.debian.org). Then: make images BASE_IMAGE=model-gateway-base:bookworm
set -eu
image="${1:-model-gateway-base:bookworm}"
mirror="${2:-$(grep -hsoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
    | head -n1 | awk '{print $2}')}"
mirror="${mirror:-http://deb.debian.org/debian}"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'CMD ["python3"]' - "$image"
echo "$image"
