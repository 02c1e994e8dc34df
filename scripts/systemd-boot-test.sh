#!/usr/bin/env bash
# Boots the packaged units for real: a Debian 12 root made with debootstrap, the .deb installed
# with dpkg, `modelgate init`, the units enabled (modelgate.socket, modelgate.service,
# modelgate-firewall.service), then `systemd-nspawn --boot` with a private network. A check unit
# inside the container inspects the running daemon (user, capabilities, seccomp, the HTTPS
# socket handed over by systemd, state ownership, firewall table, reload), restarts it three
# times and upgrades the package (dpkg -i) under a client looping HTTPS requests to /healthz
# (counting refused connections and the longest wait), stops it, and powers the container off; this script then asserts on what it
# wrote.
#
#   sudo bash scripts/systemd-boot-test.sh --deb PATH
#
# Needs root, systemd-container and debootstrap (installed with apt when missing) and Debian's
# archive. The debootstrapped root is cached as a tarball ($MODELGATE_BOOT_CACHE, default
# /var/tmp/modelgate-boot-root-<hash of the package list>.tar) so only the first run on a
# machine pays for it (~2 min).
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

# curl: the looping client of the restart check.
PACKAGES=systemd,systemd-sysv,dbus,nftables,iproute2,procps,curl
CACHE="${MODELGATE_BOOT_CACHE:-/var/tmp/modelgate-boot-root-$(printf %s "$PACKAGES" | sha256sum | cut -c1-8).tar}"
WORK="$(mktemp -d /var/tmp/modelgate-boot.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/root"
mkdir -p "$ROOT"
t0=$(date +%s)
if [ ! -s "$CACHE" ]; then
  echo "== debootstrap bookworm (cached afterwards in $CACHE)"
  debootstrap --variant=minbase --include="$PACKAGES" \
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
  echo "socket_active=$(systemctl is-active modelgate.socket)"
  echo "firewall_active=$(systemctl is-active modelgate-firewall.service)"
  echo "restarts=$(systemctl show -p NRestarts --value modelgate.service)"
  pid=$(systemctl show -p MainPID --value modelgate.service)
  echo "uid=$(awk '/^Uid:/{print $2}' /proc/$pid/status)"
  echo "modelgate_uid=$(id -u modelgate)"
  for f in CapEff CapBnd CapAmb NoNewPrivs Seccomp; do
    echo "$f=$(awk -v k="$f:" '$1==k{print $2}' /proc/$pid/status)"
  done
  echo "tcp443=$(ss -Htlnp 'sport = :443' | grep -c modelgate)"
  # The listening socket is systemd's (pid 1), handed to the daemon.
  echo "tcp443_systemd=$(ss -Htlnp 'sport = :443' | grep -c 'systemd')"
  echo "udp51820=$(ss -Hulnp 'sport = :51820' | grep -c modelgate)"
  echo "state_owner=$(stat -c %U /var/lib/modelgate/wg.key)"
  echo "run_dir=$(stat -c '%U:%G:%a' /run/modelgate)"
  echo "nft_table=$(nft list tables | grep -c 'inet modelgate')"
  echo "security=$(systemd-analyze security modelgate.service 2>/dev/null | awk '/Overall exposure/{print $(NF-2)}')"
  systemctl reload modelgate.service && echo "reload=ok" || echo "reload=failed"
  sleep 1
  echo "after_reload_active=$(systemctl is-active modelgate.service)"
  echo "after_reload_pid_same=$([ "$(systemctl show -p MainPID --value modelgate.service)" = "$pid" ] && echo yes || echo no)"
  # Restarts under load: a client loops HTTPS requests (bounded: 12 s, 3000 requests) while
  # the service is restarted three times; every connection must be served, none refused
  # (curl exit 7), and the longest wait is reported. Then the same while the package is
  # upgraded (dpkg -i of the same .deb: its postinst try-restarts the running daemon).
  load() { # SECONDS LOG
    end=$(( $(date +%s) + $1 )); n=0
    while [ "$(date +%s)" -lt "$end" ] && [ "$n" -lt 3000 ]; do
      t0=$(date +%s%N)
      code=$(curl -sk --max-time 30 -o /dev/null -w '%{http_code}' https://127.0.0.1:443/healthz)
      rc=$?
      echo "$rc $code $(( ($(date +%s%N) - t0) / 1000000 ))"
      n=$((n + 1))
    done > "$2" 2>&1
  }
  summary() { # PREFIX LOG
    echo "$1_requests=$(wc -l < "$2")"
    echo "$1_refused=$(awk '$1 == 7' "$2" | wc -l)"
    echo "$1_failed=$(awk '$1 != 0 || $2 != "200"' "$2" | wc -l)"
    echo "$1_max_ms=$(awk 'BEGIN { m = 0 } $3 > m { m = $3 } END { print m }' "$2")"
    # Each failure: curl's exit code, the HTTP status, milliseconds, and when (line number).
    awk '$1 != 0 || $2 != "200" { print "load_failure: request " NR ": " $0 }' "$2" | head -5
  }
  load 12 /root/load.log &
  loader=$!
  for i in 1 2 3; do
    sleep 2
    t0=$(date +%s%N)
    systemctl restart modelgate.service
    echo "restart_${i}_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
  done
  wait "$loader"
  summary load /root/load.log
  before_upgrade=$(systemctl show -p MainPID --value modelgate.service)
  load 6 /root/upgrade.log &
  loader=$!
  sleep 2
  dpkg -i /root/modelgate.deb > /root/dpkg-upgrade.log 2>&1 && echo "upgrade_dpkg=ok" || echo "upgrade_dpkg=failed"
  wait "$loader"
  summary upgrade /root/upgrade.log
  echo "upgrade_pid_new=$([ "$(systemctl show -p MainPID --value modelgate.service)" != "$before_upgrade" ] && echo yes || echo no)"
  echo "after_restart_active=$(systemctl is-active modelgate.service)"
  echo "after_restart_pid_new=$([ "$(systemctl show -p MainPID --value modelgate.service)" != "$pid" ] && echo yes || echo no)"
  echo "socket_handed_over=$(journalctl -u modelgate.service --no-pager | grep -c 'socket_from_systemd=Some("https")')"
  systemctl stop modelgate.socket modelgate.service
  echo "stop_result=$(systemctl show -p Result --value modelgate.service)"
  echo "socket_after_stop=$(systemctl is-active modelgate.socket)"
  echo "tcp443_after_stop=$(ss -Htln 'sport = :443' | wc -l)"
  systemctl stop modelgate-firewall.service
  echo "nft_table_after_stop=$(nft list tables | grep -c 'inet modelgate')"
  echo "== journal"
  journalctl -u modelgate.socket -u modelgate.service -u modelgate-firewall.service --no-pager | tail -60
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
nspawn --pipe systemctl enable --quiet modelgate.socket modelgate.service \
  modelgate-firewall.service modelgate-check.service >/dev/null 2>&1

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
expect socket_active active
expect firewall_active active
expect restarts 0
expect uid "$uid"
expect CapEff 0000000000000400   # CAP_NET_BIND_SERVICE only
expect CapBnd 0000000000000400
expect CapAmb 0000000000000400
expect NoNewPrivs 1
expect Seccomp 2
expect tcp443 1
expect tcp443_systemd 1
expect udp51820 1
expect state_owner modelgate
expect run_dir modelgate:modelgate:750
expect nft_table 1
expect reload ok
expect after_reload_active active
expect after_reload_pid_same yes
expect load_refused 0
expect load_failed 0
expect upgrade_dpkg ok
expect upgrade_refused 0
expect upgrade_failed 0
expect upgrade_pid_new yes
expect after_restart_active active
expect after_restart_pid_new yes
expect socket_after_stop inactive
expect tcp443_after_stop 0
expect stop_result success
expect nft_table_after_stop 0
socket_handed="$(grep -m1 '^socket_handed_over=' "$ROOT/root/check.out" | cut -d= -f2)"
if [ "${socket_handed:-0}" -lt 5 ]; then
  echo "FAIL: socket_handed_over=$socket_handed, want 5 (the first start, three restarts, the upgrade)"; fail=1
fi
echo "restart under load: $(grep -E '^(load_[a-z_]+=|restart_[0-9]_ms|upgrade_[a-z_]+=)' "$ROOT/root/check.out" | tr '\n' ' ')"
echo "timings: root $((t1 - t0)) s, install $((t2 - t1)) s, boot+checks+poweroff $((t3 - t2)) s"
[ "$fail" = 0 ] && echo "BOOT TEST PASSED" || { echo "BOOT TEST FAILED"; exit 1; }
