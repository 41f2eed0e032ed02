#!/usr/bin/env bash
# Interop harness for libvirt 11.3 (Debian 13 "trixie"): our virtlogd / virtlockd as
# drop-ins for trixie's C daemons under trixie's libvirtd 11.3 + QEMU 10 (TCG guests),
# on a Debian 12 host.
#
#   VIRTLOGD_BIN=target/debug/virtlogd VIRTLOCKD_BIN=target/debug/virtlockd \
#       VHCTL_BIN=target/debug/vhctl tests/interop11/run.sh
#
# Must run as root. The first run builds a trixie root with debootstrap (cached under
# $INTEROP11_CACHE, default /var/cache/virt-helpers; see chroot.sh); every run mounts a
# throw-away overlay over it and works inside fresh mount + pid + net namespaces, so
# neither the cache nor the host's libvirt is touched. Prints PASS/FAIL lines; exits 0
# only if every check passed. See README.md for the scenarios.
#
# Environment:
#   VIRTLOGD_BIN, VIRTLOCKD_BIN, VHCTL_BIN   ours (default target/debug/...)
#   INTEROP11_CACHE     where the trixie root is cached (default /var/cache/virt-helpers)
#   INTEROP11_TIMEOUT   wall-clock limit for the namespace part, seconds (default 900)
#   INTEROP11_KEEP=1    keep the work directory after a passing run
#   INTEROP11_TMP       where the work directory is created (default ${TMPDIR:-/tmp})
set -u -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# check/pass/fail/wait_until and the /proc/locks helpers are shared with the 9.0 harness.
# shellcheck source=../interop/lib.sh
. "$HERE/../interop/lib.sh"
# shellcheck source=chroot.sh
. "$HERE/chroot.sh"

export VIRTLOGD_BIN=${VIRTLOGD_BIN:-$REPO/target/debug/virtlogd}
export VIRTLOCKD_BIN=${VIRTLOCKD_BIN:-$REPO/target/debug/virtlockd}
export VHCTL_BIN=${VHCTL_BIN:-$REPO/target/debug/vhctl}

###############################################################################
# Outer part: the cached root, the work dir, the namespaces.
###############################################################################
if [[ -z ${INTEROP11_INNER:-} ]]; then
    [[ $(id -u) == 0 ]] || die "must run as root (debootstrap, mount namespaces, system-mode daemons)"
    for b in unshare timeout chroot mount sha256sum stat awk flock; do
        command -v "$b" >/dev/null 2>&1 || die "missing required program: $b"
    done
    for b in "$VIRTLOGD_BIN" "$VIRTLOCKD_BIN" "$VHCTL_BIN"; do
        [[ -x $b ]] || die "missing our binary $b (cargo build first)"
    done
    t0=$(date +%s.%N)
    build_chroot
    t1=$(date +%s.%N)
    base=${INTEROP11_TMP:-${TMPDIR:-/tmp}}
    WORK=$(mktemp -d "$base/virt-interop11.XXXXXX") || die "mktemp failed"
    chmod 755 "$WORK"
    log "work dir: $WORK; trixie root: $CHROOT"
    timeout --kill-after=15 "${INTEROP11_TIMEOUT:-900}" \
        unshare -m --propagation private -p -f --mount-proc --kill-child -n -- \
        env INTEROP11_INNER=1 INTEROP11_WORK="$WORK" CHROOT="$CHROOT" bash "$HERE/run.sh"
    rc=$?
    t2=$(date +%s.%N)
    [[ $rc == 124 || $rc == 137 ]] && echo "FAIL harness: hit the global timeout of ${INTEROP11_TIMEOUT:-900}s"
    printf 'interop11: rc=%s root=%ss scenarios=%ss\n' "$rc" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')" \
        "$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')"
    if [[ $rc == 0 && -z ${INTEROP11_KEEP:-} ]]; then
        rm -rf "$WORK"
    else
        log "artifacts kept in $WORK"
    fi
    exit "$rc"
fi

###############################################################################
# Inner part: private mount, pid and net namespaces.
###############################################################################
WORK=$INTEROP11_WORK
ART=$WORK/artifacts
R=$WORK/root                  # the merged overlay: trixie as this run sees it
mkdir -p "$ART" "$WORK/upper" "$WORK/ovl" "$R"

mount -t overlay interop11 -o "lowerdir=$CHROOT,upperdir=$WORK/upper,workdir=$WORK/ovl" "$R" ||
    die "cannot mount an overlay over $CHROOT"
mount -t proc proc "$R/proc" || die "cannot mount /proc in the root"
mount --rbind /sys "$R/sys" && mount --make-rslave "$R/sys" || die "cannot bind /sys"
mount --rbind /dev "$R/dev" && mount --make-rslave "$R/dev" || die "cannot bind /dev"
mount -t tmpfs -o mode=0755,size=64m interop11-run "$R/run" && mkdir -p "$R/run/lock" ||
    die "cannot mount a tmpfs on the root's /run"

CENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
# rx CMD...: run CMD inside the trixie root.
rx() { chroot "$R" "${CENV[@]}" "$@"; }
VIRSH_URI=qemu:///system
virsh_() { timeout 60 chroot "$R" "${CENV[@]}" virsh -q -c "$VIRSH_URI" "$@"; }
vadmin() { timeout 30 chroot "$R" "${CENV[@]}" virt-admin "$@"; }

