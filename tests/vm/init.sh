#!/bin/sh
# /init of the natfix test VM (busybox sh). Mounts the pseudo file systems, loads the modules
# listed by `cargo xtask vm`, runs one scenario script, prints exactly one line
# `NATFIX-RESULT <json>` on the console and powers off. The host reads that line.
#
# Kernel command line: natfix.scenario=NAME natfix.mode=MODE[,MODE...] natfix.gro=1|0
#                      natfix.verbose=1|0 natfix.diagnose=1|0

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
ln -sf /proc/self/fd/0 /dev/stdin; ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /run /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
exec </dev/console >/dev/console 2>&1

# Kernel messages on the console could split the result line: keep them in the ring buffer.
dmesg -n 1

. /scenarios/lib.sh
BOOT_S=$(uptime_s)

SCENARIO=
MODE=baseline
GRO=1
VERBOSE=0
DIAGNOSE_KERNEL=0
for word in $(cat /proc/cmdline); do
    case "$word" in
        natfix.scenario=*) SCENARIO=${word#*=} ;;
        natfix.mode=*) MODE=${word#*=} ;;
        natfix.gro=*) GRO=${word#*=} ;;
        natfix.verbose=*) VERBOSE=${word#*=} ;;
        natfix.diagnose=*) DIAGNOSE_KERNEL=${word#*=} ;;
    esac
done
export SCENARIO MODE GRO VERBOSE

# The kernel runs /sbin/modprobe for crypto templates and nft expressions it misses; busybox
# modprobe reads the modules.dep/modules.alias subset the host wrote.
echo /sbin/modprobe > /proc/sys/kernel/modprobe

# Load in the host-computed order (dependencies and soft dependencies first). Failures are
# reported, not fatal: CPU-specific crypto modules cannot load on TCG's default CPU.
KVER=$(uname -r)
: > /tmp/modules.failed
if [ -f /etc/natfix/modules ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        name=${mod##*/}
        name=$(echo "${name%.ko}" | tr - _)
        grep -q "^$name " /proc/modules && continue
        if ! out=$(insmod "/lib/modules/$KVER/$mod" 2>&1); then
            echo "$name: $out" >> /tmp/modules.failed
        fi
    done < /etc/natfix/modules
fi

# What natfix detects of this kernel (tcx, conntrack kfuncs, esp4_offload, ...), with
# natfix.diagnose=1 (`cargo xtask vm --diagnose`, --matrix): the host reads the kernel.* findings
# for KERNELS.md.
DIAGNOSE=null
if [ "$DIAGNOSE_KERNEL" = 1 ] && command -v natfix > /dev/null; then
    _d=$(NO_COLOR=1 natfix diagnose --json --sample 1 2> /dev/null)
    case "$_d" in
        "{"*) DIAGNOSE=$(printf '%s' "$_d" | tr -d '\n') ;;
    esac
fi

RESULT=/tmp/result.json
: > "$RESULT"
SCRIPT=/scenarios/$SCENARIO.sh
if [ -z "$SCENARIO" ] || [ ! -f "$SCRIPT" ]; then
    printf '{"error":%s}' "$(json_str "no scenario script for '$SCENARIO'")" > "$RESULT"
else
    sh "$SCRIPT" "$MODE" > "$RESULT" 2> /tmp/scenario.log
    rc=$?
    if [ ! -s "$RESULT" ]; then
        printf '{"error":%s}' \
            "$(json_str "scenario $SCENARIO exited $rc without a result: $(tail -c 1500 /tmp/scenario.log)")" \
            > "$RESULT"
    fi
fi

if [ "$VERBOSE" = 1 ]; then
    echo "----- modules that failed to load"
    cat /tmp/modules.failed
    echo "----- scenario stderr"
    cat /tmp/scenario.log
    echo "----- dmesg"
    dmesg | grep -iE "symbol|fail|error|warn|cannot|xfrm|esp|vxlan" | tail -n 60
    echo "-----"
fi

printf '\nNATFIX-RESULT {"boot_s":%s,"scenario_s":%s,"modules_failed":%s,"diagnose":%s,"result":%s}\n' \
    "$BOOT_S" "$(awk -v a="$BOOT_S" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }')" \
    "$(json_lines /tmp/modules.failed)" "$DIAGNOSE" "$(tr -d '\n' < "$RESULT")"
sync
poweroff -f
