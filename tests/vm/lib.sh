# Helpers shared by /init and the scenario scripts of the natfix test VM (busybox sh).

# Debian's static busybox runs its own applets before searching PATH: make `ip` and `tc`
# iproute2's (busybox's ip knows neither netns nor xfrm).
ip() {
    /usr/sbin/ip "$@"
}

tc() {
    /usr/sbin/tc "$@"
}

# JSON string literal of $1; control characters become spaces.
json_str() {
    printf '"%s"' "$(printf '%s' "$1" | tr '\n\r\t' '   ' | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g')"
}

# JSON array of strings, one per non-empty line of file $1.
json_lines() {
    sep=
    printf '['
    if [ -f "$1" ]; then
        while IFS= read -r line; do
            [ -n "$line" ] || continue
            printf '%s%s' "$sep" "$(json_str "$line")"
            sep=,
        done < "$1"
    fi
    printf ']'
}

# `natfix status --json` on one line (every attachment's record: programs with hook and attach
# mode, the guard's flow source, the overlay fix's backend and nftables table), or null.
natfix_status() {
    _st=$(natfix status --json 2> /dev/null)
    case "$_st" in
        "{"*) printf '%s' "$_st" | tr -d '\n' ;;
        *) printf null ;;
    esac
}

# JSON boolean of a command's success.
json_bool() {
    if "$@"; then printf true; else printf false; fi
}

# Run a command inside network namespace $1 (created by `ip netns add`). nsenter keeps the
# mount namespace, so /sys/fs/bpf stays visible (`ip netns exec` remounts /sys).
in_ns() {
    _ns=$1
    shift
    nsenter --net=/run/netns/"$_ns" "$@"
}

# UdpInCsumErrors InEchos ReasmOKs FragCreates of namespace $1, from one read of
# /proc/net/snmp (each nsenter costs time under TCG).
counters() {
    _v=$(in_ns "$1" cat /proc/net/snmp | awk '
        function col(sec, field,    i) { for (i = 2; i <= NF; i++) if ($i == field) c[sec, field] = i }
        $1 == "Udp:" && !u { col("Udp", "InCsumErrors"); u = 1; next }
        $1 == "Udp:" { udp = $(c["Udp", "InCsumErrors"]) }
        $1 == "Icmp:" && !m { col("Icmp", "InEchos"); m = 1; next }
        $1 == "Icmp:" { echos = $(c["Icmp", "InEchos"]) }
        $1 == "Ip:" && !p { col("Ip", "ReasmOKs"); col("Ip", "FragCreates"); p = 1; next }
        $1 == "Ip:" { reasm = $(c["Ip", "ReasmOKs"]); frag = $(c["Ip", "FragCreates"]) }
        END { print udp + 0, echos + 0, reasm + 0, frag + 0 }')
    echo "${_v:-0 0 0 0}"
}

# Seconds since boot with centiseconds, for durations.
uptime_s() {
    cut -d' ' -f1 /proc/uptime
}

# Run a command; on failure record the command and its output in $ERRORS.
try() {
    [ "$VERBOSE" = 1 ] && echo "[$(uptime_s)] $*" >&2
    if ! _out=$("$@" 2>&1); then
        echo "$* -> $_out" >> "$ERRORS"
        return 1
    fi
}

# The last $1 bytes of text $2, without colour escapes (in case a logger ignores NO_COLOR).
plain_tail() {
    printf '%s' "$2" | sed "s/$(printf '\033')\[[0-9;]*m//g" | tail -c "$1"
}

# Runs run_mode (defined by the scenario) for each mode given: one JSON
# object for one mode, an array for several.
run_modes() {
    if [ $# -gt 1 ]; then
        printf '['
        _sep=
        for _m in "$@"; do
            printf '%s' "$_sep"
            run_mode "$_m"
            _sep=,
        done
        printf ']'
    else
        run_mode "$1"
    fi
}

# reset_netns NS... : delete the scenario's namespaces and natfix's pins, empty $ERRORS.
reset_netns() {
    for ns in "$@"; do
        ip netns del "$ns" 2> /dev/null
    done
    rm -rf /sys/fs/bpf/natfix 2> /dev/null
    : > "$ERRORS"
}