# The implementations, kept inside the root: /usr/sbin/<daemon> is what runs, and is
# replaced with `install` (a new inode; cp onto a running binary fails with ETXTBSY).
C11=/usr/local/lib/vh/c11 OURS=/usr/local/lib/vh/ours
mkdir -p "$R$C11" "$R$OURS"
for d in virtlogd virtlockd; do cp -a "$R/usr/sbin/$d" "$R$C11/$d"; done
install -m 755 "$VIRTLOGD_BIN" "$R$OURS/virtlogd"
install -m 755 "$VIRTLOCKD_BIN" "$R$OURS/virtlockd"
install -m 755 "$VHCTL_BIN" "$R/usr/local/bin/vhctl"
use_impl() { # use_impl c11|ours: put that implementation at /usr/sbin
    local dir=$C11 d; [[ $1 == ours ]] && dir=$OURS
    for d in virtlogd virtlockd; do install -m 755 "$R$dir/$d" "$R/usr/sbin/$d" || return 1; done
}

LOGD_PID= LOCKD_PID= LIBVIRTD_PID= VHCTL_PID=
CLEANED=
start_bg() { # start_bg NAME CMD... (in the root); sets BG_PID
    chroot "$R" "${CENV[@]}" "${@:2}" </dev/null >>"$ART/$1.stderr" 2>&1 &
    BG_PID=$!
}
socket_up() { pid_alive "$2" && [[ -S $R/run/libvirt/$1 ]]; }
start_daemons() { # start_daemons TAG: virtlogd + virtlockd from /usr/sbin, then libvirtd
    rm -f "$R"/run/libvirt/virtlo*-sock
    start_bg "$1-virtlogd" /usr/sbin/virtlogd -f /etc/libvirt/virtlogd.conf; LOGD_PID=$BG_PID
    start_bg "$1-virtlockd" /usr/sbin/virtlockd -f /etc/libvirt/virtlockd.conf; LOCKD_PID=$BG_PID
    wait_until 20 "virtlogd socket" socket_up virtlogd-sock "$LOGD_PID" &&
        wait_until 20 "virtlockd socket" socket_up virtlockd-sock "$LOCKD_PID" ||
        { fail "$1: virtlogd/virtlockd did not create their sockets"; return 1; }
    start_bg "$1-libvirtd" /usr/sbin/libvirtd -f /etc/libvirt/libvirtd.conf; LIBVIRTD_PID=$BG_PID
    if wait_until 120 "libvirtd" bash -c "kill -0 $LIBVIRTD_PID && timeout 10 chroot '$R' ${CENV[*]} virsh -q -c qemu:///system version >/dev/null 2>&1"; then
        pass "$1: virtlogd (pid $LOGD_PID), virtlockd (pid $LOCKD_PID) and libvirtd 11.3 up"
    else
        fail "$1: libvirtd did not come up"; return 1
    fi
}
stop_daemons() {
    local d
    if pid_alive "$LIBVIRTD_PID"; then
        for d in $(virsh_ list --name 2>/dev/null); do virsh_ destroy "$d" >/dev/null 2>&1; done
    fi
    kill_wait "$LIBVIRTD_PID" 20; kill_wait "$LOCKD_PID" 10; kill_wait "$LOGD_PID" 10
    LIBVIRTD_PID= LOCKD_PID= LOGD_PID=
}

