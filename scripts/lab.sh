#!/usr/bin/env bash
# Network-namespace lab for modelgate: the test topology, built and torn down by name tag.
#
#   [client] 192.0.2.10 ── 192.0.2.1 [edge]      the appliance's "public" address; modelgate runs here
#                          198.51.100.1          (edge forwards nothing: ip_forward=0)
#                               │
#                          198.51.100.2 [corp]   stateful nft firewall: WAN accepts only replies;
#                          10.20.0.1             WAN egress NAT with random ports (`masquerade random`);
#                               │                forwards + masquerades tunnel → LAN, MSS clamp
#                          10.20.0.5 [model]     model servers (started by the caller)
#
# The corp side reaches 192.0.2.1 because the edge is its next hop on the WAN (198.51.100.1): the
# edge accepts packets for any of its own addresses on any link, and replies go back the same way.
# The edge has no route to 10.20.0.0/24, so only the tunnel leads into the LAN.
#
# Usage (root):
#   scripts/lab.sh up TAG            build namespaces mg-TAG-{client,edge,corp,model}
#   scripts/lab.sh down TAG          delete them (idempotent) and stale wireguard-go sockets
#   scripts/lab.sh site2 TAG         add a second corp site to lab TAG (replicas at two sites):
#                                    mg-TAG-{corp2,model2}; corp2 198.51.101.2 on a second edge
#                                    link (edge 198.51.101.1), the same corp router rules, LAN
#                                    10.30.0.0/24 with the model host 10.30.0.5
#   scripts/lab.sh names TAG         print the names as shell assignments
#   scripts/lab.sh gc                take down every lab whose owner process is gone (a test run that
#                                    was SIGKILLed cannot run its Drop guards)
#   scripts/lab.sh wg-conf NS IF FILE [--post-up]
#                                    configure a running wireguard-go IF in NS from a wg-quick FILE
#                                    (wg-quick strip + wg setconf, Address, MTU, routes for AllowedIPs);
#                                    --post-up also runs the file's PostUp commands (%i → IF) instead
#                                    of the lab's own tunnel → LAN masquerade on the corp router
#   scripts/lab.sh wg-wait-sock IF   wait (bounded) until /var/run/wireguard/IF.sock exists
#   scripts/lab.sh hosts NS 'IP NAME'...
#                                    /etc/hosts for NS (`ip netns exec` bind-mounts
#                                    /etc/netns/NS/hosts over /etc/hosts), e.g. gw.test → the edge;
#                                    `down` removes /etc/netns/NS of the lab's namespaces
#
# Processes (wireguard-go, modelgate, servers) are started and killed by the caller, by PID; this
# file only manages namespaces, links, addresses, routes and nftables. It can also be sourced
# (`source scripts/lab.sh`) to use the lab_* functions directly.
#
# TAG: 1–10 characters [a-z0-9]; interface names derive from it (IFNAMSIZ is 16).

set -euo pipefail

LAB_WG_PORT=51820
# One file per live lab, holding the PID of the process that owns it (for `gc`).
LAB_STATE_DIR=/run/modelgate-lab

lab_names() {
    local tag=$1
    if [[ ! $tag =~ ^[a-z0-9]{1,10}$ ]]; then
        echo "lab: tag '$tag' must be 1-10 characters of [a-z0-9]" >&2
        return 2
    fi
    NS_CLIENT="mg-$tag-client"
    NS_EDGE="mg-$tag-edge"
    NS_CORP="mg-$tag-corp"
    NS_MODEL="mg-$tag-model"
    # wireguard-go interface names: their control sockets /var/run/wireguard/IF.sock are global
    # across namespaces, so they carry the tag too.
    WG_CORP="mg${tag}c"
    WG_EDGE="mg${tag}e"
    WG_ROGUE="mg${tag}r"
    # The second site (`site2`), absent unless added.
    NS_CORP2="mg-$tag-corp2"
    NS_MODEL2="mg-$tag-model2"
    WG_CORP2="mg${tag}d"
    EDGE_WAN2=198.51.101.1
    CORP2_WAN=198.51.101.2
    CORP2_LAN=10.30.0.1
    MODEL2_ADDR=10.30.0.5
    EDGE_PUBLIC=192.0.2.1
    CLIENT_ADDR=192.0.2.10
    EDGE_WAN=198.51.100.1
    CORP_WAN=198.51.100.2
    CORP_LAN=10.20.0.1
    MODEL_ADDR=10.20.0.5
    LAN_NET=10.20.0.0/24
}

