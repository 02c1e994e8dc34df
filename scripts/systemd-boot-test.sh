#!/usr/bin/env bash
# Boots the packaged units for real: a Debian 12 root made with debootstrap, the .deb installed
# with dpkg, `modelgate init`, both units enabled, then `systemd-nspawn --boot` with a private
# network. A check unit inside the container inspects the running daemon (user, capabilities,
# seccomp, sockets, state ownership, firewall table, reload, stop) and powers the container off;
# this script then asserts on what it wrote.
#
#   sudo bash scripts/systemd-boot-test.sh --deb PATH
#
# Needs root, systemd-container and debootstrap (installed with apt when missing) and Debian's
# archive. The debootstrapped root is cached as a tarball ($MODELGATE_BOOT_CACHE, default
# /var/tmp/modelgate-boot-root.tar) so only the first run on a machine pays for it (~2 min).
# tests/system/systemd.rs runs this with the .deb that scripts/build-deb.sh makes from the debug
# binary.
#
# The daemon side of sd_notify may not be in the binary under test: when the binary never
# mentions NOTIFY_SOCKET, a drop-in switches the unit to Type=exec for this boot (everything
# else unchanged) and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB=""
while [ $# -gt 0 ]; do
  case "$1" in
    --deb) DEB="${2:?}"; shift 2 ;;
    *) echo "systemd-boot-test.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -f "$DEB" ] || { echo "systemd-boot-test.sh: --deb PATH required" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "systemd-boot-test.sh: needs root" >&2; exit 1; }

need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

CACHE="${MODELGATE_BOOT_CACHE:-/var/tmp/modelgate-boot-root.tar}"
WORK="$(mktemp -d /var/tmp/modelgate-boot.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/root"
mkdir -p "$ROOT"
t0=$(date +%s)
if [ ! -s "$CACHE" ]; then
  echo "== debootstrap bookworm (cached afterwards in $CACHE)"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,nftables,iproute2,procps \
    bookworm "$ROOT" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  tar -C "$ROOT" -cf "$CACHE.tmp" . && mv "$CACHE.tmp" "$CACHE"
else
  tar -C "$ROOT" -xf "$CACHE"
fi
t1=$(date +%s)

# --keep-unit --register=no: the host need not run systemd (no machined, no system bus).
nspawn() { systemd-nspawn -q --register=no --keep-unit -D "$ROOT" "$@"; }
cp "$DEB" "$ROOT/root/modelgate.deb"
nspawn --pipe dpkg -i /root/modelgate.deb >"$WORK/dpkg.log" 2>&1 || { cat "$WORK/dpkg.log"; exit 1; }
nspawn --pipe modelgate init --public-endpoint 192.0.2.1:51820 --self-signed gw.test >/dev/null 2>&1
echo "MODELGATE_SSH_FROM=192.0.2.0/24" > "$ROOT/etc/modelgate/firewall.env"
if ! grep -q NOTIFY_SOCKET "$ROOT/usr/bin/modelgate"; then
  echo "note: this binary does not implement sd_notify yet; booting with Type=exec"
  mkdir -p "$ROOT/etc/systemd/system/modelgate.service.d"
  printf '[Service]\nType=exec\n' > "$ROOT/etc/systemd/system/modelgate.service.d/boot-test.conf"
fi