dump_logs() {
    local f
    echo "================ diagnostics ================"
    for f in "$ART"/*.stderr "$R"/var/log/libvirt/libvirtd.log "$R"/var/log/libvirt/qemu/g?.log; do
        [[ -s $f ]] || continue
        echo "---------------- $f (last 80 lines) ----------------"
        tail -n 80 "$f"
    done
    echo "---------------- /proc/locks ----------------"; cat /proc/locks
    echo "---------------- processes ----------------"
    ps -eo pid,ppid,stat,etime,args 2>/dev/null | grep -Ev ' (ps|grep) ' | head -n 40
    echo "============================================="
}
cleanup() {
    local rc=$?
    [[ -n $CLEANED ]] && return
    CLEANED=1
    trap - EXIT INT TERM HUP
    if ((rc != 0 || IT_FAIL > 0)); then dump_logs >&2; fi
    cp -a "$R/var/log/libvirt" "$ART/var-log-libvirt" 2>/dev/null
    kill_wait "$VHCTL_PID" 5
    stop_daemons
    # Everything else dies with this pid namespace; the overlay and mounts with the
    # mount namespace.
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

# ------------------------------------------------------------------ configuration
E=$R/etc/libvirt
write_configs() {
    printf 'log_level = 3\nlog_outputs = "3:stderr"\n' >"$E/virtlogd.conf"
    printf 'log_level = 3\nlog_outputs = "3:stderr"\n' >"$E/virtlockd.conf"
    cat >"$E/libvirtd.conf" <<'EOF'
unix_sock_group = "root"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_filters = "1:locking 1:logging 2:qemu 3:*"
log_outputs = "2:file:/var/log/libvirt/libvirtd.log"
EOF
    # No cgroups, no security driver, no QEMU mount namespace: the host runs no systemd
    # and the root's / is not a mount point of its own.
    cat >"$E/qemu.conf" <<'EOF'
stdio_handler = "logd"
lock_manager = "lockd"
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
EOF
    cat >"$E/qemu-lockd.conf" <<'EOF'
auto_disk_leases = 1
require_lease_for_disks = 1
file_lockspace_dir = "/var/lib/libvirt/lockd/files"
EOF
    # No networks from the package's default config.
    rm -f "$E"/qemu/networks/autostart/*.xml
}

# ------------------------------------------------------------------ guests
DISK=/var/lib/libvirt/images/shared.qcow2
LEASE=$R/var/lib/libvirt/lockd/files/$(printf '%s' "$DISK" | sha256sum | cut -d' ' -f1)
QLOG=$R/var/log/libvirt/qemu
# Two guests on one disk path. The disk is blank: SeaBIOS finds nothing to boot and
# prints "No bootable device. Retrying in 2 seconds." on the serial port forever, so
# the serial log keeps growing while the guest runs -- through every re-exec.
guest_xml() {
    cat <<EOF
<domain type='qemu'>
  <name>$1</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
    <bios useserial='yes' rebootTimeout='2000'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$DISK'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'>
      <log file='/var/log/libvirt/qemu/$1-serial.log'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}
new_disk() { rx qemu-img create -q -f qcow2 "$DISK" 64M; }
# QEMU's own OFD lock on the image would refuse g2 before libvirt asks virtlockd (the
# lease is acquired only when the CPUs start): give g2 a new inode at the same path,
# as a second host on shared storage would see it. The lease name (sha256 of the path)
# is the same, so only virtlockd can refuse it.
swap_disk() { mv "$R$DISK" "$R$DISK.in-use-$(date +%s%N)" && new_disk; }
define_guests() {
    local g
    new_disk || { fail "setup: qemu-img create failed"; return 1; }
    for g in g1 g2; do
        guest_xml $g >"$R/root/$g.xml"
        virsh_ define /root/$g.xml >/dev/null || { fail "setup: virsh define $g failed"; return 1; }
    done
}
qemu_pid() { cat "$R/run/libvirt/qemu/$1.pid" 2>/dev/null; }
# log_pipes GUEST: how many of QEMU's pipes have their other end in virtlogd.
log_pipes() {
    local q w n=0
    q=$(qemu_pid "$1") || { echo 0; return; }
    for w in $(find "/proc/$q/fd" -lname 'pipe:*' -printf '%l\n' 2>/dev/null | sort -u); do
        ls -l "/proc/$LOGD_PID/fd" 2>/dev/null | grep -qF -- "$w" && n=$((n + 1))
    done
    echo "$n"
}
size_of() { stat -c %s "$1" 2>/dev/null || echo 0; }
grows() { local f=$1 a=$2; (($(size_of "$f") > a)); }
serial_grows() { # serial_grows GUEST: the serial log gets new bytes
    local f=$QLOG/$1-serial.log a
    a=$(size_of "$f")
    wait_until 30 "$1 serial log grows" grows "$f" "$a"
}
lease_held() { [[ -e $LEASE ]] && has_byte0_write_lock "$LEASE" "$LOCKD_PID"; }
lease_free() { no_lock_by "$LEASE" "$LOCKD_PID"; }
grepq() { grep -qsF -- "$2" "$1"; }
count() { grep -csF -- "$2" "$1" 2>/dev/null || true; }

# g2_refused TAG: g2 (fresh inode, same path) is refused by virtlockd; g1 unharmed.
g2_refused() {
    local out
    swap_disk || { fail "$1: could not swap the disk image"; return 1; }
    if out=$(virsh_ start g2 2>&1); then
        fail "$1: g2 started although g1 holds the disk lease"
        virsh_ destroy g2 >/dev/null 2>&1
        return 1
    fi
    if grep -qi "resource busy" <<<"$out" && grep -qiF "${LEASE##*/}' is locked" <<<"$out"; then
        pass "$1: g2 refused by virtlockd (resource busy: Lockspace resource '<sha256>' is locked)"
    else
        fail "$1: g2 failed, but not with virtlockd's lock error: $out"
    fi
    check "$1: g2 shut off" wait_until 15 "g2 shut off" dom_is g2 "shut off"
    check "$1: g1 still running" dom_is g1 running
    check "$1: lease still held by virtlockd (pid $LOCKD_PID)" lease_held
}

