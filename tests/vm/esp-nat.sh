#!/bin/sh
# Scenario esp-nat: Docker's encrypted VXLAN overlay across a 1:1 NAT.
#
#   A (192.168.1.10) --vethA/vethNA-- N (1:1 NAT: 192.168.1.10 <-> 203.0.113.10) --vethNB/vethB-- B (198.51.100.2)
#
# ESP transport-mode SAs (rfc4106(gcm(aes)), 64-bit ICV, Docker's reqid), OUT policies only,
# VXLAN 4789 with udpcsum. Each side uses the addresses it knows: A talks to B's address, B to
# A's public address. Decrypted VXLAN packets then carry a UDP checksum computed over the other
# side's view of the addresses and die in udp_lib_checksum_complete() (UdpInCsumErrors).
#
# Usage: esp-nat.sh MODE[,MODE...] | all     (env GRO=1|0)
# Prints a JSON object for one mode, an array for several. Modes:
#   cleartext     VXLAN through the NAT without ESP (the NAT fixes cleartext checksums)
#   baseline      ESP, no fix: expected to fail both ways
#   noudpcsum     both VXLAN devices recreated with noudpcsum
#   nft           the nftables rule (prerouting, priority mangle) on A and B
#   nft-one-side  the rule on B only: only what B receives is accepted
#   natfix        `natfix attach --iface <underlay> <args from /etc/natfix/natfix-args> --pin` on A and B
#   natfix-auto, natfix-auto-recompute, natfix-tc, natfix-tc-recompute, natfix-nft, natfix-both
#                 natfix's overlay fix on A and B with that backend (auto: the nftables rule for
#                 IPv4, tc + nftables with recompute; both: tc + nftables) and checksum mode
#                 (zero unless -recompute); stats and detach are recorded
#   natfix-one-side   natfix's overlay fix on B only
#   natfix-wrong-reqid natfix's overlay fix limited to another reqid: nothing may be fixed
#   throughput    iperf3 over the overlay, noudpcsum workaround against natfix, alternating, same boot
#   natfix-cleartext  no ESP, natfix's overlay fix on A and B: it must leave cleartext VXLAN alone
#   baseline-4777     no fix, VXLAN on port 4777 (swarm's --data-path-port)
#   natfix-port-4777  VXLAN on 4777, `natfix attach --overlay-fix` naming no port (auto finds it)
#   trace         `natfix trace --netns B 'udp and port 4789'` during one ping A -> B, without a fix
#                 (its path ends in a UDP_CSUM drop in B) and with natfix's overlay fix on B
#                 (natfix's rewrite, no drop)

. "${SCENARIO_DIR:-/scenarios}/lib.sh"

A_PRIV=192.168.1.10
A_PUB=203.0.113.10
N_IN=192.168.1.1
N_OUT=198.51.100.1
B_ADDR=198.51.100.2
A_OVL=10.10.0.1
B_OVL=10.10.0.2
A_MAC=02:00:0a:0a:00:01
B_MAC=02:00:0a:0a:00:02
VNI=4109
VXLAN_PORT=4789
OVERLAY_MTU=1424 # Docker's MTU for encrypted overlays: a full frame makes a 1500-byte ESP packet
HOP_MTU=1400     # N forwards with this MTU, so full-size ESP packets get fragmented on the way
REQID=0xD0C4E3   # Docker's reqid
SPI_AB=0xa0b00001
SPI_BA=0xb0a00001
KEY_AB=0x000102030405060708090a0b0c0d0e0f10111213
KEY_BA=0x202122232425262728292a2b2c2d2e2f30313233
AEAD='rfc4106(gcm(aes))'
SMALL=56
LARGE=1396 # inner IP packet 1424 = overlay MTU; ESP packet 1500 > HOP_MTU; cleartext 1474 > HOP_MTU
COUNT=3

ERRORS=/tmp/esp-nat.errors


reset_all() {
    reset_netns A N B
}

