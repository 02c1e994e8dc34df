#!/usr/bin/env bash
# Tunnel benchmark: modelgate's userspace data plane against a wireguard-go ↔ wireguard-go anchor,
# in one namespace lab (scripts/lab.sh), one run, against the same servers in the model namespace.
#
#   A (anchor)    wireguard-go TUN in the edge, kernel route 10.20.0.0/24 via it; clients in the
#                 edge hit 10.20.0.5 directly.
#   B (modelgate) `modelgate run --forward 127.0.0.1:P=10.20.0.5:PORT` in the edge; clients in the
#                 edge hit 127.0.0.1:P. The corp peer is configured from `modelgate peer add`.
#
# Both paths share the corp side: wireguard-go behind a stateful, NATting firewall, dialling out.
#
# Measures (2 cores are shared by both tunnel ends and the load tools, so numbers are relative):
#   1. single TCP stream throughput, iperf3 -t DURATION, appliance→model and model→appliance (-R)
#   2. HTTP keep-alive GET latency p50/p99, one connection: wrk -t1 -c1 -dDURATION --latency
#      against nginx in the model namespace serving a small static body
#   3. time to the first SSE event p50/p99, one keep-alive connection, 500 requests
#      (scripts/lib/sse_first_chunk.py against tests/python/model_server.py)
#   4. idle CPU of the appliance-side process (modelgate, or the edge wireguard-go for A) with the
#      peer connected, over IDLE seconds, from /proc/PID/stat utime+stime, % of one core
#
# Usage (root): bash scripts/bench-tunnel.sh [--out FILE] [--duration S] [--idle S] [--only-anchor]
#   MODELGATE_BIN   the binary for path B (default target/release/modelgate); path B is skipped
#                   with a message when it is missing or `run` does not come up.
# Installs missing Debian packages (wireguard-go wireguard-tools nftables iproute2 iperf3 nginx
# wrk jq python3) with apt-get. Traffic stays in the lab's namespaces. Everything started is killed by PID.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=scripts/lab.sh
source "$HERE/lab.sh"

OUT=""
DURATION=10
IDLE=30
ONLY_ANCHOR=0
MODELGATE_BIN=${MODELGATE_BIN:-$ROOT/target/release/modelgate}

while (($#)); do
    case $1 in
        --out) OUT=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --idle) IDLE=$2; shift 2 ;;
        --only-anchor) ONLY_ANCHOR=1; shift ;;
        -h | --help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/lib/bench-common.sh
source "$HERE/lib/bench-common.sh"
bench_init b

# Waits (bounded) until an HTTP GET from the edge succeeds.
wait_http() {
    local url=$1
    for _ in $(seq 60); do
        if ip netns exec "$NS_EDGE" curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then
            return 0
        fi
        sleep 0.5
    done
    die "GET $url from the edge did not succeed within ~30 s"
}

# --- model namespace servers ---------------------------------------------------------------------
start_servers() {
    mkdir -p "$WORK/nginx/www" "$WORK/nginx/tmp"
    # A small static body, like a short JSON reply.
    printf '{"object":"list","data":[{"id":"bench-model","object":"model"}]}\n' >"$WORK/nginx/www/small"
    cat >"$WORK/nginx/nginx.conf" <<EOF
daemon off;
user root;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    default_type application/json;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    tcp_nodelay on;
    server {
        listen $MODEL_ADDR:8080;
        root $WORK/nginx/www;
    }
}
EOF
    ip netns exec "$NS_MODEL" nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" \
        >"$WORK/nginx/stdout.log" 2>&1 &
    PIDS+=("$!")
    ip netns exec "$NS_MODEL" iperf3 -s -B "$MODEL_ADDR" -p 5201 >"$WORK/iperf3-server.log" 2>&1 &
    PIDS+=("$!")
    ip netns exec "$NS_MODEL" python3 -u "$ROOT/tests/python/model_server.py" "$MODEL_ADDR" 8000 \
        >"$WORK/model-server.log" 2>&1 &
    PIDS+=("$!")
    # Wait until both listen (bounded).
    for _ in $(seq 50); do
        if ip netns exec "$NS_MODEL" ss -Htln "sport = :8080" | grep -q . &&
            ip netns exec "$NS_MODEL" ss -Htln "sport = :5201" | grep -q . &&
            ip netns exec "$NS_MODEL" ss -Htln "sport = :8000" | grep -q .; then
            return 0
        fi
        sleep 0.1
    done
    die "nginx, iperf3 or model_server.py did not start in $NS_MODEL (see $WORK)"
}

