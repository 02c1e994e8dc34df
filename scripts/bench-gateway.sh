#!/usr/bin/env bash
# Gateway benchmark: modelgate (TLS + key auth + userspace tunnel, in the edge) against nginx (TLS
# with its own self-signed certificate + a static Bearer-key check + proxy_pass over a
# wireguard-go ↔ wireguard-go TUN tunnel), in one namespace lab (scripts/lab.sh), one run, against
# the same fake vLLM (tests/python/fake_vllm.py) in the model namespace.
#
#   N (anchor)    nginx on 192.0.2.1:443 in the edge; `map $http_authorization $ok` + `return 401`;
#                 proxy_pass to 10.20.0.5:8000 over wireguard-go (kernel route via its TUN),
#                 proxy_buffering off, upstream keepalive.
#   M (modelgate) `modelgate run` on 192.0.2.1:443 with `upstream add vllm`; corp wireguard-go from
#                 `modelgate peer add`.
# Clients run in the client namespace against https://gw.test (/etc/netns/<client>/hosts).
#
# Measures:
#   1. small non-streaming chat completions (POST, max_tokens 8, no token delay), keep-alive:
#      wrk -tTHREADS -c8 -dDURATION --latency with a Lua script (method, body, Authorization) →
#      requests/s, p50, p99, non-2xx count; with --phase also the context switches of the edge's
#      threads per request (/proc/PID/task/*/status, here and in 2: hand-offs between threads)
#   2. time to the first SSE event of a streaming chat, p50/p99, 300 sequential requests on one
#      HTTPS connection (scripts/lib/sse_first_chunk.py --tls --post)
#   3. M only: STREAMS concurrent slow SSE streams (HOLD_S tokens, one per second) held through
#      modelgate by scripts/lib/sse_hold.py: errors (non-200, broken, connect), peak RSS of the
#      modelgate process (/proc/PID/status VmHWM), its CPU over the hold (% of one core), and the
#      CPU of the fake vLLM and the client for context
#
#   4. --limits: requests/s of the same wrk load with a key without limits (off) and a key with
#      every per-key limit set high enough never to refuse (on: --rpm, --tpm, --max-concurrent,
#      --budget, so each request runs the whole limiter and settles into the usage ledger),
#      alternating off/on/off/on in one run; prints on/off (target >= 0.95). With --limits the
#      nginx path, the SSE and the hold phases are skipped.
#   5. --baseline BIN: requests/s of the same wrk load through BIN (an earlier release build, e.g.
#      modelgate-base saved before a change) and through MODELGATE_BIN, each with one upstream (one model server),
#      alternating baseline/new/baseline/new in one run (each daemon started fresh with its own
#      config, the other stopped); prints new/baseline (target >= 0.97: the one-replica path of a
#      build with replicas is not slower). Skips the other phases like --limits.
#   6. --store-compare: requests/s of the same wrk load with the embedded SQLite store and with a
#      shared PostgreSQL store (a throwaway PostgreSQL 15 cluster in the work directory, run as
#      the postgres user, reached over its Unix socket from the edge namespace; the appliance's
#      SQLite store copied there with `store migrate`), alternating sqlite/postgres/sqlite/
#      postgres in one run (each daemon fresh); prints postgres/sqlite (target >= 0.95: the
#      request path never waits for the database). Skips the other phases like --limits.
#
#   7. --phase events: CPU per token event. For each STREAMS:INTERVAL_MS of --event-sizes
#      (default 100:50 1000:500 10000:5000 200:20, i.e. 2,000 events/s at 100, 1,000 and 10,000
#      open streams, and 200 streams × 50 events/s = 10,000 events/s), STREAMS concurrent
#      streaming chats with usage metering (stream_options.include_usage), one event every
#      INTERVAL_MS each, held by scripts/lib/sse_events.py through every path in the same run;
#      over a steady --window S (default 20) after all are streaming: CPU of the appliance-side
#      processes per event (µs; modelgate vs nginx + the edge wireguard-go, utime+stime from
#      /proc/PID/stat), events/s, events/s per core of that CPU, peak RSS, streams completed.
#   8. --phase ttfb: time to the first event of a 403 KB Cursor-shaped streaming chat
#      (tests/fixtures/cursor_requests.py), a fresh HTTPS connection each (TTFB_COUNT, 40), in
#      the Chat Completions shape and in the Responses shape (translated by modelgate; nginx
#      has no translation, so its row gets the Chat Completions body: the same work for the
#      model), scripts/lib/ttfb.py.
#
#   --skip-anchor leaves path N out of a --phase run.
#   --phase LIST (comma-separated: latency, events, ttfb, hold; default latency,hold) runs only
#   those phases. With --phase, --baseline BIN is measured as a third path B in every phase
#   (same run, fresh daemon), so before/after and against nginx come from one run; without
#   --phase, --baseline is the requests/s alternation of 5. --store-compare (6) runs alone.
#
# Usage (root): bash scripts/bench-gateway.sh [--out FILE] [--duration S] [--threads N]
#               [--streams N] [--hold S] [--skip-hold] [--limits] [--baseline BIN]
#               [--phase LIST] [--event-sizes "S:MS ..."] [--window S] [--ttfb-count N]
#               [--store-compare] [--slices K]
#   --slices K (with --phase latency alone): K slices in one lab, the paths alternating
#                  within each slice (N B M, then M B N, …; a fresh nginx or daemon each time),
#                  one row per slice and the median of the per-slice ratios. Each path then
#                  meets the same drift of a shared machine. Keep --duration at 10 s: shorter
#                  slices are unfair to nginx (its upstream connections warm up; README).
#   MODELGATE_BIN  the binary (default target/release/modelgate, else $CARGO_TARGET_DIR/release)
#   BENCH_CALLGRIND=1  every modelgate path runs under valgrind --tool=callgrind and the events
#                  phase adds its instructions per event over the window (not disturbed by
#                  other processes; use low rates, e.g. --event-sizes "100:500 1000:5000")
#   BENCH_PCAP=1   the SSE measurement of every path runs under tcpdump in the edge namespace
#                  (TLS on 443 and WireGuard's UDP, headers only) and scripts/lib/hops.py splits
#                  the 300 requests at the edge: inbound (client's request in → tunnel packet
#                  out), beyond (the corp side and the model, shared by every path), outbound
#                  and edge = inbound + outbound, p50/p90/p99 (printed, and in WORK/hops.log)
#   BENCH_STAGE_TRACE=1  MODELGATE_BIN logs every request's stage times to its run.log (with
#                  BENCH_KEEP=1 the work directory stays for scripts/lib/stages.py)
# Installs missing Debian packages like scripts/bench-tunnel.sh. Traffic stays in the lab's
# namespaces. Everything started is stopped by PID; BENCH_KEEP=1 keeps the work directory.

set -euo pipefail
# 10,000 streams: a socket each on the client, and two in nginx (client + upstream).
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=scripts/lab.sh
source "$HERE/lab.sh"