cat > "$ROOT/root/check.sh" <<'EOF'
#!/bin/sh
# Runs inside the booted container after modelgate.service; writes KEY=VALUE lines.
out=/root/check.out
{
  echo "active=$(systemctl is-active modelgate.service)"
  echo "firewall_active=$(systemctl is-active modelgate-firewall.service)"
  echo "restarts=$(systemctl show -p NRestarts --value modelgate.service)"
  pid=$(systemctl show -p MainPID --value modelgate.service)
  echo "uid=$(awk '/^Uid:/{print $2}' /proc/$pid/status)"
  echo "modelgate_uid=$(id -u modelgate)"
  for f in CapEff CapBnd CapAmb NoNewPrivs Seccomp; do
    echo "$f=$(awk -v k="$f:" '$1==k{print $2}' /proc/$pid/status)"
  done
  echo "tcp443=$(ss -Htlnp 'sport = :443' | grep -c modelgate)"
  echo "udp51820=$(ss -Hulnp 'sport = :51820' | grep -c modelgate)"
  echo "state_owner=$(stat -c %U /var/lib/modelgate/wg.key)"
  echo "run_dir=$(stat -c '%U:%G:%a' /run/modelgate)"
  echo "nft_table=$(nft list tables | grep -c 'inet modelgate')"
  echo "security=$(systemd-analyze security modelgate.service 2>/dev/null | awk '/Overall exposure/{print $(NF-2)}')"
  systemctl reload modelgate.service && echo "reload=ok" || echo "reload=failed"
  sleep 1
  echo "after_reload_active=$(systemctl is-active modelgate.service)"
  echo "after_reload_pid_same=$([ "$(systemctl show -p MainPID --value modelgate.service)" = "$pid" ] && echo yes || echo no)"
  systemctl stop modelgate.service
  echo "stop_result=$(systemctl show -p Result --value modelgate.service)"
  systemctl stop modelgate-firewall.service
  echo "nft_table_after_stop=$(nft list tables | grep -c 'inet modelgate')"
  echo "== journal"
  journalctl -u modelgate.service -u modelgate-firewall.service --no-pager | tail -40
} > "$out" 2>&1
systemctl poweroff
EOF
chmod 0755 "$ROOT/root/check.sh"
cat > "$ROOT/etc/systemd/system/modelgate-check.service" <<'EOF'
[Unit]
Description=modelgate boot check
After=modelgate.service modelgate-firewall.service
[Service]
Type=oneshot
ExecStartPre=/bin/sleep 2
ExecStart=/root/check.sh
[Install]
WantedBy=multi-user.target
EOF
nspawn --pipe systemctl enable --quiet modelgate.service modelgate-firewall.service \
  modelgate-check.service >/dev/null 2>&1

t2=$(date +%s)
echo "== booting"
timeout 180 systemd-nspawn -q --register=no --keep-unit --private-network -D "$ROOT" --boot \
  >"$WORK/boot.log" 2>&1 || { tail -40 "$WORK/boot.log"; echo "boot failed or timed out"; exit 1; }
t3=$(date +%s)
[ -s "$ROOT/root/check.out" ] || { tail -40 "$WORK/boot.log"; echo "the check unit never ran"; exit 1; }
cat "$ROOT/root/check.out"

fail=0
expect() {
  local got
  got="$(grep -m1 "^$1=" "$ROOT/root/check.out" | cut -d= -f2-)"
  if [ "$got" != "$2" ]; then echo "FAIL: $1=$got, want $2"; fail=1; fi
}
uid="$(grep -m1 '^modelgate_uid=' "$ROOT/root/check.out" | cut -d= -f2)"
expect active active
expect firewall_active active
expect restarts 0
expect uid "$uid"
expect CapEff 0000000000000400   # CAP_NET_BIND_SERVICE only
expect CapBnd 0000000000000400
expect CapAmb 0000000000000400
expect NoNewPrivs 1
expect Seccomp 2
expect tcp443 1
expect udp51820 1
expect state_owner modelgate
expect run_dir modelgate:modelgate:750
expect nft_table 1
expect reload ok
expect after_reload_active active
expect after_reload_pid_same yes
expect stop_result success
expect nft_table_after_stop 0
echo "timings: root $((t1 - t0)) s, install $((t2 - t1)) s, boot+checks+poweroff $((t3 - t2)) s"
[ "$fail" = 0 ] && echo "BOOT TEST PASSED" || { echo "BOOT TEST FAILED"; exit 1; }
