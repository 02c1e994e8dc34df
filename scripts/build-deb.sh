#!/usr/bin/env bash
# Builds the .deb with cargo-deb from a prebuilt binary.
#
#   bash scripts/build-deb.sh                           # cargo build --release, then package
#   bash scripts/build-deb.sh --binary PATH [--fast] [--out DIR] [--deb-version V]
#
# The package's files are staged by `scripts/install.sh --destdir target/deb-stage` (relative to
# the repository, whatever CARGO_TARGET_DIR says: Cargo.toml's [package.metadata.deb] assets
# point there), so install.sh and the .deb install the same layout; then `cargo deb --no-build`
# packs them with the maintainer scripts of scripts/debian/. Output: DIR (default
# $CARGO_TARGET_DIR/debian). Needs cargo-deb (`cargo install cargo-deb --locked`).
# tests/packaging.rs packs the debug binary this way (--fast: gzip instead of xz).
set -euo pipefail
cd "$(dirname "$0")/.."

BINARY=""
OUT="${CARGO_TARGET_DIR:-target}/debian"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY="${2:?}"; shift 2 ;;
    --out) OUT="${2:?}"; shift 2 ;;
    --fast) EXTRA+=(--fast -Z gz); shift ;;
    --deb-version) EXTRA+=(--deb-version "${2:?}"); shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

command -v cargo-deb >/dev/null 2>&1 || {
  echo "build-deb.sh: cargo-deb is not installed; fix: cargo install cargo-deb --locked" >&2
  exit 1
}
if [ -z "$BINARY" ]; then
  cargo build --release --locked
  BINARY="${CARGO_TARGET_DIR:-target}/release/modelgate"
fi

STAGE=target/deb-stage
rm -rf "$STAGE"
bash scripts/install.sh --binary "$BINARY" --destdir "$STAGE" --prefix /usr >/dev/null
mkdir -p "$OUT"
# --compress-system: the system gzip/xz; cargo-deb's built-in compressor took 200 s for 36 MB.
cargo deb --no-build --no-strip --compress-system "${EXTRA[@]}" -o "$OUT"