setup_underlay() {
    for ns in A N B; do
        try ip netns add "$ns"
        # No IPv6 (router solicitations, MLD) on the overlay: it would add to the counters.
        try in_ns "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    done
    try ip link add vethA netns A type veth peer name vethNA netns N
    try ip link add vethB netns B type veth peer name vethNB netns N

    # One ip process per namespace: every exec costs ~0.1 s under TCG.
    try ip -n A -batch - <<EOF
link set lo up
addr add $A_PRIV/24 dev vethA
link set vethA up
route add default via $N_IN
EOF
    try ip -n B -batch - <<EOF
link set lo up
addr add $B_ADDR/24 dev vethB
link set vethB up
route add default via $N_OUT
EOF
    # Connected routes added by hand to carry the hop MTU (used when forwarding; the DF bit of
    # VXLAN/ESP packets is clear, so N fragments instead of reporting).
    try ip -n N -batch - <<EOF
link set lo up
addr add $N_IN/24 dev vethNA noprefixroute
addr add $N_OUT/24 dev vethNB noprefixroute
link set vethNA up
link set vethNB up
route add 192.168.1.0/24 dev vethNA src $N_IN mtu $HOP_MTU
route add 198.51.100.0/24 dev vethNB src $N_OUT mtu $HOP_MTU
EOF
    try in_ns N sysctl -qw net.ipv4.ip_forward=1
    # 1:1 NAT of A's address, all protocols; for ESP (no ports) this is address-only NAT.
    try in_ns N nft -f /dev/stdin <<EOF
table ip nat {
    chain pre { type nat hook prerouting priority dstnat; ip daddr $A_PUB dnat to $A_PRIV; }
    chain post { type nat hook postrouting priority srcnat; oifname "vethNB" ip saddr $A_PRIV snat to $A_PUB; }
}
EOF

    if [ "$GRO" = 1 ]; then
        # GRO on the receivers' underlay devices makes esp4_offload's GRO path decrypt the
        # packets (gro_cells re-injection). veth only uses NAPI/GRO for packets from a peer
        # without TSO.
        try in_ns A ethtool -K vethA gro on
        try in_ns B ethtool -K vethB gro on
        try in_ns N ethtool -K vethNA tso off
        try in_ns N ethtool -K vethNB tso off
    fi
}

# xfrm_node NS LOCAL REMOTE SPI_OUT KEY_OUT SPI_IN KEY_IN
xfrm_node() {
    try ip -n "$1" xfrm state add src "$2" dst "$3" proto esp spi "$4" reqid "$REQID" mode transport \
        aead "$AEAD" "$5" 64
    try ip -n "$1" xfrm state add src "$3" dst "$2" proto esp spi "$6" reqid "$REQID" mode transport \
        aead "$AEAD" "$7" 64
    # As Docker: an out policy only; inbound needs no policy (and cleartext is not refused).
    try ip -n "$1" xfrm policy add src "$2/32" dst "$3/32" proto udp dport "$VXLAN_PORT" dir out \
        tmpl src "$2" dst "$3" proto esp reqid "$REQID" mode transport
}

setup_xfrm() {
    xfrm_node A "$A_PRIV" "$B_ADDR" "$SPI_AB" "$KEY_AB" "$SPI_BA" "$KEY_BA"
    xfrm_node B "$B_ADDR" "$A_PUB" "$SPI_BA" "$KEY_BA" "$SPI_AB" "$KEY_AB"
}

# vxlan_node NS LOCAL REMOTE OVERLAY_ADDR MAC PEER_OVERLAY_ADDR PEER_MAC CSUM_FLAG
vxlan_node() {
    try ip -n "$1" link add vxlan0 type vxlan id "$VNI" dstport "$VXLAN_PORT" local "$2" remote "$3" "$8"
    try ip -n "$1" link set vxlan0 address "$5" mtu "$OVERLAY_MTU" up
    try ip -n "$1" addr add "$4/24" dev vxlan0
    # A static neighbour, as Docker programs one: no overlay ARP, so each direction is tested
    # on its own.
    try ip -n "$1" neigh add "$6" lladdr "$7" dev vxlan0 nud permanent
}