OUT=""
DURATION=10
THREADS=2
STREAMS=2000
HOLD_S=60
SKIP_HOLD=0
LIMITS=0
BASELINE_BIN=""
PHASES=""
SKIP_ANCHOR=0
EVENT_SIZES="100:50 1000:500 10000:5000 200:20"
WINDOW_S=20
TTFB_COUNT=40
STORE_COMPARE=0
SLICES=0
DEFAULT_BIN=$ROOT/target/release/modelgate
if [[ ! -x $DEFAULT_BIN && -n ${CARGO_TARGET_DIR:-} ]]; then
    DEFAULT_BIN=$CARGO_TARGET_DIR/release/modelgate
fi
MODELGATE_BIN=${MODELGATE_BIN:-$DEFAULT_BIN}

while (($#)); do
    case $1 in
        --out) OUT=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --streams) STREAMS=$2; shift 2 ;;
        --hold) HOLD_S=$2; shift 2 ;;
        --skip-hold) SKIP_HOLD=1; shift ;;
        --limits) LIMITS=1; SKIP_HOLD=1; shift ;;
        --baseline) BASELINE_BIN=$2; SKIP_HOLD=1; shift 2 ;;
        --phase) PHASES=$2; shift 2 ;;
        --skip-anchor) SKIP_ANCHOR=1; shift ;;
        --event-sizes) EVENT_SIZES=$2; shift 2 ;;
        --window) WINDOW_S=$2; shift 2 ;;
        --ttfb-count) TTFB_COUNT=$2; shift 2 ;;
        --store-compare) STORE_COMPARE=1; SKIP_HOLD=1; shift ;;
        --slices) SLICES=$2; shift 2 ;;
        -h | --help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/lib/bench-common.sh
source "$HERE/lib/bench-common.sh"
bench_init g
[[ -x $MODELGATE_BIN ]] || die "$MODELGATE_BIN not found (cargo build --release, or set MODELGATE_BIN)"
[[ -z $BASELINE_BIN || -x $BASELINE_BIN ]] || die "--baseline $BASELINE_BIN is not an executable"

GW_LISTEN=$EDGE_PUBLIC:443
MODEL=acme-coder
SMALL_BODY='{"model":"acme-coder","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8,"fake_token_delay_ms":0}'
STREAM_BODY='{"model":"acme-coder","messages":[{"role":"user","content":"Say hello."}],"max_tokens":2,"stream":true,"stream_options":{"include_usage":true},"fake_token_delay_ms":5}'

# --- model namespace -----------------------------------------------------------------------------
start_model() {
    ip netns exec "$NS_MODEL" python3 -u "$ROOT/tests/python/fake_vllm.py" "$MODEL_ADDR" 8000 \
        --models "$MODEL,gpt-5-acme" --token-delay-ms 0 >"$WORK/fake-vllm.log" 2>&1 &
    MODEL_PID=$!
    PIDS+=("$MODEL_PID")
    for _ in $(seq 50); do
        ip netns exec "$NS_MODEL" ss -Htln "sport = :8000" | grep -q . && return 0
        sleep 0.1
    done
    die "fake_vllm.py did not listen in $NS_MODEL (see $WORK/fake-vllm.log)"
}

# Waits (bounded) until a small chat POST from the client namespace gets 200 with KEY and CAFILE.
wait_https() {
    local key=$1 cafile=$2 code
    for _ in $(seq 60); do
        code=$(ip netns exec "$NS_CLIENT" curl -sS -o /dev/null -w '%{http_code}' --max-time 3 \
            --cacert "$cafile" -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
            --data "$SMALL_BODY" "https://gw.test/v1/chat/completions" 2>/dev/null) || true
        [[ $code == 200 ]] && return 0
        sleep 0.5
    done
    die "POST https://gw.test/v1/chat/completions never returned 200 (last: ${code:-none})"
}

# --- measurements --------------------------------------------------------------------------------
# wrk_post KEY → "p50_ms p99_ms requests_per_s non2xx"
measure_wrk() {
    local key=$1 out lua=$WORK/post.lua
    # The body has no quotes that need Lua escaping beyond \" (it is JSON in a Lua string).
    cat >"$lua" <<EOF
wrk.method = "POST"
wrk.body = '$SMALL_BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
EOF
    out=$(ip netns exec "$NS_CLIENT" timeout $((DURATION + 30)) \
        wrk -t"$THREADS" -c8 -d"${DURATION}s" --latency -s "$lua" \
        "https://gw.test/v1/chat/completions" 2>&1) || {
        log "wrk failed: $out"
        echo "n/a n/a n/a n/a"
        return 0
    }
    echo "$out" >>"$WORK/wrk.log"
    wrk_summary <<<"$out"
}

# measure_sse KEY CAFILE → "p50_ms p99_ms"
measure_sse() {
    ip netns exec "$NS_CLIENT" timeout 90 python3 "$HERE/lib/sse_first_chunk.py" gw.test 443 300 \
        --tls "$2" --sni gw.test --post /v1/chat/completions --body "$STREAM_BODY" \
        --header "Authorization: Bearer $1" 2>>"$WORK/sse.log" || echo "n/a n/a"
}

