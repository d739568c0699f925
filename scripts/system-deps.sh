#!/usr/bin/env bash
# System packages the test suite drives for real, from Debian (idempotent: installs only what is missing).
# scripts/test.sh runs this, so the README's test command works on a fresh machine; needs root or sudo.
set -euo pipefail
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then $sudo apt-get update; apt_updated=1; fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}
echo "== chromium"
# The browser tests drive Debian's Chromium through Playwright (never `playwright install`: it downloads).
if ! command -v chromium >/dev/null 2>&1; then
    apt_install chromium chromium-driver
fi
echo "== bubblewrap"
# The code sandbox runs inside bwrap by default where it is installed; tests/test_sandbox_escapes.py runs the escape
# suite in that mode (docs/SECURITY.md).
if ! command -v bwrap >/dev/null 2>&1; then
    apt_install bubblewrap
fi
echo "== postgresql"
# tests/test_infra.py runs infra/dagster.yaml against a real Postgres it starts itself (initdb + pg_ctl in a temp dir).
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    apt_install postgresql
fi
echo "== compose CLI"
# tests/test_infra.py validates infra/docker-compose.yml with `docker compose config` / `docker-compose config`, which
# needs no Docker engine. Debian's docker-compose; without recommends, so no engine (docker.io) comes with it.
if ! { command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; } \
        && ! command -v docker-compose >/dev/null 2>&1; then
    apt_install --no-install-recommends docker-compose
fi
echo "== buildah, debootstrap"
# tests/test_image.py builds infra/Dockerfile with scripts/build_image.sh: buildah runs the RUN steps in a chroot (no
# Docker daemon or OCI runtime needed), and debootstrap makes a Debian base where no container registry answers.
if ! command -v buildah >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    apt_install buildah debootstrap
fi