setup_vxlan() {
    vxlan_node A "$A_PRIV" "$B_ADDR" "$A_OVL" "$A_MAC" "$B_OVL" "$B_MAC" "$1"
    vxlan_node B "$B_ADDR" "$A_PUB" "$B_OVL" "$B_MAC" "$A_OVL" "$A_MAC" "$1"
}

nft_fix() {
    try in_ns "$1" nft add table ip natfix
    try in_ns "$1" nft add chain ip natfix pre '{ type filter hook prerouting priority mangle; }'
    # A counting twin before the fix rule shows that the rule sees the decrypted packets.
    try in_ns "$1" nft add rule ip natfix pre meta ipsec exists udp dport "$VXLAN_PORT" counter
    try in_ns "$1" nft add rule ip natfix pre meta ipsec exists udp dport "$VXLAN_PORT" udp checksum set 0
}

# Counts decrypted VXLAN packets at the underlay device's ingress hook (where tc and netdev
# ingress run). They only show up there on the GRO path (esp4_offload + GRO re-inject them via
# gro_cells); the default path hands them to IP directly, fragmented ESP always takes it.
observe_ingress() {
    try in_ns "$1" nft -f /dev/stdin <<EOF
table netdev observe {
    chain in { type filter hook ingress device "$2" priority 0; udp dport $VXLAN_PORT counter; }
}
EOF
}

ingress_count() {
    n=$(in_ns "$1" nft list chain netdev observe in 2> /dev/null |
        awk '/counter packets/ { for (i = 1; i <= NF; i++) if ($i == "packets") { print $(i + 1); exit } }')
    printf '%s' "${n:-null}"
}

# Packets counted by the counting twin of the nft fix in namespace $1 (null without the rule).
nft_count() {
    n=$(in_ns "$1" nft list chain ip natfix pre 2> /dev/null |
        awk '/counter packets/ { for (i = 1; i <= NF; i++) if ($i == "packets") { print $(i + 1); exit } }')
    printf '%s' "${n:-null}"
}

# natfix_attach NS IFACE -> JSON {exit, output}
natfix_attach() {
    _ns=$1
    _if=$2
    set --
    if [ -f /etc/natfix/natfix-args ]; then
        while IFS= read -r arg; do
            set -- "$@" "$arg"
        done < /etc/natfix/natfix-args
    fi
    natfix_on "$_ns" "$_if" "$@"
}

# natfix_on NS IFACE ARGS... -> JSON {exit, output}: attach with fixed arguments.
natfix_on() {
    _ns=$1
    _if=$2
    shift 2
    _out=$(in_ns "$_ns" env NO_COLOR=1 natfix attach --iface "$_if" "$@" --pin 2>&1)
    _rc=$?
    printf '{"exit":%s,"output":%s}' "$_rc" "$(json_str "$(plain_tail 800 "$_out")")"
}

# natfix_counters NS -> JSON object reason -> packets of the overlay program (null if none).
natfix_counters() {
    _s=$(natfix stats --json --netns /run/netns/"$1" 2> /dev/null)
    [ -n "$_s" ] || { printf null; return; }
    printf '%s' "$_s" | tr '{' '\n' | awk '
        /"program":"overlay"/ {
            match($0, /"reason":"[a-z_]*"/); r = substr($0, RSTART + 10, RLENGTH - 11)
            match($0, /"packets":[0-9]*/); p = substr($0, RSTART + 10, RLENGTH - 10)
            printf "%s\"%s\":%s", (n++ ? "," : "{"), r, p
        }
        END { printf (n ? "}" : "null") }'
}

