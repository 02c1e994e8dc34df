#!/usr/bin/env bash
# Installs modelgate on this machine (or into a staging tree), enabling and starting nothing.
#
#   sudo bash scripts/install.sh                      # cargo build --release, then install
#   sudo bash scripts/install.sh --binary PATH        # install a binary built elsewhere
#   bash scripts/install.sh --binary PATH --destdir DIR [--prefix /usr]   # staging tree, no root
#   sudo bash scripts/install.sh --uninstall          # remove what this installed
#
# Installs: PREFIX/bin/modelgate, the systemd units (PREFIX/lib/systemd/system: modelgate.service,
# its listening socket modelgate.socket, modelgate-firewall.service), the man pages
# and bash/zsh/fish completions generated from the binary's own clap definitions
# (`modelgate generate …`), the firewall environment skeleton /etc/modelgate/firewall.env (never
# overwritten), the example config under PREFIX/share/doc/modelgate/examples; creates the
# system user and group `modelgate` (not with --destdir). /etc/modelgate/modelgate.toml and the
# state directory are `modelgate init`'s to write, and are never touched, not even by
# --uninstall. DESTDIR in the environment works like --destdir. scripts/build-deb.sh stages the
# .deb's files with this script.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=/usr
DESTDIR="${DESTDIR:-}"
BINARY=""
UNINSTALL=0
CREATE_USER=1

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY="${2:?--binary needs a path}"; shift 2 ;;
    --prefix) PREFIX="${2:?--prefix needs a path}"; shift 2 ;;
    --destdir) DESTDIR="${2:?--destdir needs a path}"; shift 2 ;;
    --no-user) CREATE_USER=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done

[ -n "$DESTDIR" ] && CREATE_USER=0
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
  die "installing into / needs root: run it with sudo (or use --destdir DIR for a staging tree)"