# ------------------------------------------------------------------ virt-admin
# Outputs of virt-admin 11.3 that must be identical for ours and C 11.3, taken at the
# same point of the scenario (g1 running, g2 refused). Client ids, connection times
# and pids depend on history and are masked; everything else is compared verbatim.
admin_commands() { # admin_commands DAEMON
    local s
    echo "version"
    echo "srv-list"
    for s in "$1" admin; do
        echo "srv-threadpool-info $s"
        echo "srv-clients-info $s"
        echo "srv-clients-list $s"
    done
    echo "daemon-log-filters"
    echo "daemon-log-outputs"
    echo "client-info $1 FIRST"
}
normalize() {
    sed -E -e 's/[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}[+-][0-9]{4}/<time>/g' \
        -e 's/^( *)[0-9]+( +)(unix|tcp|tls)/\1<id>\2\3/' \
        -e 's/^(id|unix_process_id|connection_time) *: .*/\1: <masked>/' \
        -e 's/^(Running against daemon): .*/\1: <version>/'
}
admin_capture() { # admin_capture TAG DAEMON: one file per command in $ART/admin-TAG-DAEMON/
    local dir=$ART/admin-$1-$2 c n=0 id
    mkdir -p "$dir"
    while read -r c; do
        n=$((n + 1))
        if [[ $c == "client-info $2 FIRST" ]]; then
            id=$(vadmin -c "$2:///system" srv-clients-list "$2" 2>/dev/null | awk 'NR > 2 && $1 ~ /^[0-9]+$/ { print $1; exit }')
            c="client-info $2 ${id:-0}"
        fi
        # shellcheck disable=SC2086
        { vadmin -c "$2:///system" $c 2>&1; echo "rc=$?"; } >"$dir/$(printf %02d $n).raw"
        { echo "\$ virt-admin $c" | sed -E 's/client-info ([a-z]+) [0-9]+/client-info \1 <id>/'
          if [[ $c == srv-list ]]; then
              # C lists its servers in hash-table order, which changes from run to run
              # (libvirt seeds its hash function randomly): compare them as a set.
              normalize <"$dir/$(printf %02d $n).raw" |
                  sed -E 's/^ [0-9]+ +([a-z]+)$/ <id>   \1/' >"$dir/srv-list.tmp"
              head -n 2 "$dir/srv-list.tmp"
              tail -n +3 "$dir/srv-list.tmp" | grep '^ <id>' | LC_ALL=C sort
              tail -n +3 "$dir/srv-list.tmp" | grep -v '^ <id>'
          else
              normalize <"$dir/$(printf %02d $n).raw"
          fi; } >"$dir/$(printf %02d $n).txt"
    done < <(admin_commands "$2")
}
admin_compare() { # admin_compare DAEMON: ours vs c11, per command
    local a b f name
    for a in "$ART/admin-ours-$1"/*.txt; do
        f=${a##*/}; b=$ART/admin-c11-$1/$f
        name=$(head -n1 "$a")
        if [[ $name == *" version" ]]; then
            log "info: $1: ours: $(grep 'Running against' "${a%.txt}.raw"); C: $(grep 'Running against' "${b%.txt}.raw")"
        fi
        if diff -u "$b" "$a" >"$ART/admin-diff-$1-$f"; then
            pass "admin: $1: '${name#\$ }' identical for ours and C 11.3"
        else
            fail "admin: $1: '${name#\$ }' differs from C 11.3 (-C +ours):"
            sed 's/^/    /' "$ART/admin-diff-$1-$f"
        fi
    done
}
# S: virt-admin daemon-shutdown as 11.3 offers it (admin procedure 20), with and without
# --preserve, on daemons that hold a log pipe and a lease (vhctl clients). Recorded per
# implementation: virt-admin's output and exit code, whether and how the daemon exits
# (waiting up to 10 s), and its warning/error lines (times and pids masked).
S_LOCKSPACE=/var/lib/vh-shutdown-lockspace
shutdown_case() { # shutdown_case IMPL VARIANT(preserve|plain)
    local impl=$1 v=$2 f args d pid out rc holders=()
    args=daemon-shutdown; [[ $v == preserve ]] && args="daemon-shutdown --preserve"
    f=$ART/shutdown-$impl-$v.txt; : >"$f"
    start_bg "S-$impl-$v-virtlogd" /usr/sbin/virtlogd -f /etc/libvirt/virtlogd.conf; LOGD_PID=$BG_PID
    start_bg "S-$impl-$v-virtlockd" /usr/sbin/virtlockd -f /etc/libvirt/virtlockd.conf; LOCKD_PID=$BG_PID
    wait_until 20 "sockets" bash -c "[[ -S $R/run/libvirt/virtlogd-sock && -S $R/run/libvirt/virtlockd-sock ]]" ||
        { fail "S($impl $v): daemons did not start"; return 1; }
    start_bg "S-$impl-$v-vhctl-log" vhctl log-run --socket /run/libvirt/virtlogd-sock \
        --path /var/log/libvirt/qemu/shutdown-$v.log -- sh -c 'while :; do echo tick; sleep 0.2; done'
    holders+=("$BG_PID")
    start_bg "S-$impl-$v-vhctl-lease" vhctl lease --socket /run/libvirt/virtlockd-sock \
        --lockspace $S_LOCKSPACE --disk res-$v -- sleep 600
    holders+=("$BG_PID")
    s_held() { ls -l /proc/"$LOGD_PID"/fd | grep -q "shutdown-$v.log" && holds_any_lock "$LOCKD_PID"; }
    wait_until 10 "log pipe and lease held" s_held ||
        fail "S($impl $v): the vhctl clients did not get their log and lease"
    for d in "virtlogd $LOGD_PID" "virtlockd $LOCKD_PID"; do
        set -- $d
        # shellcheck disable=SC2086
        out=$(vadmin -c "$1:///system" $args 2>&1); rc=$?
        printf '$ virt-admin -c %s:///system %s\n%s\nrc=%s\n' "$1" "$args" "$out" "$rc" >>"$f"
        if wait_until 10 "$1 exits" daemon_gone "$2"; then
            wait "$2" 2>/dev/null; echo "$1 exited with status $?" >>"$f"
        else
            echo "$1 still running" >>"$f"
        fi
    done
    # virtlockd kills a lease owner whose connection closes while it holds leases; the
    # vhctl lease holder is such an owner when the daemon quits.
    if wait_until 5 "lease holder gone" daemon_gone "${holders[1]}"; then
        echo "lease holder (vhctl, the owner) gone" >>"$f"
    else
        echo "lease holder (vhctl, the owner) still running" >>"$f"
    fi
    for d in virtlogd virtlockd; do
        sed -nE 's/^[0-9-]+ [0-9:.]+\+0000: [0-9]+: (warning|error) : ([A-Za-z]+):[0-9]+ : /\1: \2: /p' \
            "$ART/S-$impl-$v-$d.stderr" | sed "s/^/$d stderr: /" >>"$f"
    done
    for pid in "${holders[@]}"; do kill_wait "$pid" 5; done
    kill_wait "$LOCKD_PID" 10; kill_wait "$LOGD_PID" 10
    LOCKD_PID= LOGD_PID=
}
daemon_gone() { ! kill -0 "$1" 2>/dev/null || [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == Z ]]; }
scenario_shutdown() {
    local impl v
    for impl in c11 ours; do
        use_impl $impl || { fail "S: cannot install $impl"; return 1; }
        for v in preserve plain; do shutdown_case $impl $v; done
    done
    for v in preserve plain; do
        log "S: C 11.3, daemon-shutdown $v: $(tr '\n' '|' <"$ART/shutdown-c11-$v.txt")"
        if diff -u "$ART/shutdown-c11-$v.txt" "$ART/shutdown-ours-$v.txt" >"$ART/shutdown-diff-$v.txt"; then
            pass "S: daemon-shutdown ($v) identical for ours and C 11.3 (replies, exit codes, exits, warnings)"
        else
            fail "S: daemon-shutdown ($v) differs from C 11.3 (-C +ours):"
            sed 's/^/    /' "$ART/shutdown-diff-$v.txt"
        fi
    done
}