lab_print_names() {
    lab_names "$1"
    local v
    for v in NS_CLIENT NS_EDGE NS_CORP NS_MODEL WG_CORP WG_EDGE WG_ROGUE EDGE_PUBLIC CLIENT_ADDR \
        EDGE_WAN CORP_WAN CORP_LAN MODEL_ADDR LAN_NET; do
        printf '%s=%s\n' "$v" "${!v}"
    done
}

lab_down() {
    lab_names "$1"
    local ns ifn
    for ns in "$NS_CLIENT" "$NS_EDGE" "$NS_CORP" "$NS_MODEL" "$NS_CORP2" "$NS_MODEL2"; do
        if [[ -e /var/run/netns/$ns ]]; then
            ip netns del "$ns" 2>/dev/null || true
        fi
        # Per-namespace /etc files (lab_hosts); the names carry the tag, so they are ours.
        rm -rf "/etc/netns/$ns"
    done
    # A killed wireguard-go leaves its socket behind; a later one with the same name would fail.
    for ifn in "$WG_CORP" "$WG_EDGE" "$WG_ROGUE" "$WG_CORP2"; do
        rm -f "/var/run/wireguard/$ifn.sock"
    done
    rm -f "$LAB_STATE_DIR/$1.owner"
}

# Takes down labs whose owner (LAB_OWNER_PID given to `up`, default the caller) has exited.
lab_gc() {
    local f tag owner
    for f in "$LAB_STATE_DIR"/*.owner; do
        [[ -e $f ]] || continue
        tag=$(basename "$f" .owner)
        owner=$(cat "$f")
        if [[ ! $owner =~ ^[0-9]+$ ]] || ! kill -0 "$owner" 2>/dev/null; then
            echo "lab: taking down $tag (owner $owner is gone)" >&2
            lab_down "$tag"
        fi
    done
}

lab_up() {
    lab_names "$1"
    lab_down "$1"
    mkdir -p "$LAB_STATE_DIR"
    echo "${LAB_OWNER_PID:-$PPID}" >"$LAB_STATE_DIR/$1.owner"
    local ns
    for ns in "$NS_CLIENT" "$NS_EDGE" "$NS_CORP" "$NS_MODEL"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done

    # Links are created directly inside the namespaces, so names never clash between labs.
    ip -n "$NS_CLIENT" link add to-edge type veth peer name to-client netns "$NS_EDGE"
    ip -n "$NS_EDGE" link add to-corp type veth peer name wan netns "$NS_CORP"
    ip -n "$NS_CORP" link add lan type veth peer name to-corp netns "$NS_MODEL"

    ip -n "$NS_CLIENT" addr add "$CLIENT_ADDR/24" dev to-edge
    ip -n "$NS_EDGE" addr add "$EDGE_PUBLIC/24" dev to-client
    ip -n "$NS_EDGE" addr add "$EDGE_WAN/24" dev to-corp
    ip -n "$NS_CORP" addr add "$CORP_WAN/24" dev wan
    ip -n "$NS_CORP" addr add "$CORP_LAN/24" dev lan
    ip -n "$NS_MODEL" addr add "$MODEL_ADDR/24" dev to-corp
    ip -n "$NS_CLIENT" link set to-edge up
    ip -n "$NS_EDGE" link set to-client up
    ip -n "$NS_EDGE" link set to-corp up
    ip -n "$NS_CORP" link set wan up
    ip -n "$NS_CORP" link set lan up
    ip -n "$NS_MODEL" link set to-corp up

    # Routes: the corp's way to "the internet" (192.0.2.0/24) is the edge; the model's is the corp
    # router. The edge gets no route towards 10.20.0.0/24 and does not forward.
    ip -n "$NS_CORP" route add default via "$EDGE_WAN"
    ip -n "$NS_MODEL" route add default via "$CORP_LAN"
    ip netns exec "$NS_EDGE" sysctl -qw net.ipv4.ip_forward=0
    ip netns exec "$NS_CORP" sysctl -qw net.ipv4.ip_forward=1

    lab_corp_router "$NS_CORP"

    # Edge: remember every (source address, port) WireGuard traffic arrives from, so tests can
    # see the NAT mapping change; `nft list set inet lab wgsrc`.
    ip netns exec "$NS_EDGE" nft -f - <<EOF
table inet lab {
    set wgsrc {
        type ipv4_addr . inet_service
        flags dynamic
        size 1024
    }
    chain input {
        type filter hook input priority filter; policy accept;
        udp dport $LAB_WG_PORT add @wgsrc { ip saddr . udp sport }
    }
}
EOF
}

# Corp router NS: stateful WAN firewall, NAT with random source ports on the WAN (so a restarted
# peer shows up from a new port), tunnel → LAN forwarding with masquerade and MSS clamping.
lab_corp_router() {
    ip netns exec "$1" nft -f - <<'EOF'
table inet lab {
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" counter drop
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        tcp flags syn tcp option maxseg size set rt mtu
        ct state established,related accept
        iifname "wan" counter drop
    }
}
table ip labnat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade random
        oifname "lan" masquerade
    }
}
EOF
}

# A second corp site on lab TAG (which must be up): its own router namespace with a WAN link to
# the edge, the corp router rules, and a LAN with one model host. `down` removes it.
lab_site2() {
    lab_names "$1"
    [[ -e /var/run/netns/$NS_EDGE ]] || { echo "lab: site2: lab $1 is not up" >&2; return 2; }
    local ns
    for ns in "$NS_CORP2" "$NS_MODEL2"; do
        if [[ -e /var/run/netns/$ns ]]; then ip netns del "$ns"; fi
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    ip -n "$NS_EDGE" link del to-corp2 2>/dev/null || true
    ip -n "$NS_EDGE" link add to-corp2 type veth peer name wan netns "$NS_CORP2"
    ip -n "$NS_CORP2" link add lan type veth peer name to-corp netns "$NS_MODEL2"
    ip -n "$NS_EDGE" addr add "$EDGE_WAN2/24" dev to-corp2
    ip -n "$NS_CORP2" addr add "$CORP2_WAN/24" dev wan
    ip -n "$NS_CORP2" addr add "$CORP2_LAN/24" dev lan
    ip -n "$NS_MODEL2" addr add "$MODEL2_ADDR/24" dev to-corp
    ip -n "$NS_EDGE" link set to-corp2 up
    ip -n "$NS_CORP2" link set wan up
    ip -n "$NS_CORP2" link set lan up
    ip -n "$NS_MODEL2" link set to-corp up
    ip -n "$NS_CORP2" route add default via "$EDGE_WAN2"
    ip -n "$NS_MODEL2" route add default via "$CORP2_LAN"
    ip netns exec "$NS_CORP2" sysctl -qw net.ipv4.ip_forward=1
    lab_corp_router "$NS_CORP2"
}

# Writes /etc/netns/NS/hosts: localhost plus each 'IP NAME' argument. Only for the lab's own
# namespaces (mg-*), which `lab_down` cleans up.
lab_hosts() {
    local ns=$1 line
    shift
    if [[ $ns != mg-* ]]; then
        echo "lab: hosts: '$ns' is not a lab namespace" >&2
        return 2
    fi
    mkdir -p "/etc/netns/$ns"
    {
        echo "127.0.0.1 localhost"
        for line in "$@"; do echo "$line"; done
    } >"/etc/netns/$ns/hosts"
}

# Waits (at most ~5 s) for a freshly started wireguard-go to create its control socket.
lab_wg_wait_sock() {
    local ifn=$1 i
    for ((i = 0; i < 100; i++)); do
        [[ -S /var/run/wireguard/$ifn.sock ]] && return 0
        sleep 0.05
    done
    echo "lab: /var/run/wireguard/$ifn.sock did not appear within 5 s" >&2
    return 1
}

# Configures a running wireguard-go interface from a wg-quick file, like `wg-quick up` would but
# without its side effects on the host: keys and peers via `wg setconf` (after `wg-quick strip`),
# then Address, MTU and one route per AllowedIPs entry. PostUp/PreUp and friends are ignored on
# purpose (the lab's nftables already does the corp router's forwarding and NAT), unless
# --post-up is given: then the lab's LAN masquerade is removed and the file's PostUp lines run
# (as wg-quick would: bash, `%i` replaced by the interface name) inside NS.
lab_wg_conf() {
    local ns=$1 ifn=$2 file=$3 post_up=${4:-}
    local tmp stripped
    tmp=$(mktemp -d)
    # wg-quick derives the interface name from the file name, which must be a valid one.
    cp "$file" "$tmp/$ifn.conf"
    stripped=$(wg-quick strip "$tmp/$ifn.conf")
    printf '%s\n' "$stripped" >"$tmp/$ifn.stripped"
    ip netns exec "$ns" wg setconf "$ifn" "$tmp/$ifn.stripped"
    rm -rf "$tmp"

    local mtu=1420 line key val addr cidr
    local -a addrs=() allowed=()
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%%#*}
        [[ $line == *=* ]] || continue
        key=$(echo "${line%%=*}" | tr -d '[:space:]' | tr '[:upper:]' '[:lower:]')
        val=$(echo "${line#*=}" | tr -d '[:space:]')
        case $key in
            address) IFS=, read -r -a _a <<<"$val" && addrs+=("${_a[@]}") ;;
            mtu) mtu=$val ;;
            allowedips) IFS=, read -r -a _a <<<"$val" && allowed+=("${_a[@]}") ;;
        esac
    done <"$file"

    for addr in "${addrs[@]}"; do
        [[ $addr == *:* ]] && continue # the lab is IPv4-only
        ip -n "$ns" addr add "$addr" dev "$ifn"
    done
    ip -n "$ns" link set "$ifn" mtu "$mtu" up
    for cidr in "${allowed[@]}"; do
        [[ $cidr == *:* ]] && continue
        # `replace`: the interface address may already have created the connected route.
        ip -n "$ns" route replace "$cidr" dev "$ifn"
    done

    if [[ $post_up == --post-up ]]; then
        ip netns exec "$ns" nft flush chain ip labnat postrouting
        ip netns exec "$ns" nft add rule ip labnat postrouting oifname wan masquerade random
        local cmd n=0
        while IFS= read -r line || [[ -n $line ]]; do
            line=${line%%#*} # like wg-quick
            [[ $line =~ ^[[:space:]]*PostUp[[:space:]]*=[[:space:]]*(.*)$ ]] || continue
            cmd=${BASH_REMATCH[1]//%i/$ifn}
            ip netns exec "$ns" bash -c "$cmd" || {
                echo "lab: PostUp failed in $ns: $cmd" >&2
                return 1
            }
            n=$((n + 1))
        done <"$file"
        echo "lab: ran $n PostUp command(s) in $ns" >&2
    fi
}

lab_main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
        up) lab_up "$@" ;;
        down) lab_down "$@" ;;
        site2) lab_site2 "$@" ;;
        names) lab_print_names "$@" ;;
        wg-conf) lab_wg_conf "$@" ;;
        wg-wait-sock) lab_wg_wait_sock "$@" ;;
        hosts) lab_hosts "$@" ;;
        gc) lab_gc ;;
        *)
            sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
            return 2
            ;;
    esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    lab_main "$@"
fi
