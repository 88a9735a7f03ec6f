#!/usr/bin/env bash
# What the tests talk to for real, from Debian's packages: Prometheus and promtool,
# redis-server, docker-compose, Docker's engine, debootstrap (a base image where no registry
# can be pulled). `make test` and CI run this first: it installs what is missing (as root)
# or fails with the command that does, and starts dockerd if it is not running. Where the
# engine cannot start (no privileges for it), the tests that need it say so and skip.
set -euo pipefail

declare -A package_of=(
    [prometheus]=prometheus [promtool]=prometheus [redis-server]=redis-server
    [docker-compose]=docker-compose [dockerd]=docker.io [debootstrap]=debootstrap
)
missing=()
for binary in "${!package_of[@]}"; do
    command -v "$binary" >/dev/null || PATH="$PATH:/usr/sbin:/sbin" command -v "$binary" >/dev/null \
        || missing+=("${package_of[$binary]}")
done
if ((${#missing[@]})); then
    packages="$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')"
    if [ "$(id -u)" != 0 ]; then
        echo "the tests need: sudo apt-get install $packages" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages
fi

if ! docker info >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (PATH="$PATH:/usr/sbin" nohup dockerd >"${TMPDIR:-/tmp}/dockerd.log" 2>&1 &)
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 \
        || echo "dockerd did not start (${TMPDIR:-/tmp}/dockerd.log): the Docker tests will skip" >&2
fi