# ------------------------------------------------------------------ scenarios
# F: a fresh start with ours installed as /usr/sbin/virtlogd and /usr/sbin/virtlockd.
scenario_fresh() {
    local out
    use_impl ours || { fail "F: cannot install ours"; return 1; }
    start_daemons F || return 1
    define_guests || return 1
    if out=$(virsh_ start g1 2>&1); then pass "F: virsh start g1 (ours)"; else fail "F: virsh start g1: $out"; return 1; fi
    check "F: g1.log has libvirtd 11.3's header" \
        wait_until 15 "header" grepq "$QLOG/g1.log" ": starting up libvirt version: 11."
    check "F: g1.log has the QEMU command line" wait_until 15 "cmdline" grepq "$QLOG/g1.log" "-name guest=g1,"
    check "F: g1's serial output reaches g1-serial.log and keeps coming" serial_grows g1
    check "F: QEMU's log pipes (stdio + serial) are drained by our virtlogd" \
        wait_until 10 "pipes" test "$(log_pipes g1)" -ge 2
    check "F: lease on the disk held by our virtlockd (POSIX WRITE byte 0, pid $LOCKD_PID)" \
        wait_until 10 "lease" lease_held
    g2_refused F
    admin_capture ours virtlogd
    admin_capture ours virtlockd
    # libvirtd 11.3 restarted under a running guest reconnects to it; suspend releases the
    # lease through our virtlockd, resume takes it again.
    kill_wait "$LIBVIRTD_PID" 20
    start_bg F-libvirtd2 /usr/sbin/libvirtd -f /etc/libvirt/libvirtd.conf; LIBVIRTD_PID=$BG_PID
    check "F: libvirtd restarted; g1 still running" wait_until 120 "libvirtd + g1" dom_is g1 running
    out=$(virsh_ suspend g1 2>&1) || fail "F: virsh suspend g1: $out"
    check "F: suspend released the lease" wait_until 10 "lease released" lease_free
    out=$(virsh_ resume g1 2>&1) || fail "F: virsh resume g1: $out"
    check "F: resume re-acquired it (our virtlockd, pid $LOCKD_PID)" wait_until 10 "lease" lease_held
    check "F: g1's serial log keeps growing" serial_grows g1
    reexec "F ours->ours" ours
    out=$(virsh_ destroy g1 2>&1) || fail "F: virsh destroy g1: $out"
    check "F: g1.log got 'shutting down, reason=destroyed'" \
        wait_until 10 "shutdown line" grepq "$QLOG/g1.log" "shutting down, reason=destroyed"
    check "F: lease released after destroy" wait_until 10 "lease released" lease_free
    if out=$(virsh_ start g2 2>&1); then pass "F: g2 starts once g1 is gone"; else fail "F: g2 cannot start: $out"; fi
    check "F: g2 holds the lease" wait_until 10 "lease" lease_held
    out=$(virsh_ destroy g2 2>&1) || fail "F: virsh destroy g2: $out"
    check "F: lease released after destroying g2" wait_until 10 "lease released" lease_free
    stop_daemons
}

# reexec TAG IMPL: install IMPL at /usr/sbin, SIGUSR1 both daemons, check g1 is unharmed.
reexec() {
    local tag=$1 want_logd want_lockd d
    use_impl "$2" || { fail "$tag: cannot install $2"; return 1; }
    want_logd=$(sha256sum <"$R/usr/sbin/virtlogd" | cut -d' ' -f1)
    want_lockd=$(sha256sum <"$R/usr/sbin/virtlockd" | cut -d' ' -f1)
    kill -USR1 "$LOGD_PID" "$LOCKD_PID"
    for d in "virtlogd $LOGD_PID $want_logd" "virtlockd $LOCKD_PID $want_lockd"; do
        set -- $d
        check "$tag: $1 re-executed in place (same pid $2, new image, state file consumed)" \
            wait_until 20 "$1 re-exec" reexec_done "$2" "$3" "$R/run/$1-restart-exec.json"
    done
    check "$tag: sockets still there" test -S "$R/run/libvirt/virtlogd-sock" -a -S "$R/run/libvirt/virtlockd-sock"
    check "$tag: g1 still running" dom_is g1 running
    check "$tag: QEMU's log pipes still drained by virtlogd (pid $LOGD_PID)" test "$(log_pipes g1)" -ge 2
    check "$tag: g1's serial log keeps growing" serial_grows g1
    check "$tag: lease still held by virtlockd (pid $LOCKD_PID)" lease_held
    g2_refused "$tag"
}
exe_sha() { sha256sum "/proc/$1/exe" 2>/dev/null | cut -d' ' -f1; }
reexec_done() { pid_alive "$1" && [[ $(exe_sha "$1") == "$2" ]] && [[ ! -e $3 ]]; }

