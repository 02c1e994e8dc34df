#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what it needs, then runs
# formatting, lints, unit tests, in-process integration tests and (as root) the namespace lab.
#
#   bash scripts/test.sh            # everything
#   SKIP_INSTALL=1 bash scripts/test.sh   # skip apt (already installed)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

install_deps() {
  [ "${SKIP_INSTALL:-0}" = 1 ] && return 0
  local need=()
  for pair in wireguard-go:wireguard-go wg:wireguard-tools nft:nftables ip:iproute2 \
              iperf3:iperf3 nginx:nginx wrk:wrk curl:curl python3:python3 openssl:openssl \
              pebble:pebble pebble-challtestsrv:pebble \
              systemd-analyze:systemd man:man-db strip:binutils setpriv:util-linux \
              systemd-nspawn:systemd-container debootstrap:debootstrap; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
  done
  # The shared-store tests start throwaway clusters with PostgreSQL 15's own binaries.
  [ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "missing packages: ${need[*]} (run as root, or apt-get install them)" >&2
    else
      log "installing ${need[*]}"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
  fi
}

install_python() {
  # The openai SDK (a real client) for the gateway tests, in a project-local venv.
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import openai' 2>/dev/null; then
    log "python venv with openai (.venv)"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check openai
  fi
}

install_llama_server() {
  # llama.cpp's llama-server, the real model server some tests run against: built once (about
  # 8-11 minutes on 2 cores) into a cache outside the repository, then found there in milliseconds.
  # MODELGATE_SKIP_LLAMA=1 skips it.
  [ "${MODELGATE_SKIP_LLAMA:-0}" = 1 ] && return 0
  bash scripts/llama-server.sh >/dev/null
}

install_cargo_deb() {
  # tests/system/packaging.rs builds the .deb with cargo-deb (not in Debian's archive). A few
  # minutes once per machine; MODELGATE_SKIP_DEB=1 skips it and that test.
  [ "${SKIP_INSTALL:-0}" = 1 ] && return 0
  [ "${MODELGATE_SKIP_DEB:-0}" = 1 ] && return 0
  command -v cargo-deb >/dev/null 2>&1 && return 0
  log "cargo install cargo-deb --locked"
  cargo install cargo-deb --locked --quiet
}

install_cargo_deny() {
  # `cargo deny check` (deny.toml: advisories, licenses, duplicate crates, sources) is not in
  # Debian's archive either. A few minutes once per machine.
  [ "${SKIP_INSTALL:-0}" = 1 ] && return 0
  command -v cargo-deny >/dev/null 2>&1 && return 0
  log "cargo install cargo-deny --locked"
  cargo install cargo-deny --locked --quiet
}

install_deps
install_python
install_llama_server
install_cargo_deb
install_cargo_deny

log "cargo fmt --check"
cargo fmt --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

log "cargo deny check"
# The advisory database is fetched from GitHub. A machine that cannot resolve github.com (this
# project's CI machine cannot) checks against the copy in ~/.cargo/advisory-dbs instead, says how
# old it is, and fails when there is none; CARGO_DENY_OFFLINE=1 forces that.
deny_offline=${CARGO_DENY_OFFLINE:-0}
if [ "$deny_offline" != 1 ] && ! getent hosts github.com >/dev/null 2>&1; then
  deny_offline=1
fi
if [ "$deny_offline" = 1 ]; then
  db=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/advisory-dbs/advisory-db-* 2>/dev/null | head -n 1 || true)
  # --offline resolves the whole graph, other platforms' crates too (listenfd's Windows
  # dependencies), which a Linux build never downloads: fetch them from crates.io first.
  cargo fetch --locked --quiet
  if [ -z "$db" ]; then
    # A clean CI machine that cannot reach GitHub has no RustSec database at all: licenses,
    # bans (duplicates) and sources are still checked; the advisories are not, and this says so.
    echo "WARNING: advisories NOT checked: github.com is unreachable and no RustSec database is cached in ${CARGO_HOME:-$HOME/.cargo}/advisory-dbs (fix: run once with access to GitHub, or clone github.com/rustsec/advisory-db there); checking bans, licenses and sources only" >&2
    cargo deny --offline check bans licenses sources
  else
    echo "note: advisories checked OFFLINE against the cached RustSec database of $(git -C "$db" log -1 --format=%cs 2>/dev/null || echo '?') (github.com unreachable)"
    cargo deny --offline check
  fi
else
  cargo deny check
fi

# Every skipped test writes one line here (tests/support/skip.rs): the list and the count are
# printed at the end, pass or fail. As root or with CI set, a missing prerequisite fails its
# test instead; only skips asked for (MODELGATE_SKIP_BOOT=1, …) remain.
MODELGATE_SKIP_LOG=$(mktemp "${TMPDIR:-/tmp}/modelgate-skips.XXXXXX")
export MODELGATE_SKIP_LOG
print_skips() {
  local n
  n=$(grep -c '^SKIPPED' "$MODELGATE_SKIP_LOG" 2>/dev/null || true)
  log "skipped tests: ${n:-0}"
  sed 's/^/  /' "$MODELGATE_SKIP_LOG" 2>/dev/null
  rm -f "$MODELGATE_SKIP_LOG"
}
trap print_skips EXIT

# One debug build serves every test target; the namespace tests reuse the same binary.
log "cargo test (unit, in-process, CLI, namespace lab when root)"
if [ "$(id -u)" != 0 ] && [ -z "${CI:-}" ]; then
  echo "note: not root and CI unset: the namespace tests will be skipped (listed at the end; CI runs as root)"
fi
cargo test --all-targets --no-fail-fast -- --test-threads="${TEST_THREADS:-2}"