# --- measurements --------------------------------------------------------------------------------
# iperf3 HOST PORT [-R] → Gbit/s received
measure_iperf() {
    local host=$1 port=$2 json
    shift 2
    json=$(ip netns exec "$NS_EDGE" timeout $((DURATION + 30)) \
        iperf3 -c "$host" -p "$port" -t "$DURATION" -J "$@") || {
        log "iperf3 $* failed: $(jq -r '.error // empty' <<<"$json" 2>/dev/null)"
        echo "n/a"
        return 0
    }
    jq -r '.end.sum_received.bits_per_second / 1e9 * 1000 | round / 1000' <<<"$json"
}

# wrk URL → "p50_ms p99_ms requests_per_s"
measure_wrk() {
    local url=$1 out
    out=$(ip netns exec "$NS_EDGE" timeout $((DURATION + 30)) \
        wrk -t1 -c1 -d"${DURATION}s" --latency "$url" 2>&1) || {
        log "wrk failed: $out"
        echo "n/a n/a n/a"
        return 0
    }
    echo "$out" >>"$WORK/wrk.log"
    wrk_summary <<<"$out" | cut -d" " -f1-3
}

# UDP datagrams a namespace dropped because a socket's receive buffer was full (RcvbufErrors):
# where a tunnel sender's bursts overflow the receiving WireGuard socket.
udp_rcvbuf_errors() {
    ip netns exec "$1" awk '$1 == "Udp:" && $2 ~ /^[0-9]+$/ { print $6 }' /proc/net/snmp
}

# sse HOST PORT → "p50_ms p99_ms"
measure_sse() {
    ip netns exec "$NS_EDGE" timeout 90 python3 "$HERE/lib/sse_first_chunk.py" "$1" "$2" 500 ||
        echo "n/a n/a"
}

# idle CPU of PID over IDLE seconds, % of one core
measure_idle_cpu() {
    local pid=$1 t0 t1 hz
    hz=$(getconf CLK_TCK)
    t0=$(proc_cpu_ticks "$pid")
    sleep "$IDLE"
    kill -0 "$pid" 2>/dev/null || { echo "n/a"; return 0; }
    t1=$(proc_cpu_ticks "$pid")
    awk -v a="$t0" -v b="$t1" -v hz="$hz" -v s="$IDLE" 'BEGIN { printf "%.2f\n", (b - a) / hz / s * 100 }'
}

# Runs all measurements against HOST with iperf PORT and nginx URL, appliance PID; sets R_*.
measure_path() {
    local name=$1 host=$2 iperf_port=$3 url=$4 pid=$5 sse_port=$6
    local d0
    log "$name: iperf3 appliance→model, ${DURATION}s"
    d0=$(udp_rcvbuf_errors "$NS_CORP")
    R_UP=$(measure_iperf "$host" "$iperf_port")
    R_UP_DROPS=$(($(udp_rcvbuf_errors "$NS_CORP") - d0))
    log "$name: iperf3 model→appliance (-R), ${DURATION}s"
    d0=$(udp_rcvbuf_errors "$NS_EDGE")
    R_DOWN=$(measure_iperf "$host" "$iperf_port" -R)
    R_DOWN_DROPS=$(($(udp_rcvbuf_errors "$NS_EDGE") - d0))
    log "$name: wrk keep-alive GET, 1 connection, ${DURATION}s"
    read -r R_P50 R_P99 R_RPS < <(measure_wrk "$url")
    log "$name: SSE first event, 500 requests, 1 connection"
    read -r R_SSE50 R_SSE99 < <(measure_sse "$host" "$sse_port")
    log "$name: idle CPU over ${IDLE}s"
    R_IDLE=$(measure_idle_cpu "$pid")
    log "$name: up ${R_UP} Gbit/s, down ${R_DOWN} Gbit/s, p50 ${R_P50} ms, p99 ${R_P99} ms, SSE first ${R_SSE50} ms, idle ${R_IDLE}%"
}