# C: C 11.3 from a fresh start, its virt-admin outputs, then C -> ours -> C re-exec.
scenario_c11_reexec() {
    local out n_shut n_term
    use_impl c11 || { fail "C: cannot install C 11.3"; return 1; }
    start_daemons C || return 1
    if out=$(virsh_ start g1 2>&1); then pass "C: virsh start g1 (C 11.3)"; else fail "C: virsh start g1: $out"; return 1; fi
    check "C: lease held by C virtlockd" wait_until 10 "lease" lease_held
    check "C: g1's serial log grows" serial_grows g1
    g2_refused C
    admin_capture c11 virtlogd
    admin_capture c11 virtlockd
    admin_compare virtlogd
    admin_compare virtlockd
    n_shut=$(count "$QLOG/g1.log" "shutting down, reason=destroyed")
    n_term=$(count "$QLOG/g1.log" "terminating on signal 15")
    reexec "R C->ours" ours
    reexec "R ours->C" c11
    out=$(virsh_ destroy g1 2>&1) || fail "R: virsh destroy g1: $out"
    check "R: g1.log got a new 'shutting down, reason=destroyed' (AppendLogFile after two re-execs)" \
        wait_until 10 "shutdown line" test "$(count "$QLOG/g1.log" "shutting down, reason=destroyed")" -gt "$n_shut"
    check "R: QEMU's stderr ('terminating on signal 15') still reaches g1.log through the inherited pipe" \
        wait_until 10 "terminating line" test "$(count "$QLOG/g1.log" "terminating on signal 15")" -gt "$n_term"
    check "R: lease released after destroy" wait_until 10 "lease released" lease_free
    stop_daemons
}

# ------------------------------------------------------------------ admin setters
# A: virt-admin 11.3's setters and their error texts, on freshly started daemons (no
# libvirtd), C 11.3 vs ours, per command: output and exit code.
admin_set_commands() { # admin_set_commands DAEMON
    cat <<EOF
srv-threadpool-set $1 --min-workers 2 --max-workers 30
srv-threadpool-info $1
srv-threadpool-set $1 --min-workers 40 --max-workers 10
srv-threadpool-set $1 --prio-workers 3
srv-threadpool-info $1
srv-threadpool-set admin --max-workers 0
srv-threadpool-info admin
srv-threadpool-info nosuch
srv-clients-set $1 --max-clients 3000 --max-unauth-clients 10
srv-clients-info $1
srv-clients-set $1 --max-unauth-clients 5000
srv-clients-set $1 --max-clients 0
srv-clients-set nosuch --max-clients 5
srv-clients-info $1
client-disconnect $1 123456
client-info admin 123456
srv-update-tls $1
daemon-log-filters --filters "1:util 2:rpc"
daemon-log-filters
daemon-log-filters --filters "bogus"
daemon-log-outputs --outputs "3:stderr"
daemon-log-outputs
daemon-log-outputs --outputs "9:stderr"
daemon-log-filters --filters ""
daemon-log-filters
EOF
}
admin_set_run() { # admin_set_run IMPL
    local d c n out rc
    start_bg "A-$1-virtlogd" /usr/sbin/virtlogd -f /etc/libvirt/virtlogd.conf; LOGD_PID=$BG_PID
    start_bg "A-$1-virtlockd" /usr/sbin/virtlockd -f /etc/libvirt/virtlockd.conf; LOCKD_PID=$BG_PID
    wait_until 20 "sockets" socket_up virtlogd-admin-sock "$LOGD_PID" &&
        wait_until 20 "sockets" socket_up virtlockd-admin-sock "$LOCKD_PID" ||
        { fail "A($1): daemons did not start"; return 1; }
    for d in virtlogd virtlockd; do
        mkdir -p "$ART/A-$1-$d"; n=0
        while read -r c; do
            n=$((n + 1))
            out=$(eval "vadmin -c $d:///system $c" 2>&1); rc=$?
            printf '$ virt-admin %s\n%s\nrc=%s\n' "$c" "$out" "$rc" >"$ART/A-$1-$d/$(printf %02d $n).txt"
        done < <(admin_set_commands $d)
    done
    kill_wait "$LOCKD_PID" 10; kill_wait "$LOGD_PID" 10; LOCKD_PID= LOGD_PID=
}
scenario_admin_set() {
    local impl d f
    for impl in c11 ours; do
        use_impl $impl || { fail "A: cannot install $impl"; return 1; }
        admin_set_run $impl
    done
    for d in virtlogd virtlockd; do
        for f in "$ART/A-c11-$d"/*.txt; do
            if diff -u "$f" "$ART/A-ours-$d/${f##*/}" >"$ART/A-diff-$d-${f##*/}"; then
                pass "A: $d: '$(head -n1 "$f" | cut -c3-)' identical for ours and C 11.3 ($(sed -n 2p "$f" | cut -c1-90))"
            else
                fail "A: $d: '$(head -n1 "$f" | cut -c3-)' differs from C 11.3 (-C +ours):"
                sed 's/^/    /' "$ART/A-diff-$d-${f##*/}"
            fi
        done
    done
}

