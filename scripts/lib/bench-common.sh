# Shared by scripts/bench-*.sh (sourced after scripts/lab.sh): the guards, process bookkeeping and
# helpers of one benchmark run in one namespace lab.
#
#   bench_init PREFIX     root check, packages, lab names (tag PREFIX + PID), $WORK, $PIDS, traps
#   stop_pids PID…        stop and forget started processes (bounded wait, then SIGKILL)
#   start_wg NS IF        wireguard-go IF in NS in the foreground; sets WG_PID
#   wait_handshake NS IF  bounded wait for IF's first handshake
#   anchor_up / anchor_down
#                         the wireguard-go ↔ wireguard-go tunnel (edge TUN with a kernel route to
#                         the LAN, corp dialling out); sets ANCHOR_EDGE_PID / ANCHOR_CORP_PID
#   wrk_summary           wrk --latency output on stdin → "p50_ms p99_ms requests_per_s non2xx"
#   proc_cpu_ticks PID    utime+stime of PID in clock ticks
#   ratio B A             B/A with two decimals, "–" when either is missing
#
# Every process is started in the background by the caller and appended to PIDS; the EXIT trap
# stops them by PID and takes the lab down. Nothing is ever killed by name.

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

ensure_packages() {
    local -A need=([wireguard-go]=wireguard-go [wg]=wireguard-tools [wg-quick]=wireguard-tools
        [nft]=nftables [ip]=iproute2 [iperf3]=iperf3 [nginx]=nginx [wrk]=wrk [jq]=jq [python3]=python3
        [openssl]=openssl [tcpdump]=tcpdump)
    local cmd missing=()
    for cmd in "${!need[@]}"; do
        command -v "$cmd" >/dev/null || missing+=("${need[$cmd]}")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing missing packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # iperf3's postinst asks whether to start a daemon; answer no.
    echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections 2>/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

bench_init() {
    local prefix=$1
    [[ $(id -u) == 0 ]] || die "must run as root (it creates network namespaces)"
    ensure_packages
    TAG="$prefix$(($$ % 100000000))"
    lab_names "$TAG"
    WORK=$(mktemp -d /tmp/mg-bench.XXXXXX)
    PIDS=()
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Bounded wait: 50 × 0.1 s, then SIGKILL.
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    lab_down "$TAG"
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        log "kept $WORK (BENCH_KEEP=1)"
    else
        rm -rf "$WORK"
    fi
}

# Stops the given PIDs (and forgets them), bounded like cleanup.
stop_pids() {
    local pid keep=() p
    for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        [[ " $* " == *" $p "* ]] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
}

# Starts wireguard-go IF in NS in the foreground; sets WG_PID.
start_wg() {
    local ns=$1 ifn=$2
    rm -f "/var/run/wireguard/$ifn.sock"
    ip netns exec "$ns" env WG_PROCESS_FOREGROUND=1 LOG_LEVEL=error \
        wireguard-go -f "$ifn" >"$WORK/$ifn.log" 2>&1 &
    WG_PID=$!
    PIDS+=("$WG_PID")
    lab_wg_wait_sock "$ifn"
}

# Waits (bounded) until wireguard-go IF in NS has completed a handshake.
wait_handshake() {
    local ns=$1 ifn=$2 ts
    for _ in $(seq 100); do
        ts=$(ip netns exec "$ns" wg show "$ifn" latest-handshakes | awk '{print $2}' | head -1)
        [[ -n $ts && $ts != 0 ]] && return 0
        sleep 0.1
    done
    die "no WireGuard handshake on $ifn in $ns within 10 s"
}

# The anchor: wireguard-go in the edge (kernel route 10.20.0.0/24 via its TUN) ↔ wireguard-go in
# the corp, which dials out through its NAT. Sets ANCHOR_EDGE_PID and ANCHOR_CORP_PID.
anchor_up() {
    local edge_key corp_key
    edge_key=$(wg genkey)
    corp_key=$(wg genkey)
    cat >"$WORK/anchor-edge.conf" <<EOF
[Interface]
PrivateKey = $edge_key
ListenPort = $LAB_WG_PORT
Address = 10.99.0.1/24
MTU = 1420

[Peer]
PublicKey = $(wg pubkey <<<"$corp_key")
AllowedIPs = 10.99.0.2/32, $LAN_NET
EOF
    cat >"$WORK/anchor-corp.conf" <<EOF
[Interface]
PrivateKey = $corp_key
Address = 10.99.0.2/24
MTU = 1420

[Peer]
PublicKey = $(wg pubkey <<<"$edge_key")
Endpoint = $EDGE_PUBLIC:$LAB_WG_PORT
AllowedIPs = 10.99.0.1/32
PersistentKeepalive = 25
EOF
    start_wg "$NS_EDGE" "$WG_EDGE"
    ANCHOR_EDGE_PID=$WG_PID
    lab_wg_conf "$NS_EDGE" "$WG_EDGE" "$WORK/anchor-edge.conf"
    start_wg "$NS_CORP" "$WG_CORP"
    ANCHOR_CORP_PID=$WG_PID
    lab_wg_conf "$NS_CORP" "$WG_CORP" "$WORK/anchor-corp.conf"
    wait_handshake "$NS_CORP" "$WG_CORP"
}

anchor_down() {
    stop_pids "$ANCHOR_EDGE_PID" "$ANCHOR_CORP_PID"
    rm -f "/var/run/wireguard/$WG_EDGE.sock" "/var/run/wireguard/$WG_CORP.sock"
}

# wrk --latency output (stdin) → "p50_ms p99_ms requests_per_s non2xx"
wrk_summary() {
    awk '
        function ms(v) {
            if (v ~ /us$/) { sub(/us$/, "", v); return v / 1000 }
            if (v ~ /ms$/) { sub(/ms$/, "", v); return v + 0 }
            if (v ~ /s$/)  { sub(/s$/, "", v);  return v * 1000 }
            return v
        }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        $1 == "Requests/sec:" { rps = $2 }
        /Non-2xx or 3xx responses:/ { bad = $NF }
        END { printf "%.3f %.3f %d %d\n", p50, p99, rps, bad }'
}

# utime + stime of PID, in clock ticks (fields 14 and 15, after the parenthesised name).
proc_cpu_ticks() {
    sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

ratio() {
    awk -v b="$1" -v a="$2" 'BEGIN {
        if (a == "" || b == "" || a == "n/a" || b == "n/a" || a + 0 == 0) { print "–"; exit }
        printf "%.2f\n", b / a }'
}
