#!/usr/bin/env bash
# Installs and starts everything thaw's build, tests and embedded service need
# on a fresh Debian (bookworm) machine, as root, without questions. Safe to run
# again: it only installs what is missing and only starts what is down.
#
# After it: runsc, debootstrap, Redis on 127.0.0.1:6379, PostgreSQL on
# 127.0.0.1:5432 with role/database `thaw` (password `thaw`), and the Rust
# toolchain's fmt and clippy.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/setup.sh must run as root (it installs packages and starts services)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
packages=(
  runsc            # gVisor: the sandbox on machines without usable KVM
  debootstrap      # root filesystems for the runtimes
  redis-server     # pool-manager's shared store (tests, distributed mode)
  postgresql       # gateway's database in distributed mode (tests)
  iproute2 procps util-linux psmisc e2fsprogs
  python3 ca-certificates curl
  libclang-dev     # bindgen, for the userfaultfd crate (snapshot engine)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Node.js for the node runner's tests (any node on PATH will do).
if ! command -v node >/dev/null 2>&1; then
  log "installing nodejs"
  apt-get install -y -qq --no-install-recommends nodejs >/dev/null
fi

# Redis: a plain daemon on loopback; no systemd needed.
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting redis on 127.0.0.1:6379"
  redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly no \
    --logfile /var/log/thaw-redis.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# PostgreSQL: the Debian cluster, plus a `thaw` role and database.
pg_ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h 2>/dev/null | grep -q .; then
  pg_createcluster "$pg_ver" main >/dev/null
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  log "starting postgresql $pg_ver"
  pg_ctlcluster "$pg_ver" main start
  for _ in $(seq 100); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.1; done
fi
if ! su postgres -c "psql -tAc \"select 1 from pg_roles where rolname='thaw'\"" | grep -q 1; then
  su postgres -c "psql -qc \"create role thaw login superuser password 'thaw'\""
fi
if ! su postgres -c "psql -tAc \"select 1 from pg_database where datname='thaw'\"" | grep -q 1; then
  su postgres -c "psql -qc \"create database thaw owner thaw\""
fi

# The toolchain's components the checks use.
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
fi
log "ready: runsc $(runsc --version 2>/dev/null | head -1 | awk '{print $3}'), redis, postgresql $pg_ver"