# ------------------------------------------------------------------ config + CLI
# V: C 11.3 and ours read the same config files (11.3 is stricter than 9.0 about
# unsigned keys and overflows) and print --version; the exit code and the error message
# must be identical. A file that loads starts the daemon with
# --timeout 1, so it exits on its own (no other daemon runs at this point).
CONFIG_CASES=(
    'virtlogd|max_size = 99999999999999999999'
    'virtlogd|\nmax_age_days = -1'
    'virtlogd|max_age_days = 4294967296'
    'virtlogd|max_age_days = "3"'
    'virtlogd|max_backups = -1'
    'virtlogd|max_size = -1'
    'virtlogd|log_root = 5'
    'virtlogd|max_clients = -5'
    'virtlogd|admin_max_workers = 99999999999'
    'virtlogd|log_level = 9'
    'virtlogd|max_age_days = 0\nlog_root = "/var/log/libvirt/"'
    'virtlockd|max_clients = -1'
    'virtlockd|unknown = 1\nsomething_else = 9223372036854775808'
    'virtlockd|max_age_days = -1'
    'virtlockd|admin_max_clients = 4294967296'
)
config_case() { # config_case IMPL N DAEMON TEXT: one line of results
    local out rc
    printf '%b\n' "$4" >"$R/root/vcase-$2.conf"
    out=$(timeout 20 chroot "$R" "${CENV[@]}" "/usr/sbin/$3" -f "/root/vcase-$2.conf" --timeout 1 2>&1 </dev/null)
    rc=$?
    printf 'rc=%s\n%s\n' "$rc" "$out" |
        sed -E -e 's/^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:.]+\+0000: [0-9]+: //' -e "s|/root/vcase-$2.conf|F|g" \
            >"$ART/V-$1-$2.raw"
    # The messages are compared, not their framing: C writes them through its log
    # outputs ("info : libvirt version" header, "error : main:LINE : " prefix) or
    # virErrorPrint ("libvirt:  error : "); ours prints the bare message (with "DAEMON: "
    # for the latter). That framing is a known difference, reported once below.
    sed -E -e '/^info : /d' -e 's/^error : [A-Za-z_]+:[0-9]+ : //' -e 's/^libvirt:  error : //' \
        -e 's/^virtlo(g|ck)d: //' "$ART/V-$1-$2.raw"
}
scenario_config() {
    local impl i c d
    for impl in c11 ours; do
        use_impl $impl || { fail "V: cannot install $impl"; return 1; }
        for i in "${!CONFIG_CASES[@]}"; do
            c=${CONFIG_CASES[$i]}
            config_case $impl "$i" "${c%%|*}" "${c#*|}" >"$ART/V-$impl-$i.txt"
        done
        for d in virtlogd virtlockd; do
            { rx /usr/sbin/$d --version 2>&1; echo "rc=$?"; } >"$ART/V-$impl-version-$d.txt"
            { rx /usr/sbin/$d --help 2>&1; echo "rc=$?"; } >"$ART/V-$impl-help-$d.txt"
        done
    done
    for i in "${!CONFIG_CASES[@]}"; do
        c=${CONFIG_CASES[$i]}
        if diff -u "$ART/V-c11-$i.txt" "$ART/V-ours-$i.txt" >"$ART/V-diff-$i.txt"; then
            pass "V: ${c%%|*} with '${c#*|}': same exit code and message as C 11.3 ($(head -c 120 "$ART/V-ours-$i.txt" | tr '\n' ' '))"
        else
            fail "V: ${c%%|*} with '${c#*|}' differs from C 11.3 (-C +ours):"
            sed 's/^/    /' "$ART/V-diff-$i.txt"
        fi
    done
    log "V: known difference, framing of start-up errors on stderr: C 11.3: $(grep -v '^rc=' "$ART/V-c11-0.raw" | tr '\n' '|') ours: $(grep -v '^rc=' "$ART/V-ours-0.raw" | tr '\n' '|')"
    for d in virtlogd virtlockd; do
        check "V: $d --version identical for ours and C 11.3 ($(head -n1 "$ART/V-ours-version-$d.txt"))" \
            cmp -s "$ART/V-c11-version-$d.txt" "$ART/V-ours-version-$d.txt"
        check "V: $d --help identical for ours and C 11.3" cmp -s "$ART/V-c11-help-$d.txt" "$ART/V-ours-help-$d.txt"
    done
}

