#!/bin/sh
# Scenario guard: seed 000 (unsolicited UDP steals a container's NAT port) on the VM's kernel.
#
#   C (container 10.77.0.2) --c0|h0-- H (10.77.0.1, 198.51.100.10; masquerade) --ext|r0-- R (198.51.100.20)
#
# The remote probes H:25000 first; then the container sends from :25000 to R:7000. Without a
# guard masquerade must pick another port (the probe's conntrack entry holds 25000).
#
# Usage: guard.sh MODE[,MODE...]   Modes:
#   guard-baseline           no natfix: the container's flow leaves on another port
#   guard-xdp                natfix attach --guard 20000-30000 (XDP, flow source auto) on H's ext
#   guard-tc                 the same with --guard-hook tc
#   guard-conntrack-refused  --flow-source conntrack where conntrack's kfuncs are in module BTF:
#                            natfix must refuse with exit code 5 and say why

. "${SCENARIO_DIR:-/scenarios}/lib.sh"

ERRORS=/tmp/guard.errors

reset_all() {
    reset_netns C H R
}

setup() {
    for ns in C H R; do
        try ip netns add "$ns"
        try in_ns "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
        try ip -n "$ns" link set lo up
    done
    try ip link add c0 netns C type veth peer name h0 netns H
    try ip link add ext netns H type veth peer name r0 netns R
    try ip -n C addr add 10.77.0.2/24 dev c0
    try ip -n H addr add 10.77.0.1/24 dev h0
    try ip -n H addr add 198.51.100.10/24 dev ext
    try ip -n R addr add 198.51.100.20/24 dev r0
    for pair in C:c0 H:h0 H:ext R:r0; do
        try ip -n "${pair%%:*}" link set "${pair#*:}" up
    done
    try ip -n C route add default via 10.77.0.1
    try in_ns H sysctl -qw net.ipv4.ip_forward=1
    printf '%s\n' 'table ip lab_nat {' \
        '    chain post { type nat hook postrouting priority 100; ip saddr 10.77.0.0/24 oifname "ext" masquerade; }' \
        '}' > /tmp/guard-nat.nft
    try in_ns H nft -f /tmp/guard-nat.nft
}

# udp NS SRC_ADDR SRC_PORT DST_ADDR DST_PORT: one datagram.
udp() {
    echo probe | in_ns "$1" socat -u - "UDP4-SENDTO:$4:$5,bind=$2:$3" 2>> "$ERRORS"
}

# The external port of the container's flow (reply dport of its conntrack entry), or none.
external_port() {
    in_ns H cat /proc/net/nf_conntrack |
        awk '/src=10\.77\.0\.2 dst=198\.51\.100\.20 sport=25000 dport=7000/ {
            n = 0; for (i = 1; i <= NF; i++) if ($i ~ /^dport=/) { n++; if (n == 2) { sub("dport=", "", $i); print $i; exit } } }'
}

# natfix_stat NS REASON -> packets of the guard counter.
natfix_stat() {
    natfix stats --json --netns /run/netns/"$1" 2> /dev/null | tr '{' '\n' |
        awk -v r="\"reason\":\"$2\"" 'index($0, "\"program\":\"guard\"") && index($0, r) {
            match($0, /"packets":[0-9]*/); print substr($0, RSTART + 10, RLENGTH - 10); exit }'
}

run_mode() {
    mode=$1
    reset_all
    setup
    attach_rc=null
    attach_out=
    status=null
    case "$mode" in
        guard-baseline) ;;
        guard-xdp | guard-tc | guard-conntrack-refused)
            case "$mode" in
                guard-xdp) extra= ;;
                guard-tc) extra="--guard-hook tc" ;;
                guard-conntrack-refused) extra="--flow-source conntrack" ;;
            esac
            # shellcheck disable=SC2086 # our own fixed words
            attach_out=$(in_ns H env NO_COLOR=1 natfix attach --iface ext --guard 20000-30000 $extra --pin 2>&1)
            attach_rc=$?
            status=$(natfix_status)
            ;;
        *)
            printf '{"scenario":"guard","mode":%s,"errors":[%s]}' "$(json_str "$mode")" "$(json_str "unknown mode")"
            return
            ;;
    esac

    # The remote's probe, then the container's flow, then the remote's reply to what it saw.
    udp R 198.51.100.20 7000 198.51.100.10 25000
    sleep 0.2
    # One socket sends the container's datagram and then prints what comes back.
    (echo flow; sleep 2) | in_ns C socat UDP4-DATAGRAM:198.51.100.20:7000,bind=10.77.0.2:25000 - \
        > /tmp/container.in 2>> "$ERRORS" &
    cpid=$!
    sleep 0.5
    port=$(external_port)
    [ -n "$port" ] && udp R 198.51.100.20 7000 198.51.100.10 "$port"
    sleep 0.5
    kill "$cpid" 2> /dev/null
    wait 2> /dev/null
    reply=$(grep -c probe /tmp/container.in)

    printf '{"scenario":"guard","mode":"%s","kernel":"%s","external_port":%s,"reply_delivered":%s,' \
        "$mode" "$(uname -r)" "${port:-null}" "$([ "${reply:-0}" -gt 0 ] && echo true || echo false)"
    printf '"natfix":{"exit":%s,"output":%s,"status":%s,"dropped_unsolicited":%s,"passed_solicited":%s},"errors":%s}' \
        "$attach_rc" "$(json_str "$(plain_tail 600 "$attach_out")")" "$status" \
        "$(natfix_stat H dropped_unsolicited | grep . || echo null)" "$(natfix_stat H passed_solicited | grep . || echo null)" \
        "$(json_lines "$ERRORS")"
}

modes=$(echo "${1:-guard-baseline}" | tr , ' ')
set -- $modes
run_modes "$@"