# utime+stime of the PIDs (space-separated) and their direct children (nginx's workers).
tree_ticks() {
    local pid kids total=0 t
    for pid in $1; do
        kids=$(cat /proc/"$pid"/task/*/children 2>/dev/null || true)
        for p in $pid $kids; do
            t=$(proc_cpu_ticks "$p" 2>/dev/null) || t=0
            total=$((total + ${t%.*}))
        done
    done
    echo "$total"
}

# Context switches (voluntary + involuntary) of every thread of the PIDs and their children:
# each time a thread blocked (parked waiting for work) or was preempted.
tree_switches() {
    local pid kids p total=0 n
    for pid in $1; do
        kids=$(cat /proc/"$pid"/task/*/children 2>/dev/null || true)
        for p in $pid $kids; do
            n=$(cat /proc/"$p"/task/*/status 2>/dev/null |
                awk '/^(non)?voluntary_ctxt_switches/ { s += $2 } END { print s + 0 }')
            total=$((total + n))
        done
    done
    echo "$total"
}

# CPU of PIDS since ticks T0 over S seconds, % of one core
cpu_pct() {
    local pids=$1 t0=$2 secs=$3 t1
    t1=$(tree_ticks "$pids")
    awk -v a="$t0" -v b="$t1" -v hz="$(getconf CLK_TCK)" -v s="$secs" \
        'BEGIN { printf "%.1f\n", (b - a) / hz / s * 100 }'
}

# measure_path NAME KEY CAFILE "PID…" → R_P50 R_P99 R_RPS R_BAD R_SSE50 R_SSE99 R_CPU (during wrk)
measure_path() {
    local name=$1 key=$2 cafile=$3 pid=$4 t0 s0
    log "$name: wrk POST chat (non-streaming), -t$THREADS -c8 -d${DURATION}s"
    t0=$(tree_ticks "$pid")
    local x0 x1
    x0=$(tree_switches "$pid")
    s0=$SECONDS
    read -r R_P50 R_P99 R_RPS R_BAD < <(measure_wrk "$key")
    R_CPU=$(cpu_pct "$pid" "$t0" $((SECONDS - s0)))
    x1=$(tree_switches "$pid")
    # Per request: the wrk requests are requests/s × the duration.
    R_CSW=$(awk -v a="$x0" -v b="$x1" -v r="$R_RPS" -v d="$DURATION" \
        'BEGIN { if (r + 0 > 0) printf "%.2f", (b - a) / (r * d); else print "n/a" }')
    log "$name: SSE first event, 300 streaming requests, 1 connection"
    local cap_pid="" cap
    if [[ ${BENCH_PCAP:-0} == 1 ]]; then
        cap=$WORK/sse-${name%% *}
        ip netns exec "$NS_EDGE" tcpdump -i any -n -q -s 128 -B 8192 -w "$cap.pcap" \
            'tcp port 443 or udp' 2>"$cap.tcpdump.log" &
        cap_pid=$!
        PIDS+=("$cap_pid")
        sleep 1
    fi
    # The switches are counted over the requests only, not the capture's start and stop.
    x0=$(tree_switches "$pid")
    read -r R_SSE50 R_SSE99 < <(measure_sse "$key" "$cafile")
    x1=$(tree_switches "$pid")
    if [[ -n $cap_pid ]]; then
        sleep 0.5
        stop_pids "$cap_pid"
        tcpdump -r "$cap.pcap" -n -tt -q 2>/dev/null >"$cap.txt" || true
        log "$name: SSE hops at the edge (scripts/lib/hops.py $cap.txt):"
        python3 "$HERE/lib/hops.py" "$cap.txt" | tee -a "$WORK/hops.log" | sed 's/^/    /' >&2
    fi
    R_SSE_CSW=$(awk -v a="$x0" -v b="$x1" 'BEGIN { printf "%.2f", (b - a) / 300 }')
    log "$name: p50 $R_P50 ms, p99 $R_P99 ms, $R_RPS req/s ($R_BAD non-2xx), CPU $R_CPU%, SSE first $R_SSE50 ms"
}

# --- path N: nginx + wireguard-go ----------------------------------------------------------------
run_nginx() {
    local key=mg_bench_nginx_static_key_0123456789 d=$WORK/nginx
    mkdir -p "$d/tmp"
    # Its own self-signed certificate, same key type as modelgate's (ECDSA P-256).
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=gw.test -addext subjectAltName=DNS:gw.test \
        -keyout "$d/key.pem" -out "$d/cert.pem" 2>"$d/openssl.log"
    cat >"$d/nginx.conf" <<EOF
daemon off;
user root;
worker_processes auto;
worker_rlimit_nofile 100000;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 32768; }
http {
    access_log off;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    tcp_nodelay on;
    client_max_body_size 32m;
    map \$http_authorization \$ok { "Bearer $key" 1; default 0; }
    upstream model {
        server $MODEL_ADDR:8000;
        keepalive 64;
        # Below the model server's 5 s idle timeout, like modelgate's pool.
        keepalive_timeout 4s;
    }
    server {
        listen $GW_LISTEN ssl;
        server_name gw.test;
        ssl_certificate $d/cert.pem;
        ssl_certificate_key $d/key.pem;
        location / {
            if (\$ok = 0) { return 401; }
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }
    }
}
EOF
    anchor_up
    ip netns exec "$NS_EDGE" nginx -c "$d/nginx.conf" -p "$d" >"$d/stdout.log" 2>&1 &
    local nginx_pid=$!
    PIDS+=("$nginx_pid")
    wait_https "$key" "$d/cert.pem"
    if [[ -n $PHASES ]]; then
        phase_path N "$key" "$d/cert.pem" "$nginx_pid $ANCHOR_EDGE_PID"
        stop_pids "$nginx_pid"
        anchor_down
        return 0
    fi
    # The edge's work on path N is nginx (master + workers) plus the edge wireguard-go.
    measure_path "N nginx+wireguard-go" "$key" "$d/cert.pem" "$nginx_pid $ANCHOR_EDGE_PID"
    N_P50=$R_P50 N_P99=$R_P99 N_RPS=$R_RPS N_BAD=$R_BAD N_SSE50=$R_SSE50 N_SSE99=$R_SSE99
    N_CPU=$R_CPU
    stop_pids "$nginx_pid"
    anchor_down
}

# --- path M: modelgate ---------------------------------------------------------------------------
# mg_configure BIN DIR: a config in DIR (init, peer corp, upstream vllm, key bench → DIR/key)
mg_configure() {
    local bin=$1 mg=$2 cfg=$2/modelgate.toml
    mkdir -p "$mg/state"
    "$bin" --config "$cfg" init --public-endpoint "$EDGE_PUBLIC:$LAB_WG_PORT" \
        --wg-listen "$EDGE_PUBLIC:$LAB_WG_PORT" --tunnel-address 10.99.0.1/24 \
        --state-dir "$mg/state" --listen "$GW_LISTEN" --self-signed gw.test \
        --control-socket "$mg/control.sock" >"$mg/init.log" 2>&1 ||
        die "modelgate init failed: $(tail -3 "$mg/init.log")"
    "$bin" --config "$cfg" peer add corp --allowed-ips "$LAN_NET" >"$mg/corp.conf" ||
        die "modelgate peer add failed"
    "$bin" --config "$cfg" upstream add vllm --url "http://$MODEL_ADDR:8000" >/dev/null ||
        die "modelgate upstream add failed"
    "$bin" --config "$cfg" key create bench --json | jq -r .secret >"$mg/key"
}

# mg_start BIN DIR: runs BIN on DIR's config with its corp peer until a chat POST answers 200;
# sets MG_PID and CORP_PID.
mg_start() {
    local bin=$1 mg=$2
    local log=warn
    # BENCH_STAGE_TRACE=1: the new binary logs each request's stage times (MODELGATE_STAGE_TRACE).
    [[ ${BENCH_STAGE_TRACE:-0} == 1 && $bin == "$MODELGATE_BIN" ]] && log=warn,modelgate::stages=info
    local wrap=()
    # BENCH_CALLGRIND=1: every modelgate runs under callgrind (instructions per event).
    [[ ${BENCH_CALLGRIND:-0} == 1 ]] && wrap=(valgrind --tool=callgrind -q
        "--callgrind-out-file=$mg/callgrind.out.%p")
    ip netns exec "$NS_EDGE" env RUST_LOG=$log MODELGATE_STAGE_TRACE="${BENCH_STAGE_TRACE:-0}" \
        "${wrap[@]}" "$bin" --config "$mg/modelgate.toml" run \
        >>"$mg/run.log" 2>&1 &
    MG_PID=$!
    PIDS+=("$MG_PID")
    start_wg "$NS_CORP" "$WG_CORP"
    CORP_PID=$WG_PID
    lab_wg_conf "$NS_CORP" "$WG_CORP" "$mg/corp.conf"
    wait_handshake "$NS_CORP" "$WG_CORP"
    wait_https "$(cat "$mg/key")" "$mg/state/self-signed.crt"
}

# --baseline: the same wrk load through BASELINE_BIN (b) and MODELGATE_BIN (n), alternating.
run_baseline_ab() {
    mg_configure "$BASELINE_BIN" "$WORK/base"
    mg_configure "$MODELGATE_BIN" "$WORK/new"
    local b=() n=() i which bin dir
    for i in 1 2; do
        for which in base new; do
            if [[ $which == base ]]; then bin=$BASELINE_BIN; else bin=$MODELGATE_BIN; fi
            dir=$WORK/$which
            mg_start "$bin" "$dir"
            log "$which (round $i): wrk -t$THREADS -c8 -d${DURATION}s"
            read -r _ _ R_RPS R_BAD < <(measure_wrk "$(cat "$dir/key")")
            if [[ $which == base ]]; then b+=("$R_RPS"); else n+=("$R_RPS"); fi
            log "$which (round $i): $R_RPS req/s ($R_BAD non-2xx)"
            stop_pids "$MG_PID" "$CORP_PID"
            rm -f "/var/run/wireguard/$WG_CORP.sock"
        done
    done
    B_RPS=$(awk -v a="${b[0]}" -v c="${b[1]}" 'BEGIN { printf "%.0f", (a + c) / 2 }')
    N_RPS=$(awk -v a="${n[0]}" -v c="${n[1]}" 'BEGIN { printf "%.0f", (a + c) / 2 }')
    B_ROUNDS="baseline ${b[*]} / new ${n[*]}"
}

# --store-compare: a throwaway PostgreSQL cluster in $WORK/pg (Unix socket only); sets PG_URL.
PG_BIN=/usr/lib/postgresql/15/bin
pg_up() {
    local d=$WORK/pg port=55432
    [[ -x $PG_BIN/postgres ]] || die "$PG_BIN/postgres not found (apt-get install postgresql-15)"
    mkdir -p "$d/data" "$d/sock"
    chmod o+x "$WORK" "$d"
    chown postgres:postgres "$d/data" "$d/sock"
    setpriv --reuid=postgres --regid=postgres --init-groups -- "$PG_BIN/initdb" -D "$d/data" \
        -U mg --auth-local=trust --auth-host=reject -E UTF8 >"$d/initdb.log" 2>&1 ||
        die "initdb failed: $(tail -3 "$d/initdb.log")"
    setpriv --reuid=postgres --regid=postgres --init-groups -- "$PG_BIN/postgres" -D "$d/data" \
        -k "$d/sock" -p "$port" -c listen_addresses= >>"$d/server.log" 2>&1 &
    PG_PID=$!
    PIDS+=("$PG_PID")
    local i
    for i in $(seq 1 100); do
        "$PG_BIN/pg_isready" -h "$d/sock" -p "$port" -q && break
        sleep 0.1
    done
    "$PG_BIN/createdb" -h "$d/sock" -p "$port" -U mg mg || die "createdb failed: $(tail -3 "$d/server.log")"
    PG_URL="postgres://mg@$(printf %s "$d/sock" | jq -sRr @uri):$port/mg?sslmode=disable"
    log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $NF}') up (pid $PG_PID), $PG_URL"
}

run_store_ab() {
    pg_up
    mg_configure "$MODELGATE_BIN" "$WORK/sqlite"
    mg_configure "$MODELGATE_BIN" "$WORK/postgres"
    "$MODELGATE_BIN" --config "$WORK/postgres/modelgate.toml" store migrate --to "$PG_URL" \
        >"$WORK/postgres/migrate.log" 2>&1 || die "store migrate failed: $(tail -3 "$WORK/postgres/migrate.log")"
    local s=() p=() i which dir
    for i in 1 2; do
        for which in sqlite postgres; do
            dir=$WORK/$which
            mg_start "$MODELGATE_BIN" "$dir"
            log "$which (round $i): wrk -t$THREADS -c8 -d${DURATION}s"
            read -r _ _ R_RPS R_BAD < <(measure_wrk "$(cat "$dir/key")")
            if [[ $which == sqlite ]]; then s+=("$R_RPS"); else p+=("$R_RPS"); fi
            log "$which (round $i): $R_RPS req/s ($R_BAD non-2xx)"
            stop_pids "$MG_PID" "$CORP_PID"
            rm -f "/var/run/wireguard/$WG_CORP.sock"
        done
    done
    S_RPS=$(awk -v a="${s[0]}" -v c="${s[1]}" 'BEGIN { printf "%.0f", (a + c) / 2 }')
    P_RPS=$(awk -v a="${p[0]}" -v c="${p[1]}" 'BEGIN { printf "%.0f", (a + c) / 2 }')
    S_ROUNDS="sqlite ${s[*]} / postgres ${p[*]}"
    # The requests reached the shared ledger (the two postgres rounds).
    P_LEDGER=$("$PG_BIN/psql" -h "$WORK/pg/sock" -p 55432 -U mg -d mg -Atc \
        "SELECT COALESCE(SUM(requests), 0) FROM usage" 2>/dev/null || echo "?")
}

run_modelgate() {
    local mg=$WORK/mg
    mg_configure "$MODELGATE_BIN" "$mg"
    local key cfg=$mg/modelgate.toml
    key=$(cat "$mg/key")
    mg_start "$MODELGATE_BIN" "$mg"
    local corp_pid=$CORP_PID

    if ((LIMITS)); then
        local limited
        limited=$("$MODELGATE_BIN" --config "$cfg" key create bench-limited --json \
            --rpm 4000000000 --tpm 4000000000 --max-concurrent 100000 \
            --budget 1000000000000000/day | jq -r .secret)
        # Keys reach the daemon within 1 s; the first request of the new key proves it.
        wait_https "$limited" "$mg/state/self-signed.crt"
        local off=() on=() i
        for i in 1 2; do
            log "limits off (round $i): wrk -t$THREADS -c8 -d${DURATION}s"
            read -r _ _ R_RPS R_BAD < <(measure_wrk "$key")
            off+=("$R_RPS")
            log "limits on (round $i): wrk -t$THREADS -c8 -d${DURATION}s"
            read -r _ _ R_RPS R_BADL < <(measure_wrk "$limited")
            on+=("$R_RPS")
            log "round $i: off ${off[-1]} req/s ($R_BAD non-2xx), on ${on[-1]} req/s ($R_BADL non-2xx)"
        done
        L_OFF=$(awk -v a="${off[0]}" -v b="${off[1]}" 'BEGIN { printf "%.0f", (a + b) / 2 }')
        L_ON=$(awk -v a="${on[0]}" -v b="${on[1]}" 'BEGIN { printf "%.0f", (a + b) / 2 }')
        L_ROUNDS="off ${off[*]} / on ${on[*]}"
        stop_pids "$MG_PID" "$corp_pid"
        return 0
    fi
    measure_path "M modelgate" "$key" "$mg/state/self-signed.crt" "$MG_PID"
    M_P50=$R_P50 M_P99=$R_P99 M_RPS=$R_RPS M_BAD=$R_BAD M_SSE50=$R_SSE50 M_SSE99=$R_SSE99
    M_CPU=$R_CPU
    M_RSS_AFTER_LOAD=$(awk '/^VmHWM/ {print int($2 / 1024)}' "/proc/$MG_PID/status")

    if ((SKIP_HOLD == 0)); then
        hold_streams "$key" "$mg/state/self-signed.crt"
    fi
    kill -0 "$MG_PID" 2>/dev/null || M_NOTE="modelgate exited during the run: $(tail -5 "$mg/run.log" | tr '\n' ' ')"
    stop_pids "$MG_PID" "$corp_pid"
}

hold_streams() {
    local key=$1 cafile=$2 t0 m0 c0 s0 out body
    body="{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"Write slowly.\"}],\"max_tokens\":$HOLD_S,\"stream\":true,\"stream_options\":{\"include_usage\":true},\"fake_token_delay_ms\":1000}"
    log "M modelgate: holding $STREAMS concurrent SSE streams, $HOLD_S tokens 1 s apart each"
    t0=$(tree_ticks "$MG_PID")
    m0=$(tree_ticks "$MODEL_PID")
    s0=$SECONDS
    ip netns exec "$NS_CLIENT" env MG_KEY="$key" timeout $((HOLD_S + 240)) python3 \
        "$HERE/lib/sse_hold.py" gw.test 443 --cafile "$cafile" --sni gw.test \
        --path /v1/chat/completions --body "$body" --streams "$STREAMS" --ramp-per-s 100 \
        --deadline-s $((HOLD_S + 180)) >"$WORK/hold.json" 2>"$WORK/hold.err" &
    local client_pid=$!
    PIDS+=("$client_pid")
    # Sample modelgate's RSS and open streams while the client runs (bounded by its timeout).
    H_RSS_PEAK_SAMPLED=0
    while kill -0 "$client_pid" 2>/dev/null; do
        local rss
        rss=$(awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$MG_PID/status" 2>/dev/null || echo 0)
        ((rss > H_RSS_PEAK_SAMPLED)) && H_RSS_PEAK_SAMPLED=$rss
        echo "$((SECONDS - s0)) rss_mib=$rss" >>"$WORK/hold-rss.log"
        sleep 2
    done
    wait "$client_pid" 2>/dev/null || true
    stop_pids "$client_pid"
    local secs=$((SECONDS - s0))
    H_CPU=$(cpu_pct "$MG_PID" "$t0" "$secs")
    H_MODEL_CPU=$(cpu_pct "$MODEL_PID" "$m0" "$secs")
    H_HWM=$(awk '/^VmHWM/ {print int($2 / 1024)}' "/proc/$MG_PID/status" 2>/dev/null || echo n/a)
    H_SECS=$secs
    out=$(cat "$WORK/hold.json" 2>/dev/null)
    if [[ -z $out ]]; then
        H_NOTE="sse_hold.py printed nothing: $(tail -3 "$WORK/hold.err" | tr '\n' ' ')"
        out='{}'
    fi
    H_OK=$(jq -r '.ok // "n/a"' <<<"$out")
    H_NON200=$(jq -r '.non200 // "n/a"' <<<"$out")
    H_BROKEN=$(jq -r '.broken // "n/a"' <<<"$out")
    H_CONNERR=$(jq -r '.connect_errors // "n/a"' <<<"$out")
    H_FIRST=$(jq -r '.first_event_p50_ms // "n/a"' <<<"$out")
    H_DUR=$(jq -r '"\(.duration_p50_s // "n/a") / \(.duration_max_s // "n/a")"' <<<"$out")
    H_ERRORS=$(jq -c '.errors // {}' <<<"$out")
    H_PEAK_OPEN=$(jq -r '.peak_open // "n/a"' <<<"$out")
    log "hold: $out; modelgate VmHWM $H_HWM MiB, CPU $H_CPU%, fake vLLM CPU $H_MODEL_CPU% over ${secs}s"
}


# --- phases (--phase) ----------------------------------------------------------------------------
declare -A RES=()
has_phase() { [[ ,$PHASES, == *,$1,* ]]; }

# measure_ttfb KEY CAFILE BODYFILE → "p50_ms p99_ms p50_after_handshake_ms"
measure_ttfb() {
    ip netns exec "$NS_CLIENT" env MG_KEY="$1" timeout 150 python3 "$HERE/lib/ttfb.py" gw.test 443 \
        "$TTFB_COUNT" --cafile "$2" --sni gw.test --path /v1/chat/completions --body-file "$3" \
        2>>"$WORK/ttfb.log" || echo "n/a n/a n/a"
}

# measure_events P KEY CAFILE "PIDS": one sse_events.py run per --event-sizes entry.
measure_events() {
    local p=$1 key=$2 cafile=$3 pids=$4 size streams ms out
    for size in $EVENT_SIZES; do
        streams=${size%%:*} ms=${size##*:}
        log "$p: $streams streams, one event each every $ms ms ($(awk -v s="$streams" -v m="$ms" 'BEGIN{printf "%d", s*1000/m}') events/s), window ${WINDOW_S}s; load $(cut -d' ' -f1-3 /proc/loadavg)"
        local cg=()
        if [[ ${BENCH_CALLGRIND:-0} == 1 && $p != N ]]; then
            cg=(--callgrind-pid "$pids")
        fi
        out=$(ip netns exec "$NS_CLIENT" env MG_KEY="$key" CALLGRIND_GLOB="$WORK/mg-$p/callgrind.out.*" timeout 600 python3 \
            "$HERE/lib/sse_events.py" gw.test 443 --cafile "$cafile" --sni gw.test \
            --path /v1/chat/completions --model "$MODEL" --streams "$streams" \
            --event-interval-ms "$ms" --window-s "$WINDOW_S" --ramp-per-s 400 --pids "$pids" \
            --deadline-s 540 "${cg[@]}" 2>>"$WORK/events.err") || out='{}'
        [[ -n $out ]] || out='{}'
        echo "$p $size $out" >>"$WORK/events.jsonl"
        RES[$p.ev.$size]=$out
        RES[$p.ev.$size.load]=$(cut -d' ' -f1 /proc/loadavg)
        log "$p $size: $out"
    done
}

# phase_path P KEY CAFILE "PIDS": the selected phases through one path (N, B or M).
phase_path() {
    local p=$1 key=$2 cafile=$3 pids=$4
    if has_phase latency; then
        measure_path "$p" "$key" "$cafile" "$pids"
        RES[$p.p50]=$R_P50 RES[$p.p99]=$R_P99 RES[$p.rps]=$R_RPS RES[$p.bad]=$R_BAD
        RES[$p.sse50]=$R_SSE50 RES[$p.sse99]=$R_SSE99 RES[$p.cpu]=$R_CPU RES[$p.csw]=$R_CSW
        RES[$p.ssecsw]=$R_SSE_CSW
        RES[$p.lat.load]=$(cut -d' ' -f1 /proc/loadavg)
    fi
    if has_phase ttfb; then
        local shape
        for shape in chat responses; do
            local f=$WORK/cursor-$shape.json
            # nginx cannot translate the Responses shape: it gets the Chat Completions body.
            [[ $p == N ]] && f=$WORK/cursor-chat.json
            log "$p: TTFB of the 403 KB Cursor body ($shape shape, $(wc -c <"$f") bytes), $TTFB_COUNT fresh connections"
            read -r a b c < <(measure_ttfb "$key" "$cafile" "$f")
            RES[$p.ttfb.$shape]="$a $b $c"
            log "$p: TTFB $shape p50 $a ms, p99 $b ms, after handshake p50 $c ms"
        done
        RES[$p.ttfb.load]=$(cut -d' ' -f1 /proc/loadavg)
    fi
    if has_phase events; then
        measure_events "$p" "$key" "$cafile" "$pids"
    fi
}

# mg_tune DIR: room for 10,000 streams (the default gateway.max_connections is 10,000).
mg_tune() {
    local cfg=$1/modelgate.toml
    if grep -q '^\[gateway\]' "$cfg"; then
        sed -i '/^\[gateway\]/a max_connections = 30000' "$cfg"
    else
        printf '\n[gateway]\nmax_connections = 30000\n' >>"$cfg"
    fi
}

# run_phased_mg P BIN: a fresh modelgate BIN (its own config) through the selected phases.
run_phased_mg() {
    local p=$1 bin=$2 mg=$WORK/mg-$1
    mg_configure "$bin" "$mg"
    mg_tune "$mg"
    mg_start "$bin" "$mg"
    phase_path "$p" "$(cat "$mg/key")" "$mg/state/self-signed.crt" "$MG_PID"
    kill -0 "$MG_PID" 2>/dev/null || RES[$p.note]="exited during the run: $(tail -5 "$mg/run.log" | tr '\n' ' ')"
    stop_pids "$MG_PID" "$CORP_PID"
    rm -f "/var/run/wireguard/$WG_CORP.sock"
}

jf() {
    local j=${1:-}
    [[ -n $j ]] || j='{}'
    jq -r "$2 // \"n/a\"" <<<"$j" 2>/dev/null || echo n/a
}

phased_report() {
    local paths=(N) p
    [[ -n $BASELINE_BIN ]] && paths+=(B)
    paths+=(M)
    local head="| metric | N nginx+wireguard-go |" sep="|---|---|"
    [[ -n $BASELINE_BIN ]] && { head+=" B baseline |"; sep+="---|"; }
    head+=" M modelgate | M/N |"
    sep+="---|---|"
    [[ -n $BASELINE_BIN ]] && { head+=" M/B |"; sep+="---|"; }
    row() { # row LABEL N B M
        local line="| $1 | $2 |"
        [[ -n $BASELINE_BIN ]] && line+=" $3 |"
        line+=" $4 | $(ratio "$4" "$2") |"
        [[ -n $BASELINE_BIN ]] && line+=" $(ratio "$4" "$3") |"
        echo "$line"
    }
    echo "## Gateway benchmark, phases $PHASES ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, kernel $(uname -r))"
    echo
    echo "N = nginx + wireguard-go; M = modelgate $MODELGATE_BIN${BASELINE_BIN:+; B = baseline $BASELINE_BIN}. Same lab, same fake vLLM, same run. Load average (1 min) at the end of each path's latency/TTFB phases: $(for p in "${paths[@]}"; do printf '%s ' "$p=${RES[$p.lat.load]:--}/${RES[$p.ttfb.load]:--}"; done)(events: per row)."
    if has_phase latency; then
        echo
        echo "Small chat POSTs, wrk -t$THREADS -c8 -d${DURATION}s; SSE first event, 300 sequential on one connection."
        echo
        echo "$head"; echo "$sep"
        row "chat POST p50 (ms)" "${RES[N.p50]:-}" "${RES[B.p50]:-}" "${RES[M.p50]:-}"
        row "chat POST p99 (ms)" "${RES[N.p99]:-}" "${RES[B.p99]:-}" "${RES[M.p99]:-}"
        row "requests/s" "${RES[N.rps]:-}" "${RES[B.rps]:-}" "${RES[M.rps]:-}"
        row "SSE first event p50 (ms)" "${RES[N.sse50]:-}" "${RES[B.sse50]:-}" "${RES[M.sse50]:-}"
        row "SSE first event p99 (ms)" "${RES[N.sse99]:-}" "${RES[B.sse99]:-}" "${RES[M.sse99]:-}"
        row "edge CPU during wrk (% of a core)" "${RES[N.cpu]:-}" "${RES[B.cpu]:-}" "${RES[M.cpu]:-}"
        row "context switches per request during wrk (edge threads)" "${RES[N.csw]:-}" "${RES[B.csw]:-}" "${RES[M.csw]:-}"
        row "context switches per sequential SSE request (edge threads)" "${RES[N.ssecsw]:-}" "${RES[B.ssecsw]:-}" "${RES[M.ssecsw]:-}"
    fi
    if has_phase ttfb; then
        echo
        echo "TTFB of a 403 KB Cursor-shaped streaming chat, fresh HTTPS connection each, $TTFB_COUNT requests (connect → first event; in brackets: request's first byte → first event). N always gets the Chat Completions body."
        echo
        echo "$head"; echo "$sep"
        local shape q
        for shape in chat responses; do
            for q in 1 2; do
                local v=() lbl
                for p in N B M; do
                    read -r a b c <<<"${RES[$p.ttfb.$shape]:-n/a n/a n/a}"
                    if ((q == 1)); then v+=("$a"); else v+=("$b"); fi
                done
                if ((q == 1)); then lbl="$shape shape TTFB p50 (ms)"; else lbl="$shape shape TTFB p99 (ms)"; fi
                row "$lbl" "${v[0]}" "${v[1]}" "${v[2]}"
            done
            local v=()
            for p in N B M; do read -r a b c <<<"${RES[$p.ttfb.$shape]:-n/a n/a n/a}"; v+=("$c"); done
            row "$shape shape, after the handshake, p50 (ms)" "${v[0]}" "${v[1]}" "${v[2]}"
        done
    fi
    if has_phase events; then
        echo
        echo "Token events: STREAMS concurrent streaming chats (usage metering on), one event every INTERVAL each, steady window ${WINDOW_S}s; CPU of the appliance side (modelgate; nginx master+workers + the edge wireguard-go) per event received by the client."
        echo
        echo "$head"; echo "$sep"
        local size
        for size in $EVENT_SIZES; do
            local streams=${size%%:*} ms=${size##*:} v=() w=() x=() y=() z=() l=() ins=()
            for p in N B M; do
                local j=${RES[$p.ev.$size]:-}
                v+=("$(jf "$j" .cpu_us_per_event)")
                w+=("$(jf "$j" .events_per_s)")
                x+=("$(jf "$j" .events_per_s_per_core)")
                y+=("$(jf "$j" .ok)/$streams")
                z+=("$(jf "$j" .rss_peak_mib)")
                ins+=("$(jf "$j" .instructions_per_event)")
                l+=("${RES[$p.ev.$size.load]:-}")
            done
            row "**$streams streams × 1 event per $ms ms** (load ${l[0]}${BASELINE_BIN:+/${l[1]}}/${l[2]})" "" "" ""
            row "CPU per event (µs)" "${v[0]}" "${v[1]}" "${v[2]}"
            [[ ${BENCH_CALLGRIND:-0} == 1 ]] &&
                row "instructions per event (callgrind)" "${ins[0]}" "${ins[1]}" "${ins[2]}"
            row "events/s received" "${w[0]}" "${w[1]}" "${w[2]}"
            row "events/s per core" "${x[0]}" "${x[1]}" "${x[2]}"
            row "peak RSS (MiB)" "${z[0]}" "${z[1]}" "${z[2]}"
            row "streams completed" "${y[0]}" "${y[1]}" "${y[2]}"
        done
    fi
    for p in "${paths[@]}"; do
        [[ -n ${RES[$p.note]:-} ]] && printf '\n%s: %s\n' "$p" "${RES[$p.note]}"
    done
    true
}

verdict() { # verdict VALUE OP TARGET
    awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN {
        if (v == "–" || v == "" || v == "n/a") { print "?"; exit }
        ok = (op == "<=") ? (v + 0 <= t + 0) : (v + 0 >= t + 0)
        print ok ? "met" : "MISSED" }'
}

# --slices K: the latency phase K times, the paths alternating within each slice.
run_slices() {
    local k p order m
    for k in $(seq "$SLICES"); do
        # Reverse the order every other slice: no path always runs right after a teardown.
        if ((k % 2)); then order="N B M"; else order="M B N"; fi
        for p in $order; do
            [[ $p == N ]] && ((SKIP_ANCHOR)) && continue
            [[ $p == B && -z $BASELINE_BIN ]] && continue
            log "slice $k/$SLICES: path $p"
            case $p in
                N) run_nginx ;;
                B) rm -rf "$WORK/mg-B"; run_phased_mg B "$BASELINE_BIN" ;;
                M) rm -rf "$WORK/mg-M"; run_phased_mg M "$MODELGATE_BIN" ;;
            esac
            for m in p50 p99 rps sse50 sse99 lat.load; do RES[$p.$m.$k]=${RES[$p.$m]:-}; done
        done
    done
}

# median of the numbers on stdin (one per line; "–" and n/a skipped)
median() {
    grep -E '^[0-9.]+$' | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "–"; exit }
        printf "%.2f\n", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

slices_report() {
    local k m ref refs=() cols
    [[ -n $BASELINE_BIN ]] && refs+=(B)
    ((SKIP_ANCHOR)) || refs=(N "${refs[@]}")
    echo "## Gateway benchmark, latency in $SLICES alternating slices ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, kernel $(uname -r))"
    echo
    echo "N = nginx + wireguard-go; M = modelgate $MODELGATE_BIN${BASELINE_BIN:+; B = baseline $BASELINE_BIN}. One lab, one fake vLLM; each slice runs every path once (a fresh nginx or daemon), in the order N B M in odd slices and M B N in even ones. Per path and slice: wrk -t$THREADS -c8 -d${DURATION}s of small chat POSTs, then 300 sequential SSE requests on one connection."
    for m in p99 p50 rps sse50 sse99; do
        local label
        case $m in
            p99) label="chat POST p99 (ms)" ;; p50) label="chat POST p50 (ms)" ;;
            rps) label="requests/s" ;; sse50) label="SSE first event p50 (ms)" ;;
            sse99) label="SSE first event p99 (ms)" ;;
        esac
        echo
        cols="| slice | load at M |"
        for p in "${refs[@]}" M; do cols+=" $p |"; done
        for ref in "${refs[@]}"; do cols+=" M/$ref |"; done
        echo "**$label**"
        echo
        echo "$cols"
        echo "$cols" | sed 's/[^|]\+/---/g'
        declare -A col=()
        for k in $(seq "$SLICES"); do
            local line="| $k | ${RES[M.lat.load.$k]:-} |"
            for p in "${refs[@]}" M; do line+=" ${RES[$p.$m.$k]:-} |"; done
            for ref in "${refs[@]}"; do
                local r
                r=$(ratio "${RES[M.$m.$k]:-}" "${RES[$ref.$m.$k]:-}")
                line+=" $r |"
                col[$ref]+="$r"$'\n'
            done
            echo "$line"
        done
        local line="| median | |"
        for p in "${refs[@]}" M; do
            line+=" $(for k in $(seq "$SLICES"); do echo "${RES[$p.$m.$k]:-}"; done | median) |"
        done
        for ref in "${refs[@]}"; do line+=" **$(printf '%s' "${col[$ref]}" | median)** |"; done
        echo "$line"
        unset col
    done
}

# --- main ----------------------------------------------------------------------------------------
M_NOTE="" H_NOTE=""
log "lab $TAG: building namespaces"
LAB_OWNER_PID=$$ lab_up "$TAG"
lab_hosts "$NS_CLIENT" "$EDGE_PUBLIC gw.test"
start_model
if ((SLICES > 0)); then
    [[ $PHASES == latency ]] || die "--slices needs --phase latency (and no other phase)"
    run_slices
    table=$(slices_report)
    echo "$table"
    [[ -z $OUT ]] || { echo "$table" >"$OUT"; log "wrote $OUT"; }
    exit 0
fi
if [[ -n $PHASES ]]; then
    if has_phase ttfb; then
        python3 "$ROOT/tests/fixtures/cursor_requests.py" chat >"$WORK/cursor-chat.json"
        python3 "$ROOT/tests/fixtures/cursor_requests.py" responses >"$WORK/cursor-responses.json"
    fi
    if ((SKIP_ANCHOR == 0)); then
        log "path N: nginx + wireguard-go"
        run_nginx
    fi
    if [[ -n $BASELINE_BIN ]]; then
        log "path B: baseline modelgate ($BASELINE_BIN)"
        run_phased_mg B "$BASELINE_BIN"
    fi
    log "path M: modelgate ($MODELGATE_BIN)"
    run_phased_mg M "$MODELGATE_BIN"
    table=$(phased_report)
    echo "$table"
    [[ -z $OUT ]] || { echo "$table" >"$OUT"; log "wrote $OUT"; }
    exit 0
fi
if [[ -n $BASELINE_BIN ]]; then
    log "one upstream: $BASELINE_BIN (baseline) vs $MODELGATE_BIN (new), alternating"
    run_baseline_ab
    R=$(ratio "$N_RPS" "$B_RPS")
    table=$(
        cat <<EOF
## One-replica path: new vs baseline ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, kernel $(uname -r))

Small non-streaming chat POSTs through modelgate with one upstream, wrk -t$THREADS -c8 -d${DURATION}s, alternating the baseline binary ($BASELINE_BIN) and the new one ($MODELGATE_BIN), two rounds each (req/s per round: $B_ROUNDS).

| metric | baseline | new | new/baseline | target | verdict |
|---|---|---|---|---|---|
| requests/s (mean of 2 rounds) | $B_RPS | $N_RPS | $R | ≥ 0.97 | $(verdict "$R" ">=" 0.97) |
EOF
    )
    echo "$table"
    [[ -z $OUT ]] || { echo "$table" >"$OUT"; log "wrote $OUT"; }
    exit 0
fi
if ((STORE_COMPARE)); then
    log "store: SQLite vs PostgreSQL, alternating"
    run_store_ab
    R=$(ratio "$P_RPS" "$S_RPS")
    table=$(
        cat <<EOF
## Gateway with the PostgreSQL store vs the SQLite store ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, kernel $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg))

Small non-streaming chat POSTs through modelgate, wrk -t$THREADS -c8 -d${DURATION}s, alternating a daemon on the embedded SQLite store and one on a shared PostgreSQL 15 store (Unix socket; keys and usage copied by store migrate), two rounds each (req/s per round: $S_ROUNDS). Requests in the PostgreSQL ledger afterwards: $P_LEDGER.

| metric | sqlite | postgres | postgres/sqlite | target | verdict |
|---|---|---|---|---|---|
| requests/s (mean of 2 rounds) | $S_RPS | $P_RPS | $R | ≥ 0.95 | $(verdict "$R" ">=" 0.95) |
EOF
    )
    echo "$table"
    [[ -z $OUT ]] || { echo "$table" >"$OUT"; log "wrote $OUT"; }
    exit 0
fi
if ((LIMITS)); then
    log "path M: modelgate ($MODELGATE_BIN), limits off vs on"
    run_modelgate
    R=$(ratio "$L_ON" "$L_OFF")
    table=$(
        cat <<EOF
## Gateway with per-key limits on vs off ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, kernel $(uname -r))

Small non-streaming chat POSTs through modelgate, wrk -t$THREADS -c8 -d${DURATION}s, alternating a key without limits and a key with RPM, TPM, max-concurrent and a budget (never refusing), two rounds each (req/s per round: $L_ROUNDS).

| metric | limits off | limits on | on/off | target | verdict |
|---|---|---|---|---|---|
| requests/s (mean of 2 rounds) | $L_OFF | $L_ON | $R | ≥ 0.95 | $(verdict "$R" ">=" 0.95) |
EOF
    )
    echo "$table"
    [[ -z $OUT ]] || { echo "$table" >"$OUT"; log "wrote $OUT"; }
    exit 0
fi
log "path N: nginx + wireguard-go"
run_nginx
log "path M: modelgate ($MODELGATE_BIN)"
run_modelgate

R_LAT50=$(ratio "$M_P50" "$N_P50")
R_LAT99=$(ratio "$M_P99" "$N_P99")
R_RPS=$(ratio "$M_RPS" "$N_RPS")
R_SSE=$(ratio "$M_SSE50" "$N_SSE50")
table=$(
    cat <<EOF
## Gateway benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, kernel $(uname -r))

N = nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') (TLS, static Bearer map, proxy_pass, proxy_buffering off, upstream keepalive) over wireguard-go ↔ wireguard-go (TUN);
M = modelgate $("$MODELGATE_BIN" --version 2>/dev/null | awk '{print $NF}') (TLS, key auth, policy, userspace WireGuard). Same lab, same fake vLLM, same run; clients in the client namespace over HTTPS.
Small non-streaming chat POSTs: wrk -t$THREADS -c8 -d${DURATION}s --latency (keep-alive). SSE: 300 × time to first event of a streaming chat on one connection.

| metric | N nginx+wireguard-go | M modelgate | M/N | target | verdict |
|---|---|---|---|---|---|
| chat POST p50 (ms) | $N_P50 | $M_P50 | $R_LAT50 | ≤ 1.0 | $(verdict "$R_LAT50" "<=" 1.0) |
| chat POST p99 (ms) | $N_P99 | $M_P99 | $R_LAT99 | ≤ 1.0 | $(verdict "$R_LAT99" "<=" 1.0) |
| chat POST requests/s | $N_RPS | $M_RPS | $R_RPS | ≥ 1.0 | $(verdict "$R_RPS" ">=" 1.0) |
| non-2xx responses during wrk | $N_BAD | $M_BAD | | 0 | |
| SSE first event p50 (ms) | $N_SSE50 | $M_SSE50 | $R_SSE | ≤ 1.0 | $(verdict "$R_SSE" "<=" 1.0) |
| SSE first event p99 (ms) | $N_SSE99 | $M_SSE99 | $(ratio "$M_SSE99" "$N_SSE99") | | |
| edge CPU during wrk (% of a core) | $N_CPU | $M_CPU | $(ratio "$M_CPU" "$N_CPU") | | |
EOF
    if ((SKIP_HOLD == 0)); then
        cat <<EOF

### $STREAMS concurrent slow SSE streams through modelgate ($HOLD_S tokens, 1 s apart; ramp 100/s)

| metric | value | target | verdict |
|---|---|---|---|
| streams completed with [DONE] | ${H_OK:-n/a} / $STREAMS | all | $( [[ ${H_OK:-} == "$STREAMS" ]] && echo met || echo MISSED) |
| non-200 / broken / connect errors | ${H_NON200:-n/a} / ${H_BROKEN:-n/a} / ${H_CONNERR:-n/a} | 0 | |
| errors by kind | \`${H_ERRORS:-}\` | | |
| peak concurrently open (client side) | ${H_PEAK_OPEN:-n/a} | | |
| modelgate peak RSS, VmHWM (MiB) | ${H_HWM:-n/a} (sampled VmRSS peak ${H_RSS_PEAK_SAMPLED:-n/a}; after the wrk phase ${M_RSS_AFTER_LOAD:-n/a}) | ≤ 512 | $(verdict "${H_HWM:-n/a}" "<=" 512) |
| modelgate CPU over the hold (% of a core, ${H_SECS:-?} s) | ${H_CPU:-n/a} | | |
| fake vLLM CPU over the hold (% of a core) | ${H_MODEL_CPU:-n/a} | | |
| first event p50 (ms) / stream duration p50 / max (s) | ${H_FIRST:-n/a} / ${H_DUR:-n/a} | | |
EOF
    fi
    [[ -n $M_NOTE ]] && printf '\nM: %s\n' "$M_NOTE"
    [[ -n $H_NOTE ]] && printf '\nhold: %s\n' "$H_NOTE"
    true
)
echo "$table"
if [[ -n $OUT ]]; then
    echo "$table" >"$OUT"
    log "wrote $OUT"
fi
