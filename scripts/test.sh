#!/usr/bin/env bash
# The project's test command (README.md): installs and starts what the tests
# need (scripts/setup.sh), then checks formatting and lints and runs every
# test of the workspace. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export THAW_TEST_DATABASE_URL="${THAW_TEST_DATABASE_URL:-postgres://thaw:thaw@127.0.0.1:5432/thaw}"
# Root filesystems built by the tests are cached here between runs, so a
# second run does not debootstrap again.
export THAW_TEST_CACHE_DIR="${THAW_TEST_CACHE_DIR:-/var/cache/thaw-test}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== the driver seam"
# vmhost's core never names a sandbox backend: only driver/<backend>/, the
# config that picks one, and main may (as Cloud Hypervisor's vmm never
# names kvm_ioctls).
if grep -rnE 'gvisor::|Gvisor[A-Z][a-z]|firecracker::|Firecracker[A-Z][a-z]' vmhost/src --include='*.rs' \
    | grep -vE '^vmhost/src/(driver/|config\.rs|main\.rs)'; then
    echo "a sandbox backend is named outside vmhost/src/driver/" >&2
    exit 1
fi
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked -- --test-threads="${THAW_TEST_THREADS:-2}"