# --- path A: wireguard-go ↔ wireguard-go ----------------------------------------------------------
run_anchor() {
    anchor_up
    local edge_pid=$ANCHOR_EDGE_PID
    wait_http "http://$MODEL_ADDR:8080/small"

    measure_path "A wireguard-go" "$MODEL_ADDR" 5201 "http://$MODEL_ADDR:8080/small" "$edge_pid" 8000
    A_UP=$R_UP A_DOWN=$R_DOWN A_P50=$R_P50 A_P99=$R_P99 A_RPS=$R_RPS A_IDLE=$R_IDLE
    A_SSE50=$R_SSE50 A_SSE99=$R_SSE99 A_UP_DROPS=$R_UP_DROPS A_DOWN_DROPS=$R_DOWN_DROPS

    anchor_down
}

# --- path B: modelgate ---------------------------------------------------------------------------
B_NOTE=""
run_modelgate() {
    if [[ ! -x $MODELGATE_BIN ]]; then
        B_NOTE="skipped: $MODELGATE_BIN not found (build it or set MODELGATE_BIN)"
        return 0
    fi
    local cfg=$WORK/mg/modelgate.toml
    mkdir -p "$WORK/mg/state"
    if ! "$MODELGATE_BIN" --config "$cfg" init --public-endpoint "$EDGE_PUBLIC:$LAB_WG_PORT" \
        --wg-listen "$EDGE_PUBLIC:$LAB_WG_PORT" --tunnel-address 10.99.0.1/24 \
        --state-dir "$WORK/mg/state" --listen 127.0.0.1:8443 --self-signed gw.test \
        --control-socket "$WORK/mg/control.sock" >"$WORK/mg/init.log" 2>&1; then
        B_NOTE="skipped: modelgate init failed: $(tail -3 "$WORK/mg/init.log" | tr '\n' ' ')"
        return 0
    fi
    if ! "$MODELGATE_BIN" --config "$cfg" peer add corp --allowed-ips "$LAN_NET" \
        >"$WORK/mg/corp.conf" 2>"$WORK/mg/peer-add.log"; then
        B_NOTE="skipped: modelgate peer add failed: $(tail -3 "$WORK/mg/peer-add.log" | tr '\n' ' ')"
        return 0
    fi
    ip netns exec "$NS_EDGE" "$MODELGATE_BIN" --config "$cfg" run \
        --forward 127.0.0.1:15201="$MODEL_ADDR":5201 \
        --forward 127.0.0.1:18080="$MODEL_ADDR":8080 \
        --forward 127.0.0.1:18000="$MODEL_ADDR":8000 >"$WORK/mg/run.log" 2>&1 &
    local mg_pid=$!
    PIDS+=("$mg_pid")
    start_wg "$NS_CORP" "$WG_CORP"
    local corp_pid=$WG_PID
    lab_wg_conf "$NS_CORP" "$WG_CORP" "$WORK/mg/corp.conf"

    local ok=0
    for _ in $(seq 60); do
        if ! kill -0 "$mg_pid" 2>/dev/null; then break; fi
        if ip netns exec "$NS_EDGE" curl -fsS -o /dev/null --max-time 2 \
            "http://127.0.0.1:18080/small" 2>/dev/null; then
            ok=1
            break
        fi
        sleep 0.5
    done
    if ((ok == 0)); then
        B_NOTE="failed: no HTTP through modelgate's forward within ~30 s; run log: $(tail -5 "$WORK/mg/run.log" | tr '\n' ' ')"
        cp "$WORK/mg/run.log" "/tmp/mg-bench-run-$TAG.log" 2>/dev/null || true
        stop_pids "$mg_pid" "$corp_pid"
        return 0
    fi

    measure_path "B modelgate" 127.0.0.1 15201 "http://127.0.0.1:18080/small" "$mg_pid" 18000
    B_UP=$R_UP B_DOWN=$R_DOWN B_P50=$R_P50 B_P99=$R_P99 B_RPS=$R_RPS B_IDLE=$R_IDLE
    B_SSE50=$R_SSE50 B_SSE99=$R_SSE99 B_UP_DROPS=$R_UP_DROPS B_DOWN_DROPS=$R_DOWN_DROPS
    if ! kill -0 "$mg_pid" 2>/dev/null; then
        B_NOTE="modelgate exited during the run; log: $(tail -5 "$WORK/mg/run.log" | tr '\n' ' ')"
    fi
    stop_pids "$mg_pid" "$corp_pid"
}