fi
case "$PREFIX" in /*) ;; *) die "--prefix must be absolute, got $PREFIX" ;; esac
if [ -n "$DESTDIR" ]; then
  mkdir -p "$DESTDIR"
  DESTDIR="$(cd "$DESTDIR" && pwd)"
fi

BIN_DIR="$DESTDIR$PREFIX/bin"
UNIT_DIR="$DESTDIR$PREFIX/lib/systemd/system"
MAN_DIR="$DESTDIR$PREFIX/share/man/man1"
BASH_DIR="$DESTDIR$PREFIX/share/bash-completion/completions"
ZSH_DIR="$DESTDIR$PREFIX/share/zsh/vendor-completions"
FISH_DIR="$DESTDIR$PREFIX/share/fish/vendor_completions.d"
SHARE_DIR="$DESTDIR$PREFIX/share/modelgate"
DOC_DIR="$DESTDIR$PREFIX/share/doc/modelgate"
ETC_DIR="$DESTDIR/etc/modelgate"
UNITS=(modelgate.socket modelgate.service modelgate-firewall.service)
systemd_running() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }

if [ "$UNINSTALL" = 1 ]; then
  if systemd_running; then
    # Stopping the firewall unit deletes nftables table inet modelgate.
    systemctl stop "${UNITS[@]}" 2>/dev/null || true
  elif [ -z "$DESTDIR" ] && [ -x "$BIN_DIR/modelgate" ] && command -v nft >/dev/null 2>&1; then
    "$BIN_DIR/modelgate" firewall remove || true
  fi
  if [ -z "$DESTDIR" ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --quiet "${UNITS[@]}" 2>/dev/null || true
  fi
  rm -f "$BIN_DIR/modelgate" "$BASH_DIR/modelgate" "$ZSH_DIR/_modelgate" "$FISH_DIR/modelgate.fish"
  for u in "${UNITS[@]}"; do rm -f "$UNIT_DIR/$u"; done
  rm -f "$MAN_DIR"/modelgate.1.gz "$MAN_DIR"/modelgate-*.1.gz
  rm -rf "$SHARE_DIR" "$DOC_DIR"
  systemd_running && systemctl daemon-reload || true
  cat <<EOF
modelgate uninstalled from ${DESTDIR:-/}$PREFIX.
Kept (operator data): /etc/modelgate (config, firewall.env), /var/lib/modelgate (WireGuard key,
API keys, usage) and the system user/group modelgate. Remove them by hand when you are sure:
  rm -r /etc/modelgate /var/lib/modelgate && userdel modelgate
EOF
  exit 0
fi

if [ -z "$BINARY" ]; then
  echo "== cargo build --release --locked"
  cargo build --release --locked
  BINARY="${CARGO_TARGET_DIR:-target}/release/modelgate"
fi
[ -x "$BINARY" ] || die "--binary $BINARY is not an executable file"
"$BINARY" --version >/dev/null || die "$BINARY --version failed: not a modelgate binary for this machine?"

install -d -m 0755 "$BIN_DIR" "$UNIT_DIR" "$MAN_DIR" "$BASH_DIR" "$ZSH_DIR" "$FISH_DIR" \
  "$SHARE_DIR" "$DOC_DIR/examples"
# Copy first, then strip the copy: the debug sections only make the install large (the symbol
# table stays, so backtraces keep function names).
install -m 0755 "$BINARY" "$BIN_DIR/modelgate"
if command -v strip >/dev/null 2>&1; then strip --strip-debug "$BIN_DIR/modelgate"; fi

for u in "${UNITS[@]}"; do
  sed "s#/usr/bin/modelgate#$PREFIX/bin/modelgate#g" "systemd/$u" > "$UNIT_DIR/$u"
  chmod 0644 "$UNIT_DIR/$u"
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$BIN_DIR/modelgate" generate man "$tmp/man"
for page in "$tmp"/man/*.1; do
  gzip -9n -c "$page" > "$MAN_DIR/$(basename "$page").gz"
  chmod 0644 "$MAN_DIR/$(basename "$page").gz"
done
"$BIN_DIR/modelgate" generate completions bash > "$BASH_DIR/modelgate"
"$BIN_DIR/modelgate" generate completions zsh > "$ZSH_DIR/_modelgate"
"$BIN_DIR/modelgate" generate completions fish > "$FISH_DIR/modelgate.fish"
chmod 0644 "$BASH_DIR/modelgate" "$ZSH_DIR/_modelgate" "$FISH_DIR/modelgate.fish"

install -m 0644 config/firewall.env "$SHARE_DIR/firewall.env"
install -m 0644 config/modelgate.toml "$DOC_DIR/examples/modelgate.toml"
install -m 0644 README.md "$DOC_DIR/README.md"

# Config skeleton: the directory and the firewall environment, never an existing file.
install -d -m 0755 "$ETC_DIR"
if [ ! -e "$ETC_DIR/firewall.env" ]; then
  install -m 0644 config/firewall.env "$ETC_DIR/firewall.env"
fi

if [ "$CREATE_USER" = 1 ]; then
  getent group modelgate >/dev/null || groupadd --system modelgate
  if ! getent passwd modelgate >/dev/null; then
    useradd --system --gid modelgate --home-dir /var/lib/modelgate --no-create-home \
      --shell /usr/sbin/nologin --comment "modelgate gateway" modelgate
  fi
fi
systemd_running && systemctl daemon-reload || true

version="$("$BIN_DIR/modelgate" --version)"
cat <<EOF
$version installed into ${DESTDIR:-/} (prefix $PREFIX). Nothing is enabled or started.
Next:
  sudo modelgate init --public-endpoint HOST:51820 --tls-cert FULLCHAIN --tls-key KEY
  sudo modelgate peer add corp --allowed-ips 10.20.0.0/24 > corp.conf
  sudo modelgate upstream add vllm --url http://10.20.0.5:8000
  sudo chown -R modelgate:modelgate /var/lib/modelgate
  sudo -u modelgate modelgate key create alice --models 'qwen*'
  sudoedit /etc/modelgate/firewall.env     # MODELGATE_SSH_FROM=<where you administer from>
  modelgate firewall print                 # check what the firewall will let in
  sudo systemctl enable --now modelgate-firewall.service modelgate.socket modelgate.service
Upgrading a running daemon: sudo systemctl restart modelgate (connections wait, none is refused).
EOF
