#!/usr/bin/env bash
# The docker-compose demo, for real (tests/tests/compose.rs): build the image from the
# repository's Dockerfile, `up`, check from the host through the API, `down -v`.
#
#   tests/compose/run.sh            set up what is missing, build, run the test
#   tests/compose/run.sh prepare    only the engine and the base image (.ci/run starts this in
#                                   the background while it compiles)
#
# What it sets up first, each only when missing:
# - the engine: `apt-get install docker.io docker-compose debootstrap`, then `dockerd` started
#   in the background (its log in $COMPOSE_WORK/dockerd.log); it is left running;
# - `debian:bookworm-slim`, the Dockerfile's base: when no registry gives it, a Debian bookworm
#   rootfs made with `debootstrap --variant=minbase` (docs, man pages and apt lists removed, as
#   the official slim image does) and `docker import`ed under that tag;
# - the builder (`RUST_IMAGE`, default `rust:1-bookworm`): when no registry gives it, the
#   binaries are built on the host with the Dockerfile's own command
#   (`cargo build --release --locked -p gateway -p device-sim`) and put in `/out` of an image
#   `local/rust-prebuilt` made from the same base; the Dockerfile then skips its compile, so the
#   runtime stage, and the image, are built by the same Dockerfile steps as a user's.
#   COMPOSE_PROFILE=debug (CI) puts the binaries of the tests' build in it instead
#   (`cargo build --workspace --bins`, which reuses what `cargo test --workspace` compiled):
#   what the test checks does not depend on the optimiser, and an optimised build of the
#   whole dependency tree is 15.5 of a CI run's 36.5 CPU-minutes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
work="${COMPOSE_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/gateway-compose}"
mkdir -p "$work"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base=debian:bookworm-slim
case "${1:-}" in
"" | prepare) ;;
*)
    echo "usage: $0 [prepare]" >&2
    exit 2
    ;;
esac
profile="${COMPOSE_PROFILE:-release}"
case "$profile" in
release | debug) ;;
*)
    echo "COMPOSE_PROFILE must be release or debug, not $profile" >&2
    exit 2
    ;;
esac
say() { echo "compose: $*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# The engine.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (log: $work/dockerd.log)"
    as_root sh -c "nohup dockerd >'$work/dockerd.log' 2>&1 &"
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || {
        tail -n 30 "$work/dockerd.log" >&2
        exit 1
    }
fi

have_image() { docker image inspect "$1" >/dev/null 2>&1; }
# A pull from a registry, if this machine has one (bounded: a missing network fails fast).
try_pull() { timeout 60 docker pull -q "$1" >/dev/null 2>&1; }

# The base image.
if ! have_image "$base" && ! try_pull "$base"; then
    say "making $base with debootstrap from $mirror"
    rootfs="$work/rootfs"
    as_root rm -rf "$rootfs"
    if ! as_root debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
        tail -n 30 "$work/debootstrap.log" >&2
        exit 1
    fi
    as_root sh -c "cd '$rootfs' && rm -rf usr/share/doc/* usr/share/man/* usr/share/info/* \
        usr/share/locale/* var/lib/apt/lists/* var/cache/apt/*.bin var/cache/apt/archives/*.deb \
        var/log/*.log"
    as_root tar -C "$rootfs" -c . | docker import - "$base" >/dev/null
    as_root rm -rf "$rootfs"
fi

[ "${1:-}" = prepare ] && exit 0

# The builder.
rust_image="${RUST_IMAGE:-rust:1-bookworm}"
if ! have_image "$rust_image" && ! try_pull "$rust_image"; then
    say "$rust_image cannot be had: building the binaries ($profile) on the host for local/rust-prebuilt"
    if [ "$profile" = release ]; then
        cargo build --release --locked -p gateway -p device-sim
    else
        cargo build --locked --workspace --bins
    fi
    target_dir="$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    context="$(mktemp -d)"
    trap 'rm -rf "$context"' EXIT
    cp "$target_dir/$profile/gateway" "$target_dir/$profile/device-sim" "$context/"
    printf 'FROM %s\nCOPY gateway device-sim /out/\n' "$base" >"$context/Dockerfile"
    docker build -q -t local/rust-prebuilt "$context" >/dev/null
    rust_image=local/rust-prebuilt
fi

say "running the compose test (builder image: $rust_image)"
# --workspace: the same feature set as the README's `cargo test --workspace`, so its build is reused.
RUST_IMAGE="$rust_image" cargo test --workspace --test compose -- --ignored --nocapture