# ------------------------------------------------------------------ log cleaner
# K: the same tree of aged files under a log_root, cleaned by C 11.3's virtlogd and by
# ours; the surviving trees must be identical. 11.3 first cleans 24 h after start (then
# every 24 h), so both daemons run under libfaketime: the fake clock (wall and
# monotonic) jumps 25 h ahead once the daemon is up and one log is open, and an admin
# call wakes the daemon's event loop so it sees the expired timer. File times are not
# faked (NO_FAKE_STAT): the ages below are real, so the daemon sees them 25 h older
# (edge.log, 2 days, is past max_age_days = 3 for it; new.log, 1 day, is not).
FAKETIME_LIB=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1
DAY=86400
# make_tree ROOT: files and their ages in days. max_age_days = 3, max_backups = 3.
make_tree() {
    local root=$1 now f age
    now=$(date +%s)
    mkdir -p "$root/qemu/sub" "$root/other"
    while read -r f age; do
        [[ -n $f ]] || continue
        printf 'x\n' >"$root/$f"
        touch -d "@$((now - age * DAY))" "$root/$f"
    done <<'EOF'
old.log 10
new.log 1
top.log.1 10
qemu/a.log 10
qemu/a.log.0 10
qemu/a.log.1 10
qemu/b.log 1
qemu/b.log.0 10
qemu/c.log.2 10
qemu/c.log.7 1
qemu/d.log.3 10
qemu/gap.log 10
qemu/gap.log.2 1
qemu/x.log 10
qemu/x.log.01 10
qemu/x.log.bak 10
qemu/notalog.txt 10
qemu/.log 10
qemu/big.log.99999999999 10
qemu/edge.log 2
qemu/young.log 0
qemu/open.log 10
qemu/sub/deep.log 10
other/target 10
EOF
    ln -s ../other/target "$root/qemu/link.log"
    mkdir -p "$root/qemu/dir.log"; touch -d "@$((now - 10 * DAY))" "$root/qemu/dir.log"
}
tree_of() { (cd "$1" && find . -mindepth 1 | LC_ALL=C sort); }
tree_settled() { # the tree did not change over the last second
    local a b; a=$(tree_of "$1"); sleep 1; b=$(tree_of "$1"); [[ $a == "$b" ]]
}
cleaner_run() { # cleaner_run TAG [SUFFIX]: log_root /var/log/vhclean-TAG (+ SUFFIX in the config)
    local tag=$1 root=/var/log/vhclean-$1 ft=/run/vh-faketime
    rm -rf "${R:?}$root"; make_tree "$R$root"
    cat >"$E/virtlogd-clean.conf" <<EOF
log_level = 3
log_outputs = "3:stderr"
max_backups = 3
max_age_days = 3
log_root = "$root${2:-}"
EOF
    echo "+0" >"$R$ft"
    rm -f "$R"/run/libvirt/virtlogd-sock
    start_bg "K-$tag-virtlogd" env LD_PRELOAD=$FAKETIME_LIB FAKETIME_TIMESTAMP_FILE=$ft \
        FAKETIME_NO_CACHE=1 NO_FAKE_STAT=1 /usr/sbin/virtlogd -f /etc/libvirt/virtlogd-clean.conf
    LOGD_PID=$BG_PID
    wait_until 20 "virtlogd socket" socket_up virtlogd-sock "$LOGD_PID" ||
        { fail "K($tag): virtlogd did not start"; return 1; }
    # An open log is never cleaned, however old: hold qemu/open.log open via OpenLogFile.
    chroot "$R" "${CENV[@]}" vhctl log-run --socket /run/libvirt/virtlogd-sock --path "$root/qemu/open.log" \
        --name open -- sleep 600 </dev/null >>"$ART/K-$tag-vhctl.stderr" 2>&1 &
    VHCTL_PID=$!
    wait_until 10 "open.log held" bash -c "find /proc/$LOGD_PID/fd -lname '*qemu/open.log' | grep -q ." ||
        { fail "K($tag): vhctl could not open qemu/open.log through virtlogd"; return 1; }
    touch -d "@$(($(date +%s) - 10 * DAY))" "$R$root/qemu/open.log"
    cp -a "$R$root" "$ART/K-tree-before" 2>/dev/null
    echo "+90000" >"$R$ft"               # 25 h later, for the daemon only
    vadmin -c virtlogd:///system srv-list >/dev/null 2>&1   # wake its event loop
    if wait_until 30 "the cleaner ran" test ! -e "$R$root/old.log"; then
        wait_until 20 "tree settles" tree_settled "$R$root"
        pass "K($tag): the cleaner ran (old.log is gone)"
    else
        fail "K($tag): the cleaner did not run within 30 s of the 25 h clock jump (old.log still there)"
    fi
    tree_of "$R$root" >"$ART/K-tree-$tag.txt"
    kill_wait "$VHCTL_PID" 5; VHCTL_PID=
    kill_wait "$LOGD_PID" 10; LOGD_PID=
}
scenario_cleaner() {
    [[ -e $R$FAKETIME_LIB ]] || { fail "K: libfaketime missing from the trixie root"; return 1; }
    use_impl c11 || { fail "K: cannot install C 11.3"; return 1; }
    cleaner_run c11
    use_impl ours || { fail "K: cannot install ours"; return 1; }
    cleaner_run ours
    log "K: surviving tree (C 11.3): $(tr '\n' ' ' <"$ART/K-tree-c11.txt")"
    if diff -u "$ART/K-tree-c11.txt" "$ART/K-tree-ours.txt" >"$ART/K-diff.txt"; then
        pass "K: the surviving trees are identical for ours and C 11.3 ($(wc -l <"$ART/K-tree-ours.txt") entries)"
    else
        fail "K: surviving trees differ (-C 11.3 +ours):"
        sed 's/^/    /' "$ART/K-diff.txt"
    fi
    # log_root with a trailing slash (as 11.3's own default "/var/log/libvirt/" has): C
    # builds the paths it walks as ROOT + "/" + name and compares them as strings with
    # the open logs' paths, so "ROOT//qemu/open" is not "ROOT/qemu/open" and C deletes
    # the open log. Ours compares canonical directories and keeps it (README, deliberate
    # differences from 11.3). Everything else must be the same.
    use_impl c11 && cleaner_run c11-slash / && use_impl ours && cleaner_run ours-slash / ||
        { fail "K/: cannot run"; return 1; }
    diff "$ART/K-tree-c11-slash.txt" "$ART/K-tree-ours-slash.txt" >"$ART/K-diff-slash.txt"
    check "K/: trailing-slash log_root: the only difference is the open log, which C 11.3 deletes and ours keeps ($(tr '\n' ' ' <"$ART/K-diff-slash.txt"))" \
        test "$(grep '^[<>]' "$ART/K-diff-slash.txt")" == "> ./qemu/open.log"
}

main() {
    local t0=$SECONDS v
    write_configs
    v=$(rx libvirtd --version 2>&1)
    log "peer: $v; $(rx qemu-system-x86_64 --version | head -n1); ours: $(rx $OURS/virtlogd --version 2>&1)"
    check "setup: the root runs libvirt 11.3 ($v)" grep -q 'libvirt) 11\.3\.' <<<"$v"
    scenario_fresh
    scenario_c11_reexec
    scenario_shutdown
    scenario_admin_set
    scenario_config
    scenario_cleaner
    echo "interop11 summary: $IT_PASS passed, $IT_FAIL failed ($((SECONDS - t0))s in namespace)"
    if ((IT_FAIL > 0)); then
        printf '  failed: %s\n' "${IT_FAILED_NAMES[@]}"
        return 1
    fi
}

main