# --- main ----------------------------------------------------------------------------------------
log "lab $TAG: building namespaces"
LAB_OWNER_PID=$$ lab_up "$TAG"
start_servers
log "path A: wireguard-go ↔ wireguard-go"
run_anchor
B_UP="" B_DOWN="" B_P50="" B_P99="" B_RPS="" B_IDLE="" B_SSE50="" B_SSE99="" B_UP_DROPS="" B_DOWN_DROPS=""
if ((ONLY_ANCHOR)); then
    B_NOTE="skipped (--only-anchor)"
else
    log "path B: modelgate ($MODELGATE_BIN)"
    run_modelgate
fi

B_VER=""
[[ -x $MODELGATE_BIN ]] && B_VER=" ($("$MODELGATE_BIN" --version 2>/dev/null || echo "?"))"
table=$(
    cat <<EOF
## Tunnel benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, kernel $(uname -r))

A = wireguard-go ↔ wireguard-go (TUN, kernel TCP), B = modelgate$B_VER \`run --forward\` ↔ wireguard-go.
iperf3 -t $DURATION (single stream), wrk -t1 -c1 -d${DURATION}s against nginx (small static body), SSE: 500 × time to first event on one connection, idle CPU over ${IDLE}s.

| metric | A wireguard-go | B modelgate | B/A | target |
|---|---|---|---|---|
| TCP appliance→model (Gbit/s) | $A_UP | ${B_UP:-–} | $(ratio "$B_UP" "$A_UP") | ≥ 1.0 |
| TCP model→appliance, -R (Gbit/s) | $A_DOWN | ${B_DOWN:-–} | $(ratio "$B_DOWN" "$A_DOWN") | ≥ 1.0 |
| UDP rcvbuf drops at corp during →model run | $A_UP_DROPS | ${B_UP_DROPS:-–} | | |
| UDP rcvbuf drops at edge during -R run | $A_DOWN_DROPS | ${B_DOWN_DROPS:-–} | | |
| HTTP keep-alive GET p50 (ms) | $A_P50 | ${B_P50:-–} | $(ratio "$B_P50" "$A_P50") | ≤ 1.1 |
| HTTP keep-alive GET p99 (ms) | $A_P99 | ${B_P99:-–} | $(ratio "$B_P99" "$A_P99") | |
| SSE first event p50 (ms) | $A_SSE50 | ${B_SSE50:-–} | $(ratio "$B_SSE50" "$A_SSE50") | |
| SSE first event p99 (ms) | $A_SSE99 | ${B_SSE99:-–} | $(ratio "$B_SSE99" "$A_SSE99") | |
| HTTP requests/s (1 conn) | $A_RPS | ${B_RPS:-–} | $(ratio "$B_RPS" "$A_RPS") | |
| idle CPU, appliance process (% of a core) | $A_IDLE | ${B_IDLE:-–} | | ≈ 0 |
EOF
    if [[ -n $B_NOTE ]]; then printf '\nB: %s\n' "$B_NOTE"; fi
)
echo "$table"
if [[ -n $OUT ]]; then
    echo "$table" >"$OUT"
    log "wrote $OUT"
fi