# natfix_off NS IFACE -> JSON {exit, nft_left, tc_left}: detach and look for leftovers.
natfix_off() {
    in_ns "$1" natfix detach --iface "$2" > /dev/null 2>&1
    _rc=$?
    _nft=$(in_ns "$1" nft list tables 2> /dev/null | grep -c natfix_overlay)
    _tc=$(in_ns "$1" tc filter show dev "$2" ingress 2> /dev/null | grep -c natfix)
    printf '{"exit":%s,"nft_left":%s,"tc_left":%s}' "$_rc" "${_nft:-0}" "${_tc:-0}"
}

# xfrm_json NS OWN_ADDR -> JSON array of the namespace's SAs with their counters.
xfrm_json() {
    ip -n "$1" -s xfrm state | awk -v me="$2" '
        function flush() {
            if (src != "")
                printf "%s{\"dir\":\"%s\",\"src\":\"%s\",\"dst\":\"%s\",\"spi\":\"%s\",\"bytes\":%d,\"packets\":%d,\"integrity_failed\":%d}",
                    (cnt++ ? "," : ""), (dst == me ? "in" : "out"), src, dst, spi, bytes, pkts, failed
            src = ""; spi = ""; bytes = 0; pkts = 0; failed = 0; cur = 0
        }
        BEGIN { printf "[" }
        /^src / { flush(); src = $2; dst = $4; next }
        / spi / { for (i = 1; i <= NF; i++) if ($i == "spi") { spi = $(i + 1); sub(/\(.*/, "", spi) } }
        cur { gsub(/[(),a-z]/, " "); bytes = $1; pkts = $2; cur = 0; next }
        /lifetime current:/ { cur = 1; next }
        / failed / { for (i = 1; i <= NF; i++) if ($i == "failed") failed = $(i + 1) }
        END { flush(); printf "]" }'
}

# ping_test FROM_NS TO_NS TO_ADDR SIZE -> JSON
ping_test() {
    set -- "$1" "$2" "$3" "$4" $(counters A) $(counters B) $(counters N)
    out=$(in_ns "$1" ping -c "$COUNT" -i 0.2 -W 1 -s "$4" "$3" 2>&1)
    set -- "$@" $(counters A) $(counters B) $(counters N)
    # $5-$8 A, $9-$12 B, $13-$16 N before; $17-$20 A, $21-$24 B, $25-$28 N after; each
    # namespace: UdpInCsumErrors InEchos ReasmOKs FragCreates.
    if [ "$2" = A ]; then echos=$((${18} - $6)); else echos=$((${22} - ${10})); fi

    sent=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
    recv=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
    if [ -z "$sent" ]; then
        echo "ping from $1 to $3 size $4: $out" >> "$ERRORS"
    fi
    printf '{"size":%s,"sent":%s,"received":%s,"requests_delivered":%s,' "$4" "${sent:-0}" "${recv:-0}" "$echos"
    printf '"udp_csum_errors":{"a":%s,"b":%s},' "$((${17} - $5))" "$((${21} - $9))"
    printf '"underlay_fragments_created":%s,"reassembled":{"a":%s,"b":%s}}' \
        "$((${28} - ${16}))" "$((${19} - $7))" "$((${23} - ${11}))"
}

# direction FROM_NS TO_NS TO_ADDR -> JSON {small, large}
direction() {
    printf '{"small":%s,"large":%s}' "$(ping_test "$1" "$2" "$3" "$SMALL")" "$(ping_test "$1" "$2" "$3" "$LARGE")"
}

# iperf_ab -> Mbit/s of TCP from A to B over the overlay (3 s).
iperf_ab() {
    in_ns B iperf3 -s -1 -B "$B_OVL" > /dev/null 2>&1 &
    sleep 1
    _j=$(in_ns A iperf3 -c "$B_OVL" -t 3 -J 2> /dev/null)
    wait
    # The last bits_per_second of the report is end.sum_received's.
    printf '%s' "$_j" | awk -F'[:,]' '/"bits_per_second"/ { v = $2 } END { printf "%.3f", v / 1e6 }'
}

# Overlay throughput with the noudpcsum workaround and with natfix, alternating.
run_throughput() {
    t0=$(uptime_s)
    ws=
    nf=
    for round in 1 2 3; do
        reset_all
        setup_underlay
        setup_xfrm
        setup_vxlan noudpcsum
        ws="$ws${ws:+,}$(iperf_ab)"
        reset_all
        setup_underlay
        setup_xfrm
        setup_vxlan udpcsum
        natfix_on A vethA --overlay-fix > /dev/null
        natfix_on B vethB --overlay-fix > /dev/null
        nf="$nf${nf:+,}$(iperf_ab)"
        natfix_off A vethA > /dev/null
        natfix_off B vethB > /dev/null
    done
    printf '{"scenario":"esp-nat","mode":"throughput","kernel":"%s","noudpcsum_mbps":[%s],"natfix_mbps":[%s],' \
        "$(uname -r)" "$ws" "$nf"
    printf '"timing_s":{"total":%s},"errors":%s}' \
        "$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }')" "$(json_lines "$ERRORS")"
}

# trace_once TAG -> JSON: `natfix trace` of decrypted VXLAN in B during one ping A -> B.
trace_once() {
    _out=/tmp/trace.$1.out
    _err=/tmp/trace.$1.err
    NATFIX_LOG=info natfix trace --netns B --timeout 90 --json udp and port "$VXLAN_PORT" > "$_out" 2> "$_err" &
    _pid=$!
    # Under TCG, setting up takes seconds: ping once it traces.
    _i=0
    while ! grep -q 'tracing `' "$_err" 2> /dev/null && kill -0 "$_pid" 2> /dev/null && [ "$_i" -lt 600 ]; do
        _i=$((_i + 1))
        sleep 0.2
    done
    in_ns A ping -c 1 -W 3 -s "$SMALL" "$B_OVL" > /dev/null 2>&1
    wait "$_pid"
    _rc=$?
    printf '{"exit":%s,"steps":%s,"udp_csum_drop":%s,"natfix_rewrote":%s,"delivered":%s,"last_step":%s,"stderr":%s}' \
        "$_rc" "$(grep -c '"step"' "$_out")" \
        "$(json_bool grep -q '"kind":"drop".*"reason":"UDP_CSUM"' "$_out")" \
        "$(json_bool grep -q '"kind":"natfix".*rewrote.*"program":"overlay"' "$_out")" \
        "$(json_bool grep -q '"kind":"deliver"' "$_out")" \
        "$(json_str "$(tail -n 1 "$_out")")" "$(json_str "$(plain_tail 600 "$(cat "$_err")")")"
}

# Seed 001 traced: the decrypted VXLAN packet dies in UDP receive (UDP_CSUM) without a fix;
# with natfix's overlay fix (auto: the nftables rule) natfix rewrites it and nothing drops it.
run_trace() {
    t0=$(uptime_s)
    reset_all
    setup_underlay
    setup_xfrm
    setup_vxlan udpcsum
    without=$(trace_once nofix)
    attach=$(natfix_on B vethB --overlay-fix)
    with=$(trace_once fix)
    detach=$(natfix_off B vethB)
    left=$(in_ns B nft list tables 2> /dev/null | grep -c natfix_trace)
    printf '{"scenario":"esp-nat","mode":"trace","kernel":"%s","without_fix":%s,"with_fix":%s,' "$(uname -r)" "$without" "$with"
    printf '"natfix":{"b":%s},"natfix_detach":{"b":%s},"trace_tables_left":%s,' "$attach" "$detach" "${left:-0}"
    printf '"timing_s":{"total":%s},"errors":%s}' \
        "$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }')" "$(json_lines "$ERRORS")"
}

# `natfix lab --scenario overlay` as a user runs it on a kernel with ESP: the
# native path of the demo (its own namespaces, in a private mount namespace).
run_lab() {
    reset_all
    out=$(natfix lab --scenario overlay 2>&1)
    rc=$?
    printf '{"scenario":"esp-nat","mode":"lab","kernel":"%s","exit":%s,"output":%s,"errors":%s}' \
        "$(uname -r)" "$rc" "$(json_str "$out")" "$(json_lines "$ERRORS")"
}

run_mode() {
    mode=$1
    t0=$(uptime_s)
    reset_all
    esp=true
    csum=udpcsum
    fix=none
    extra=
    nf_args=
    VXLAN_PORT=4789
    case "$mode" in
        cleartext) esp=false ;;
        baseline) ;;
        baseline-4777) VXLAN_PORT=4777 ;;
        natfix-port-4777) VXLAN_PORT=4777 nf_args="--overlay-fix" ;;
        noudpcsum) fix="VXLAN devices recreated with noudpcsum on A and B" ;;
        nft) fix="nft 'meta ipsec exists udp dport $VXLAN_PORT udp checksum set 0' (prerouting, mangle) on A and B" ;;
        nft-one-side) fix="the nft rule on B only" ;;
        natfix) fix="natfix attach --iface <underlay> \$NATFIX_ARGS --pin on A and B" ;;
        natfix-auto) nf_args="--overlay-fix --reqid $REQID" ;;
        natfix-auto-recompute) nf_args="--overlay-fix --csum recompute" ;;
        natfix-tc) nf_args="--overlay-fix --csum-backend tc" ;;
        natfix-tc-recompute) nf_args="--overlay-fix --csum-backend tc --csum recompute" ;;
        natfix-nft) nf_args="--overlay-fix --csum-backend nft" ;;
        natfix-both) nf_args="--overlay-fix --csum-backend both" ;;
        natfix-one-side) nf_args="--overlay-fix" ;;
        # both: the tc program's own scope checks (secpath, reqid) are under test too.
        natfix-cleartext) esp=false nf_args="--overlay-fix --csum-backend both" ;;
        natfix-wrong-reqid) nf_args="--overlay-fix --csum-backend both --reqid 0x1234" ;;
        throughput)
            run_throughput
            return
            ;;
        lab)
            run_lab
            return
            ;;
        trace)
            run_trace
            return
            ;;
        *)
            printf '{"scenario":"esp-nat","mode":%s,"errors":[%s]}' "$(json_str "$mode")" "$(json_str "unknown mode")"
            return
            ;;
    esac

    setup_underlay
    if [ "$esp" = true ]; then
        setup_xfrm
        observe_ingress A vethA
        observe_ingress B vethB
    fi
    setup_vxlan "$csum"

    case "$mode" in
        noudpcsum)
            # The flag cannot be changed on an existing device; record what the kernel says.
            if out=$(ip -n A link set vxlan0 type vxlan noudpcsum 2>&1); then
                inplace=accepted
            else
                inplace=$out
            fi
            extra="$extra,\"noudpcsum_in_place\":$(json_str "$inplace")"
            for ns in A B; do
                try ip -n "$ns" link del vxlan0
            done
            setup_vxlan noudpcsum
            ;;
        nft)
            nft_fix A
            nft_fix B
            ;;
        nft-one-side)
            nft_fix B
            ;;
        natfix-one-side)
            # shellcheck disable=SC2086 # word splitting of our own fixed arguments
            extra="$extra,\"natfix\":{\"b\":$(natfix_on B vethB $nf_args)}"
            ;;
        natfix-*)
            # shellcheck disable=SC2086
            extra="$extra,\"natfix\":{\"a\":$(natfix_on A vethA $nf_args),\"b\":$(natfix_on B vethB $nf_args)}"
            ;;
        natfix)
            if command -v natfix > /dev/null; then
                extra="$extra,\"natfix\":{\"a\":$(natfix_attach A vethA),\"b\":$(natfix_attach B vethB)}"
            else
                echo "natfix: no natfix binary in the initramfs (pass --natfix-bin)" >> "$ERRORS"
            fi
            ;;
    esac

    t_setup=$(uptime_s)
    a_cs0=$(counters A | cut -d' ' -f1)
    b_cs0=$(counters B | cut -d' ' -f1)
    frag0=$(counters N | cut -d' ' -f4)
    a_to_b=$(direction A B "$B_OVL")
    b_to_a=$(direction B A "$A_OVL")
    a_cs1=$(counters A | cut -d' ' -f1)
    b_cs1=$(counters B | cut -d' ' -f1)
    frags=$(($(counters N | cut -d' ' -f4) - frag0))
    t_pings=$(uptime_s)

    if [ "$esp" = true ]; then
        extra="$extra,\"decrypted_at_ingress\":{\"a\":$(ingress_count A),\"b\":$(ingress_count B)}"
    fi
    case "$mode" in nft | nft-one-side)
        extra="$extra,\"nft_rule_packets\":{\"a\":$(nft_count A),\"b\":$(nft_count B)}" ;;
    esac
    case "$mode" in natfix-*)
        [ -n "$fix" ] && [ "$fix" != none ] || fix="natfix attach --iface <underlay> $nf_args --pin"
        extra="$extra,\"natfix_counters\":{\"a\":$(natfix_counters A),\"b\":$(natfix_counters B)}"
        extra="$extra,\"natfix_status\":$(natfix_status)"
        if [ "$mode" = natfix-one-side ]; then
            extra="$extra,\"natfix_detach\":{\"b\":$(natfix_off B vethB)}"
        else
            extra="$extra,\"natfix_detach\":{\"a\":$(natfix_off A vethA),\"b\":$(natfix_off B vethB)}"
        fi
        ;;
    esac

    printf '{"scenario":"esp-nat","mode":"%s","kernel":"%s","esp":%s,"gro":%s,"esp4_offload_loaded":%s,' \
        "$mode" "$(uname -r)" "$esp" "$([ "$GRO" = 1 ] && echo true || echo false)" \
        "$(json_bool grep -q '^esp4_offload ' /proc/modules)"
    printf '"vxlan_csum":"%s","vxlan_port":%s,"fix":%s,"hop_mtu":%s,"overlay_mtu":%s,' \
        "$([ "$mode" = noudpcsum ] && echo noudpcsum || echo udpcsum)" "$VXLAN_PORT" "$(json_str "$fix")" "$HOP_MTU" "$OVERLAY_MTU"
    printf '"a_to_b":%s,"b_to_a":%s,' "$a_to_b" "$b_to_a"
    printf '"udp_csum_errors":{"a":{"before":%s,"after":%s},"b":{"before":%s,"after":%s}},' \
        "$a_cs0" "$a_cs1" "$b_cs0" "$b_cs1"
    printf '"underlay_fragments_created":%s,"esp_fragmented":%s,' \
        "$frags" "$([ "$esp" = true ] && [ "$frags" -gt 0 ] && echo true || echo false)"
    printf '"xfrm":{"a":%s,"b":%s}%s,' "$(xfrm_json A "$A_PRIV")" "$(xfrm_json B "$B_ADDR")" "$extra"
    printf '"timing_s":{"setup":%s,"pings":%s,"total":%s},"errors":%s}' \
        "$(awk -v a="$t0" -v b="$t_setup" 'BEGIN { printf "%.2f", b - a }')" \
        "$(awk -v a="$t_setup" -v b="$t_pings" 'BEGIN { printf "%.2f", b - a }')" \
        "$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }')" \
        "$(json_lines "$ERRORS")"
}

modes=$(echo "${1:-baseline}" | tr , ' ')
[ "$modes" = all ] && modes="cleartext baseline noudpcsum nft nft-one-side natfix"
[ "$modes" = natfix-all ] && modes="baseline natfix-auto natfix-auto-recompute natfix-tc natfix-tc-recompute natfix-nft natfix-both natfix-one-side natfix-cleartext natfix-wrong-reqid"
set -- $modes
run_modes "$@"
reset_all
