#!/usr/bin/env bash
# Interop harness: real libvirtd (Debian 12, libvirt 9.0.0) + QEMU against the
# virtlogd / virtlockd binaries given in VIRTLOGD_BIN / VIRTLOCKD_BIN.
#
#   VIRTLOGD_BIN=/path/virtlogd VIRTLOCKD_BIN=/path/virtlockd tests/interop/run.sh
#
# Must run as root.  The script re-executes itself inside fresh mount (+pid,
# +net when available) namespaces, so it never touches the host's /run,
# /etc/libvirt, /var/lib/libvirt, /var/log/libvirt or /var/cache/libvirt.
# Prints PASS/FAIL lines; exits 0 only if every check passed.
#
# Environment:
#   VIRTLOGD_BIN      default /usr/sbin/virtlogd
#   VIRTLOCKD_BIN     default /usr/sbin/virtlockd
#   LIBVIRTD_BIN      default /usr/sbin/libvirtd
#   VIRTLOGD_ARGS / VIRTLOCKD_ARGS  extra arguments (word-split), e.g. "-v"
#   INTEROP_TIMEOUT   hard wall-clock limit for the whole run, seconds (default 600)
#   INTEROP_KEEP=1    keep the work directory (logs, configs) even on success
#   INTEROP_DEBUG=1   debug-level logging for virtlogd/virtlockd
#   INTEROP_TMP       where to create the work directory (default ${TMPDIR:-/tmp})
#   INTEROP_REEXEC=1  also run scenario h: SIGUSR1 re-exec C->ours->C under a live guest
#   INTEROP_DEB=FILE  instead of a..h, scenario i: dpkg -i FILE, then dpkg -r, under a live
#                     guest and the C daemons (dpkg's database, /usr, /etc are overlays)
#   INTEROP_NO_PIDNS=1 do not use a pid namespace (debugging; cleanup then
#                     relies on the EXIT trap and a pid/exe check)
set -u -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

export VIRTLOGD_BIN=${VIRTLOGD_BIN:-/usr/sbin/virtlogd}
export VIRTLOCKD_BIN=${VIRTLOCKD_BIN:-/usr/sbin/virtlockd}
export LIBVIRTD_BIN=${LIBVIRTD_BIN:-/usr/sbin/libvirtd}

###############################################################################
# Outer part: preflight, create work dir, enter namespaces, report timing.
###############################################################################
if [[ -z ${INTEROP_INNER:-} ]]; then
    [[ $(id -u) == 0 ]] || die "must run as root (needs mount namespaces and system-mode daemons)"
    missing=()
    for b in unshare timeout virsh qemu-img qemu-system-x86_64 sha256sum stat awk mount; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    for b in "$VIRTLOGD_BIN" "$VIRTLOCKD_BIN" "$LIBVIRTD_BIN"; do
        [[ -x $b ]] || missing+=("$b")
    done
    if [[ -n ${INTEROP_DEB:-} ]]; then
        # The package swaps what runs from /usr/sbin: the daemons must start from there.
        [[ $VIRTLOGD_BIN == /usr/sbin/virtlogd && $VIRTLOCKD_BIN == /usr/sbin/virtlockd ]] ||
            die "INTEROP_DEB needs the C daemons at /usr/sbin (unset VIRTLOGD_BIN/VIRTLOCKD_BIN)"
        [[ -f $INTEROP_DEB ]] || die "INTEROP_DEB=$INTEROP_DEB: no such file (build it with packaging/deb.sh)"
        INTEROP_DEB=$(realpath "$INTEROP_DEB"); export INTEROP_DEB
        for b in dpkg dpkg-deb dpkg-divert tar cmp /usr/bin/python3; do
            command -v "$b" >/dev/null 2>&1 || missing+=("$b")
        done
    fi
    ((${#missing[@]} == 0)) || die "missing required programs: ${missing[*]} (run .ci/install-deps)"

    base=${INTEROP_TMP:-${TMPDIR:-/tmp}}
    case $base in /run|/run/*|/var/run|/var/run/*)
        die "INTEROP_TMP/TMPDIR must not be under /run (it is replaced by a tmpfs)";; esac
    WORK=$(mktemp -d "$base/virt-interop.XXXXXX") || die "mktemp failed"
    chmod 755 "$WORK"

    # Prefer mount+pid+net namespaces: with a pid namespace every process we
    # start dies with the namespace's init, even if our own cleanup is killed;
    # with a net namespace libvirt's network/nwfilter drivers cannot touch the
    # host's interfaces or firewall.
    ns=(-m --propagation private)
    nopidns=0
    if [[ -z ${INTEROP_NO_PIDNS:-} ]] && unshare -p -f --mount-proc true 2>/dev/null; then
        ns+=(-p -f --mount-proc)
        unshare --kill-child true 2>/dev/null && ns+=(--kill-child)
    else
        ns+=(-f); nopidns=1
        log "pid namespaces unavailable; relying on trap cleanup only"
    fi
    if unshare -n true 2>/dev/null; then ns+=(-n); else log "net namespaces unavailable"; fi

    log "work dir: $WORK"
    log "virtlogd:  $VIRTLOGD_BIN"
    log "virtlockd: $VIRTLOCKD_BIN"
    t0=$(date +%s.%N)
    timeout --kill-after=15 "${INTEROP_TIMEOUT:-600}" \
        unshare "${ns[@]}" -- env INTEROP_INNER=1 INTEROP_WORK="$WORK" bash "$HERE/run.sh"
    rc=$?
    t1=$(date +%s.%N)
    if [[ $rc == 124 || $rc == 137 ]]; then
        echo "FAIL harness: hit the global timeout of ${INTEROP_TIMEOUT:-600}s"
    fi
    # Without a pid namespace the recorded pids are host pids: make sure
    # nothing we started survives (check the executable to avoid pid reuse).
    # With a pid namespace they are namespace-local and already gone.
    if [[ $nopidns == 1 && -f $WORK/pids ]]; then
        while read -r p exe; do
            if [[ $(readlink "/proc/$p/exe" 2>/dev/null) == "$exe" ]]; then
                log "killing leftover pid $p ($exe)"; kill -KILL "$p" 2>/dev/null
            fi
        done <"$WORK/pids"
    fi
    printf 'interop: rc=%s elapsed=%ss\n' "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')"
    if [[ $rc == 0 && -z ${INTEROP_KEEP:-} ]]; then
        rm -rf "$WORK"
    else
        log "artifacts kept in $WORK"
    fi
    exit "$rc"
fi

###############################################################################
# Inner part: runs in the private namespaces.
###############################################################################
WORK=$INTEROP_WORK
ART=$WORK/artifacts          # daemon stderr etc. (outside the bind mounts)
mkdir -p "$ART"
QEMU_BIN=$(command -v qemu-system-x86_64)
export QEMU_BIN

VIRTLOGD_PID= VIRTLOCKD_PID= LIBVIRTD_PID=
CLEANED=

record_pid() { echo "$1 $(readlink -f "$2")" >>"$WORK/pids"; }

dump_logs() {
    local f
    echo "================ diagnostics ================"
    for f in "$ART"/*.stderr /var/log/libvirt/libvirtd.log /var/log/libvirt/qemu/*.log; do
        [[ -s $f ]] || continue
        echo "---------------- $f (last 150 lines) ----------------"
        tail -n 150 "$f"
    done
    echo "---------------- /proc/locks ----------------"
    cat /proc/locks
    echo "---------------- /var/lib/libvirt/lockd ----------------"
    ls -laR /var/lib/libvirt/lockd 2>&1 | head -n 40
    echo "---------------- processes ----------------"
    ps -eo pid,ppid,stat,etime,args 2>/dev/null | grep -Ev ' (ps|grep) ' | head -n 40
    echo "============================================="
}

cleanup() {
    local rc=$? d p
    [[ -n $CLEANED ]] && return
    CLEANED=1
    trap - EXIT INT TERM HUP
    if ((rc != 0 || IT_FAIL > 0)); then dump_logs >&2; fi
    # Keep copies of the interesting logs for post-mortem (work dir kept on failure).
    cp -a /var/log/libvirt "$ART/var-log-libvirt" 2>/dev/null || true
    if pid_alive "$LIBVIRTD_PID"; then
        for d in $(virsh_ list --name 2>/dev/null); do
            timeout 30 virsh -q -c "$VIRSH_URI" destroy "$d" >/dev/null 2>&1 || true
        done
    fi
    # Any QEMU libvirtd knew about but could not destroy.
    for p in /run/libvirt/qemu/*.pid; do
        [[ -f $p ]] || continue
        p=$(cat "$p" 2>/dev/null) || continue
        [[ $p =~ ^[0-9]+$ ]] && grep -qs qemu "/proc/$p/cmdline" && kill_wait "$p" 5
    done
    kill_wait "$LIBVIRTD_PID" 20
    kill_wait "$VIRTLOCKD_PID" 10
    kill_wait "$VIRTLOGD_PID" 10
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

# ------------------------------------------------------------------ filesystem
# For INTEROP_DEB: everything dpkg writes lands in overlays on a tmpfs (overlayfs does
# not take an upper dir on the container's own overlay root), so the host's dpkg
# database, /usr and /etc are untouched. Mounted before the libvirt bind mounts below,
# which then sit on top of the overlays.
setup_overlays() {
    local d n
    mkdir -p "$WORK/ov"
    mount -t tmpfs -o mode=0755 interop-ov "$WORK/ov" || die "cannot mount tmpfs on $WORK/ov"
    for d in /usr /etc /var/lib/dpkg /var/log /var/cache; do
        n=${d//\//_}
        mkdir -p "$WORK/ov/$n/up" "$WORK/ov/$n/wk"
        mount -t overlay overlay -o "lowerdir=$d,upperdir=$WORK/ov/$n/up,workdir=$WORK/ov/$n/wk" "$d" ||
            die "cannot mount an overlay on $d"
    done
}

setup_fs() {
    local d
    [[ -n ${INTEROP_DEB:-} ]] && setup_overlays
    mount -t tmpfs -o mode=0755,size=64m interop-run /run || die "cannot mount tmpfs on /run"
    mkdir -p /run/lock

    # /etc/libvirt: a copy of the host's (so we look like a normal install),
    # minus any persistent domains, networks and autostart links.
    mkdir -p "$WORK/etc-libvirt"
    [[ -d /etc/libvirt ]] && cp -a /etc/libvirt/. "$WORK/etc-libvirt/"
    rm -rf "$WORK/etc-libvirt/qemu" "$WORK/etc-libvirt/storage" "$WORK/etc-libvirt/secrets"
    mkdir -p "$WORK/etc-libvirt/qemu/networks/autostart"
    write_configs "$WORK/etc-libvirt"

    # Fresh versions of what the Debian packages ship under /var.
    mkdir -p "$WORK/var-lib-libvirt"/{boot,images,qemu/channel/target,sanlock} \
             "$WORK/var-log-libvirt"/{qemu,lxc} \
             "$WORK/var-cache-libvirt/qemu"
    chmod 0711 "$WORK/var-lib-libvirt/qemu" "$WORK/var-cache-libvirt/qemu" 2>/dev/null
    chmod 0700 "$WORK/var-log-libvirt"

    for d in etc-libvirt:/etc/libvirt var-lib-libvirt:/var/lib/libvirt \
             var-log-libvirt:/var/log/libvirt var-cache-libvirt:/var/cache/libvirt; do
        mkdir -p "${d#*:}"
        mount --bind "$WORK/${d%%:*}" "${d#*:}" || die "bind mount ${d#*:} failed"
    done
}

write_configs() {
    local etc=$1 lvl=3
    [[ -n ${INTEROP_DEBUG:-} ]] && lvl=1
    cat >"$etc/virtlogd.conf" <<EOF
# interop harness
log_level = $lvl
log_outputs = "$lvl:stderr"
EOF
    cat >"$etc/virtlockd.conf" <<EOF
# interop harness
log_level = $lvl
log_outputs = "$lvl:stderr"
EOF
    cat >"$etc/libvirtd.conf" <<'EOF'
# interop harness: local UNIX sockets only, no polkit
unix_sock_group = "root"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_filters = "1:locking 1:logging 1:qemu.qemu_process 3:qemu 3:util 4:object 4:json 4:event 4:rpc"
log_outputs = "2:file:/var/log/libvirt/libvirtd.log"
EOF
    cat >"$etc/qemu.conf" <<'EOF'
# interop harness
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
    cat >"$etc/qemu-lockd.conf" <<'EOF'
# interop harness
auto_disk_leases = 1
require_lease_for_disks = 1
file_lockspace_dir = "/var/lib/libvirt/lockd/files"
EOF
}

# ------------------------------------------------------------------ daemons
wait_libvirtd() {
    local timeout=$1 st
    local deadline=$(( $(date +%s) + timeout ))
    while :; do
        if ! pid_alive "$LIBVIRTD_PID" || [[ $(awk '{print $3}' "/proc/$LIBVIRTD_PID/stat" 2>/dev/null) == Z ]]; then
            wait "$LIBVIRTD_PID"; st=$?
            log "libvirtd (pid $LIBVIRTD_PID) exited with status $st during start-up"
            return 1
        fi
        timeout 10 virsh -q -c "$VIRSH_URI" version >/dev/null 2>&1 && return 0
        if (( $(date +%s) >= deadline )); then
            log "timed out after ${timeout}s waiting for libvirtd to answer"
            return 1
        fi
        sleep 0.2
    done
}

# wait_sock NAME SOCKET PID TIMEOUT: wait for SOCKET while PID lives.
wait_sock() {
    local name=$1 sock=$2 pid=$3 timeout=$4 st
    local deadline=$(( $(date +%s) + timeout ))
    while :; do
        if ! pid_alive "$pid" || [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]]; then
            wait "$pid"; st=$?
            log "$name (pid $pid) exited with status $st before creating $sock"
            return 1
        fi
        [[ -S $sock ]] && return 0
        if (( $(date +%s) >= deadline )); then
            log "timed out after ${timeout}s waiting for $name to create $sock"
            return 1
        fi
        sleep 0.1
    done
}

start_daemons() {
    # shellcheck disable=SC2086 # *_ARGS are deliberately word-split
    log "starting virtlogd: $VIRTLOGD_BIN -f /etc/libvirt/virtlogd.conf ${VIRTLOGD_ARGS:-}"
    # shellcheck disable=SC2086
    "$VIRTLOGD_BIN" -f /etc/libvirt/virtlogd.conf ${VIRTLOGD_ARGS:-} </dev/null >"$ART/virtlogd.stderr" 2>&1 &
    VIRTLOGD_PID=$!; record_pid "$VIRTLOGD_PID" "$VIRTLOGD_BIN"
    log "starting virtlockd: $VIRTLOCKD_BIN -f /etc/libvirt/virtlockd.conf ${VIRTLOCKD_ARGS:-}"
    # shellcheck disable=SC2086
    "$VIRTLOCKD_BIN" -f /etc/libvirt/virtlockd.conf ${VIRTLOCKD_ARGS:-} </dev/null >"$ART/virtlockd.stderr" 2>&1 &
    VIRTLOCKD_PID=$!; record_pid "$VIRTLOCKD_PID" "$VIRTLOCKD_BIN"

    if wait_sock virtlogd /run/libvirt/virtlogd-sock "$VIRTLOGD_PID" 20; then
        pass "daemon: virtlogd up (pid $VIRTLOGD_PID, /run/libvirt/virtlogd-sock)"
    else
        fail "daemon: virtlogd did not create /run/libvirt/virtlogd-sock"; return 1
    fi
    if wait_sock virtlockd /run/libvirt/virtlockd-sock "$VIRTLOCKD_PID" 20; then
        pass "daemon: virtlockd up (pid $VIRTLOCKD_PID, /run/libvirt/virtlockd-sock)"
    else
        fail "daemon: virtlockd did not create /run/libvirt/virtlockd-sock"; return 1
    fi
    local f
    for f in virtlogd virtlockd; do
        log "info: /run/$f.pid = $(cat /run/$f.pid 2>/dev/null || echo '<none>');" \
            "sockets: $(cd /run/libvirt && echo $f-*sock)"
    done

    log "starting libvirtd: $LIBVIRTD_BIN -f /etc/libvirt/libvirtd.conf"
    "$LIBVIRTD_BIN" -f /etc/libvirt/libvirtd.conf </dev/null >"$ART/libvirtd.stderr" 2>&1 &
    LIBVIRTD_PID=$!; record_pid "$LIBVIRTD_PID" "$LIBVIRTD_BIN"
    # First start probes QEMU capabilities (several seconds under TCG).
    if wait_libvirtd 120; then
        pass "daemon: libvirtd up (pid $LIBVIRTD_PID) with lock_manager=lockd"
    else
        fail "daemon: libvirtd did not come up"; return 1
    fi
}

# ------------------------------------------------------------------ scenarios
DISK=/var/lib/libvirt/images/interop-disk.qcow2
LOCKDIR=/var/lib/libvirt/lockd/files
LEASE=$LOCKDIR/$(printf '%s' "$DISK" | sha256sum | cut -d' ' -f1)
A=interop-a
B=interop-b
ALOG=/var/log/libvirt/qemu/$A.log
ASER=/var/log/libvirt/qemu/$A-serial.log
BLOG=/var/log/libvirt/qemu/$B.log

grepq() { grep -qsF -- "$2" "$1"; }
count() { grep -csF -- "$2" "$1" 2>/dev/null || true; }
lease_held() { [[ -e $LEASE ]] && has_byte0_write_lock "$LEASE" "$VIRTLOCKD_PID"; }
lease_free() { no_lock_by "$LEASE" "$VIRTLOCKD_PID"; }

define_guests() {
    make_boot_disk "$DISK" || { fail "setup: qemu-img could not create $DISK"; return 1; }
    domain_xml "$A" 6d0a8a2c-1c1e-4d2b-9f0e-000000000001 "$DISK" >"$WORK/$A.xml"
    domain_xml "$B" 6d0a8a2c-1c1e-4d2b-9f0e-000000000002 "$DISK" >"$WORK/$B.xml"
    if virsh_ define "$WORK/$A.xml" >/dev/null && virsh_ define "$WORK/$B.xml" >/dev/null; then
        pass "setup: defined $A and $B sharing $DISK"
    else
        fail "setup: virsh define failed"; return 1
    fi
}

scenario_a_start() {
    local out
    if out=$(virsh_ start "$A" 2>&1); then
        pass "a: virsh start $A"
    else
        fail "a: virsh start $A: $out"; return 1
    fi
    check "a: $A is running" wait_until 10 "$A running" dom_is "$A" running
    check "a: $A.log has libvirtd's 'starting up libvirt version' header" \
        wait_until 10 "header" grepq "$ALOG" ": starting up libvirt version: "
    check "a: $A.log has the environment/command line (LC_ALL=C, -name guest=$A)" \
        wait_until 10 "cmdline" bash -c "grep -qs '^LC_ALL=C ' '$ALOG' && grep -qsF -- '-name guest=$A,' '$ALOG'"
    check "a: $A-serial.log exists" wait_until 10 "serial log" test -e "$ASER"
    check "a: guest serial output reached $A-serial.log via virtlogd" \
        wait_until 60 "serial marker" grepq "$ASER" "$SERIAL_MARKER"
}

scenario_b_lease() {
    check "b: lease file $LEASE exists (sha256 of disk path)" test -e "$LEASE"
    if wait_until 10 "lease lock" lease_held; then
        pass "b: /proc/locks: POSIX WRITE lock on byte 0 of lease held by virtlockd (pid $VIRTLOCKD_PID)"
    else
        fail "b: no POSIX WRITE byte-0 lock by virtlockd on the lease"
        log "locks on lease: $(lock_lines "$LEASE")"
    fi
    local others
    others=$(find "$LOCKDIR" -type f ! -name "${LEASE##*/}" 2>/dev/null | wc -l)
    check "b: no unexpected extra lease files ($others)" test "$others" -eq 0
}

scenario_c_conflict() {
    local out
    # QEMU's own OFD image locking would refuse a second QEMU on the same
    # inode before libvirt ever asks virtlockd (locks are acquired only when
    # the CPUs start).  To exercise virtlockd, move A's image aside (A keeps
    # its open fd) and put a fresh image at the same path: B's QEMU opens it
    # fine, but the lease name (sha256 of the path string) is the same, so only
    # virtlockd can refuse B -- the situation lockd exists for (same path on
    # storage seen by two hosts).
    mv "$DISK" "$DISK.a-in-use" && make_boot_disk "$DISK" ||
        { fail "c: could not replace $DISK"; return 1; }
    if out=$(virsh_ start "$B" 2>&1); then
        fail "c: second guest $B started although $A holds the disk lease"
        virsh_ destroy "$B" >/dev/null 2>&1
        return 1
    fi
    log "c: virsh start $B said: $(echo "$out" | tr '\n' ' ')"
    if grep -qi "resource busy" <<<"$out" && grep -qi "${LEASE##*/}' is locked" <<<"$out"; then
        pass "c: $B refused with a lock error (resource busy: Lockspace resource '<sha256>' is locked)"
    else
        fail "c: $B failed but not with a 'resource busy' lock error: $out"
    fi
    check "c: $B is shut off" wait_until 15 "$B shut off" dom_is "$B" "shut off"
    check "c: $A still running" dom_is "$A" running
    check "c: lease still held by virtlockd after the refused start" lease_held
}

scenario_d_suspend() {
    local out
    out=$(virsh_ suspend "$A" 2>&1) || { fail "d: virsh suspend: $out"; return 1; }
    check "d: $A paused" wait_until 10 "$A paused" dom_is "$A" paused
    check "d: suspend released the lease (no virtlockd lock on it)" wait_until 10 "lease released" lease_free
    out=$(virsh_ resume "$A" 2>&1) || { fail "d: virsh resume: $out"; return 1; }
    check "d: $A running again" wait_until 10 "$A running" dom_is "$A" running
    check "d: resume re-acquired the lease (byte-0 WRITE lock by virtlockd)" wait_until 10 "lease held" lease_held
}

scenario_f_stderr_running() {
    # QEMU itself prints "char device redirected to /dev/pts/N (label charserial0)"
    # on its stderr for pty chardevs; it reaches the log only through virtlogd.
    check "f: QEMU stderr ('char device redirected to') reached $A.log" \
        wait_until 10 "qemu stderr" grepq "$ALOG" "char device redirected to /dev/pts/"
}

scenario_e_destroy() {
    local out
    out=$(virsh_ destroy "$A" 2>&1) || { fail "e: virsh destroy $A: $out"; return 1; }
    check "e: $A.log got 'shutting down, reason=destroyed'" \
        wait_until 10 "shutdown line" grepq "$ALOG" "shutting down, reason=destroyed"
    # QEMU prints "terminating on signal 15 from pid N (...libvirtd)" to stderr.
    check "f: QEMU stderr ('terminating on signal 15') reached $A.log" \
        wait_until 10 "terminating line" grepq "$ALOG" "terminating on signal 15"
    check "e: lease released after destroy" wait_until 10 "lease released" lease_free
    check "e: lease file removed after release" wait_until 10 "lease file gone" test ! -e "$LEASE"
    rm -f "$DISK.a-in-use"

    if out=$(virsh_ start "$B" 2>&1); then
        pass "e: $B starts once $A is gone"
    else
        fail "e: $B still cannot start after $A was destroyed: $out"; return 1
    fi
    check "e: $B holds the lease now" wait_until 10 "lease held" lease_held
    check "e: $B.log has a start-up header" wait_until 10 "B header" grepq "$BLOG" ": starting up libvirt version: "
    out=$(virsh_ destroy "$B" 2>&1) || fail "e: virsh destroy $B: $out"
    check "e: $B.log got 'shutting down, reason=destroyed'" \
        wait_until 10 "B shutdown" grepq "$BLOG" "shutting down, reason=destroyed"
    check "e: lease released after destroying $B" wait_until 10 "lease released" lease_free
}

scenario_g_truncate() {
    local out n_before
    # Leave something stale in the serial log; append='off' must truncate it.
    printf 'STALE-LINE-FROM-PREVIOUS-RUN\n' >>"$ASER"
    n_before=$(count "$ALOG" ": starting up libvirt version: ")
    if out=$(virsh_ start "$A" 2>&1); then
        pass "g: $A restarted"
    else
        fail "g: virsh start $A (second time): $out"; return 1
    fi
    check "g: serial output present after restart" wait_until 60 "serial marker" grepq "$ASER" "$SERIAL_MARKER"
    sleep 0.5
    check "g: $A-serial.log truncated on reopen (stale line gone)" \
        bash -c "! grep -qsF STALE-LINE-FROM-PREVIOUS-RUN '$ASER'"
    local n
    n=$(count "$ASER" "$SERIAL_MARKER")
    check "g: $A-serial.log holds exactly one boot's output (marker count $n)" test "$n" -eq 1
    # The stdio log is opened with flags 0 (no truncate): it keeps growing.
    n=$(count "$ALOG" ": starting up libvirt version: ")
    check "g: $A.log was appended, not truncated (headers: $n_before -> $n)" test "$n" -eq $((n_before + 1))
    check "g: lease held again" wait_until 10 "lease held" lease_held
    out=$(virsh_ destroy "$A" 2>&1) || fail "g: virsh destroy $A: $out"
    check "g: lease released" wait_until 10 "lease released" lease_free
}

# ------------------------------------------------------------------ h (INTEROP_REEXEC=1)
# Zero-downtime upgrade under a live guest: the daemons run from copies at
# P_LOGD/P_LOCKD (argv[0] = P), P is replaced (cp + mv) and SIGUSR1 makes the
# daemon execvp(argv[0]) the new binary, handing over its state via
# /run/<daemon>-restart-exec.json.  C -> ours, then ours -> C.
C_LOGD=/usr/sbin/virtlogd C_LOCKD=/usr/sbin/virtlockd
P_LOGD=$WORK/bin/virtlogd P_LOCKD=$WORK/bin/virtlockd

exe_sha() { sha256sum "/proc/$1/exe" 2>/dev/null | cut -d' ' -f1; }
file_sha() { sha256sum "$1" | cut -d' ' -f1; }
# install_at SRC DST: atomically replace DST (new inode) with a copy of SRC.
install_at() { cp "$1" "$2.tmp" && chmod 755 "$2.tmp" && mv -f "$2.tmp" "$2"; }
reexec_done() { # PID WANT_SHA STATEFILE
    pid_alive "$1" && [[ $(exe_sha "$1") == "$2" ]] && [[ ! -e $3 ]]
}

restart_daemons_from_copies() {
    log "h: restarting all daemons, virtlogd/virtlockd from copies of the C binaries at $WORK/bin"
    kill_wait "$LIBVIRTD_PID" 20
    kill_wait "$VIRTLOCKD_PID" 10
    kill_wait "$VIRTLOGD_PID" 10
    local f; for f in virtlogd virtlockd libvirtd; do
        mv "$ART/$f.stderr" "$ART/$f.main.stderr" 2>/dev/null; done
    mkdir -p "$WORK/bin"
    install_at "$C_LOGD" "$P_LOGD" && install_at "$C_LOCKD" "$P_LOCKD" ||
        { fail "h: could not copy the C daemons to $WORK/bin"; return 1; }
    VIRTLOGD_BIN=$P_LOGD VIRTLOCKD_BIN=$P_LOCKD start_daemons
}

# h_upgrade TAG LOGD_SRC LOCKD_SRC: replace P_* with *_SRC, SIGUSR1 both, verify.
h_upgrade() {
    local tag=$1 logd_src=$2 lockd_src=$3 out
    local logd_sha lockd_sha old_logd_ino old_lockd_ino
    logd_sha=$(file_sha "$logd_src") lockd_sha=$(file_sha "$lockd_src")
    old_logd_ino=$(stat -L -c %i "/proc/$VIRTLOGD_PID/exe") old_lockd_ino=$(stat -L -c %i "/proc/$VIRTLOCKD_PID/exe")
    install_at "$logd_src" "$P_LOGD" && install_at "$lockd_src" "$P_LOCKD" ||
        { fail "h($tag): could not replace the binaries at $WORK/bin"; return 1; }
    kill -USR1 "$VIRTLOGD_PID" "$VIRTLOCKD_PID"
    check "h($tag): virtlogd re-executed in place (pid $VIRTLOGD_PID, /proc/PID/exe = $logd_src, state file consumed)" \
        wait_until 20 "virtlogd re-exec" reexec_done "$VIRTLOGD_PID" "$logd_sha" /run/virtlogd-restart-exec.json
    check "h($tag): virtlockd re-executed in place (pid $VIRTLOCKD_PID, /proc/PID/exe = $lockd_src, state file consumed)" \
        wait_until 20 "virtlockd re-exec" reexec_done "$VIRTLOCKD_PID" "$lockd_sha" /run/virtlockd-restart-exec.json
    check "h($tag): exe inodes changed (virtlogd $old_logd_ino -> $(stat -L -c %i "/proc/$VIRTLOGD_PID/exe" 2>/dev/null), virtlockd $old_lockd_ino -> $(stat -L -c %i "/proc/$VIRTLOCKD_PID/exe" 2>/dev/null))" \
        test "$(stat -L -c %i "/proc/$VIRTLOGD_PID/exe")" != "$old_logd_ino" -a \
             "$(stat -L -c %i "/proc/$VIRTLOCKD_PID/exe")" != "$old_lockd_ino"
    check "h($tag): sockets still present" test -S /run/libvirt/virtlogd-sock -a -S /run/libvirt/virtlockd-sock
    check "h($tag): $A still running" dom_is "$A" running
    check "h($tag): lease still held by virtlockd (pid $VIRTLOCKD_PID) after re-exec" lease_held
    if out=$(virsh_ start "$B" 2>&1); then
        fail "h($tag): $B started although $A holds the disk lease"
        virsh_ destroy "$B" >/dev/null 2>&1
    elif grep -qi "resource busy" <<<"$out" && grep -qi "${LEASE##*/}' is locked" <<<"$out"; then
        pass "h($tag): $B refused by the re-executed virtlockd (resource busy ... is locked)"
    else
        fail "h($tag): $B failed but not with a lock error: $out"
    fi
    check "h($tag): $B is shut off" wait_until 15 "$B shut off" dom_is "$B" "shut off"
    check "h($tag): lease still held after the refused start" lease_held
}

scenario_h_reexec() {
    local out n_hdr n_term n_shut
    restart_daemons_from_copies || return 1
    check "h: daemons run from the copies (C binaries at $WORK/bin)" \
        test "$(exe_sha "$VIRTLOGD_PID")" == "$(file_sha "$C_LOGD")" -a \
             "$(exe_sha "$VIRTLOCKD_PID")" == "$(file_sha "$C_LOCKD")"
    n_hdr=$(count "$ALOG" ": starting up libvirt version: ")
    n_term=$(count "$ALOG" "terminating on signal 15")
    n_shut=$(count "$ALOG" "shutting down, reason=destroyed")
    if out=$(virsh_ start "$A" 2>&1); then pass "h: $A started under the C daemons"
    else fail "h: virsh start $A: $out"; return 1; fi
    check "h: $A.log got a new header" \
        wait_until 10 "header" more_than "$ALOG" ": starting up libvirt version: " "$n_hdr"
    check "h: lease held by the C virtlockd" wait_until 10 "lease held" lease_held
    # Image swap as in c: B gets a fresh image at the same path.
    mv "$DISK" "$DISK.a-in-use" && make_boot_disk "$DISK" ||
        { fail "h: could not replace $DISK"; return 1; }

    h_upgrade "C->ours" "$VIRTLOGD_BIN" "$VIRTLOCKD_BIN"
    h_upgrade "ours->C" "$C_LOGD" "$C_LOCKD"

    out=$(virsh_ destroy "$A" 2>&1) || { fail "h: virsh destroy $A: $out"; return 1; }
    check "h: $A.log got a new 'shutting down, reason=destroyed' after two re-execs" \
        wait_until 10 "shutdown line" more_than "$ALOG" "shutting down, reason=destroyed" "$n_shut"
    check "h: QEMU stderr ('terminating on signal 15') still reached $A.log through the inherited pipe" \
        wait_until 10 "terminating line" more_than "$ALOG" "terminating on signal 15" "$n_term"
    check "h: lease released after destroy" wait_until 10 "lease released" lease_free
    check "h: lease file removed" wait_until 10 "lease file gone" test ! -e "$LEASE"
    rm -f "$DISK.a-in-use"
    if out=$(virsh_ start "$B" 2>&1); then pass "h: $B starts once $A is gone"
    else fail "h: $B cannot start after $A was destroyed: $out"; return 1; fi
    check "h: $B holds the lease" wait_until 10 "lease held" lease_held
    out=$(virsh_ destroy "$B" 2>&1) || fail "h: virsh destroy $B: $out"
    check "h: lease released after destroying $B" wait_until 10 "lease released" lease_free
}

# ------------------------------------------------------------------ i (INTEROP_DEB=FILE)
# The Debian package under a live guest: dpkg -i diverts libvirt's daemons and its
# postinst re-executes the running ones (started from /usr/sbin) into ours in place;
# dpkg -r puts libvirt's back and re-executes into them. Each time: same pids, the new
# binary in /proc/PID/exe, the guest running, its lease held and excluding others, and
# fresh guest output (serial and QEMU stderr) reaching the logs through the kept fds.
REF=$WORK/deb-ref

# more_than FILE STRING N: FILE has more than N lines with STRING (re-counted on each poll).
more_than() { (( $(count "$1" "$2") > $3 )); }

# lease_probe: a direct fcntl(F_SETLK) write lock on the lease file must be refused.
lease_probe() {
    /usr/bin/python3 - "$LEASE" <<'PY'
import errno, fcntl, sys
with open(sys.argv[1], "r+") as f:
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        sys.exit(0 if e.errno in (errno.EAGAIN, errno.EACCES) else 3)
sys.exit(1)
PY
}

# i_alive TAG LOGD_REF LOCKD_REF: the daemons run these binaries and nothing was lost.
i_alive() {
    local tag=$1 logd_ref=$2 lockd_ref=$3 out n
    check "i($tag): virtlogd is the same pid ($VIRTLOGD_PID, /run/virtlogd.pid) running $logd_ref" \
        bash -c "kill -0 $VIRTLOGD_PID && [[ \$(cat /run/virtlogd.pid) == $VIRTLOGD_PID ]] && cmp -s /proc/$VIRTLOGD_PID/exe '$logd_ref'"
    check "i($tag): virtlockd is the same pid ($VIRTLOCKD_PID, /run/virtlockd.pid) running $lockd_ref" \
        bash -c "kill -0 $VIRTLOCKD_PID && [[ \$(cat /run/virtlockd.pid) == $VIRTLOCKD_PID ]] && cmp -s /proc/$VIRTLOCKD_PID/exe '$lockd_ref'"
    check "i($tag): sockets still present" test -S /run/libvirt/virtlogd-sock -a -S /run/libvirt/virtlockd-sock
    check "i($tag): $A still running" dom_is "$A" running
    check "i($tag): lease still held by virtlockd (pid $VIRTLOCKD_PID) in /proc/locks" lease_held
    check "i($tag): a direct fcntl write lock on the lease file is refused" lease_probe
    if out=$(virsh_ start "$B" 2>&1); then
        fail "i($tag): $B started although $A holds the disk lease"
        virsh_ destroy "$B" >/dev/null 2>&1
    elif grep -qi "resource busy" <<<"$out" && grep -qi "${LEASE##*/}' is locked" <<<"$out"; then
        pass "i($tag): $B refused with the lock error (resource busy ... is locked)"
    else
        fail "i($tag): $B failed but not with a lock error: $out"
    fi
    check "i($tag): $B is shut off" wait_until 15 "$B shut off" dom_is "$B" "shut off"
    check "i($tag): lease still held after the refused start" lease_held
    # New output on both of QEMU's log fds: a reset reboots the guest, whose MBR writes
    # the marker to COM1 again (serial chardev -> virtlogd), and the traced reset
    # is printed on QEMU's stderr (the stdio pipe to virtlogd).
    n=$(count "$ASER" "$SERIAL_MARKER")
    local nt; nt=$(count "$ALOG" "guest_cpu_reset")
    out=$(virsh_ qemu-monitor-command "$A" --hmp 'trace-event guest_cpu_reset on' 2>&1) ||
        fail "i($tag): enabling a QEMU trace event: $out"
    out=$(virsh_ reset "$A" 2>&1) || fail "i($tag): virsh reset $A: $out"
    check "i($tag): new guest serial output reached $A-serial.log (marker count $n -> more)" \
        wait_until 60 "serial marker" more_than "$ASER" "$SERIAL_MARKER" "$n"
    check "i($tag): new QEMU stderr output (traced reset) reached $A.log" \
        wait_until 20 "trace line" more_than "$ALOG" "guest_cpu_reset" "$nt"
    check "i($tag): $A still running after the reset" dom_is "$A" running
}

scenario_i_deb() {
    local out n_shut n_term
    mkdir -p "$REF/c" || return 1
    cp /usr/sbin/virtlogd /usr/sbin/virtlockd "$REF/c/" &&
        dpkg-deb --fsys-tarfile "$INTEROP_DEB" | tar -x -C "$REF" ./usr/sbin/virtlogd ./usr/sbin/virtlockd ||
        { fail "i: could not keep reference copies of the C and packaged daemons"; return 1; }
    if cmp -s "$REF/c/virtlogd" "$REF/usr/sbin/virtlogd"; then
        fail "i: /usr/sbin/virtlogd already is the packaged one (is virt-helpers installed on the host?)"
        return 1
    fi
    # libvirt turns a reset into a shutdown when on_reboot is destroy; the reset that
    # makes the guest write again needs restart.
    sed 's|<on_reboot>destroy</on_reboot>|<on_reboot>restart</on_reboot>|' "$WORK/$A.xml" >"$WORK/$A-i.xml"
    out=$(virsh_ define "$WORK/$A-i.xml" 2>&1) || { fail "i: virsh define $A (on_reboot restart): $out"; return 1; }
    scenario_a_start || return 1
    scenario_b_lease
    scenario_c_conflict    # leaves a fresh image at $DISK for $B's refused starts
    n_shut=$(count "$ALOG" "shutting down, reason=destroyed")
    n_term=$(count "$ALOG" "terminating on signal 15")
    i_alive "C" "$REF/c/virtlogd" "$REF/c/virtlockd"

    log "i: dpkg -i $INTEROP_DEB"
    if dpkg -i "$INTEROP_DEB" >"$ART/dpkg-install.out" 2>&1; then
        pass "i(install): dpkg -i $(basename "$INTEROP_DEB")"
    else
        fail "i(install): dpkg -i failed: $(tail -n 20 "$ART/dpkg-install.out")"; return 1
    fi
    sed 's/^/  dpkg -i: /' "$ART/dpkg-install.out" >&2
    check "i(install): dpkg-divert lists the 4 diversions of virt-helpers" \
        test "$(dpkg-divert --list virt-helpers | wc -l)" -eq 4
    check "i(install): libvirt's daemons diverted to /usr/sbin/*.libvirt" \
        bash -c "cmp -s /usr/sbin/virtlogd.libvirt '$REF/c/virtlogd' && cmp -s /usr/sbin/virtlockd.libvirt '$REF/c/virtlockd'"
    check "i(install): /usr/sbin/virtlogd and /usr/sbin/virtlockd are ours" \
        bash -c "cmp -s /usr/sbin/virtlogd '$REF/usr/sbin/virtlogd' && cmp -s /usr/sbin/virtlockd '$REF/usr/sbin/virtlockd'"
    check "i(install): postinst re-executed both running daemons" \
        bash -c "grep -q 'virtlogd (pid $VIRTLOGD_PID) re-executed' '$ART/dpkg-install.out' &&
                 grep -q 'virtlockd (pid $VIRTLOCKD_PID) re-executed' '$ART/dpkg-install.out'"
    i_alive "installed" "$REF/usr/sbin/virtlogd" "$REF/usr/sbin/virtlockd"

    log "i: dpkg -r virt-helpers"
    if dpkg -r virt-helpers >"$ART/dpkg-remove.out" 2>&1; then
        pass "i(remove): dpkg -r virt-helpers"
    else
        fail "i(remove): dpkg -r failed: $(tail -n 20 "$ART/dpkg-remove.out")"; return 1
    fi
    sed 's/^/  dpkg -r: /' "$ART/dpkg-remove.out" >&2
    check "i(remove): no diversions left" test -z "$(dpkg-divert --list virt-helpers)"
    check "i(remove): libvirt's daemons are back at /usr/sbin, no *.libvirt left" \
        bash -c "cmp -s /usr/sbin/virtlogd '$REF/c/virtlogd' && cmp -s /usr/sbin/virtlockd '$REF/c/virtlockd' &&
                 [[ ! -e /usr/sbin/virtlogd.libvirt && ! -e /usr/sbin/virtlockd.libvirt ]]"
    check "i(remove): postrm re-executed both running daemons" \
        bash -c "grep -q 'virtlogd (pid $VIRTLOGD_PID) re-executed' '$ART/dpkg-remove.out' &&
                 grep -q 'virtlockd (pid $VIRTLOCKD_PID) re-executed' '$ART/dpkg-remove.out'"
    i_alive "removed" "$REF/c/virtlogd" "$REF/c/virtlockd"

    # The end of the guest, through the fds that lived through both swaps.
    out=$(virsh_ destroy "$A" 2>&1) || { fail "i: virsh destroy $A: $out"; return 1; }
    check "i: $A.log got a new 'shutting down, reason=destroyed'" \
        wait_until 10 "shutdown line" more_than "$ALOG" "shutting down, reason=destroyed" "$n_shut"
    check "i: QEMU stderr ('terminating on signal 15') reached $A.log through the kept pipe" \
        wait_until 10 "terminating line" more_than "$ALOG" "terminating on signal 15" "$n_term"
    check "i: lease released after destroy" wait_until 10 "lease released" lease_free
    check "i: lease file removed" wait_until 10 "lease file gone" test ! -e "$LEASE"
    rm -f "$DISK.a-in-use"
    if out=$(virsh_ start "$B" 2>&1); then pass "i: $B starts once $A is gone"
    else fail "i: $B cannot start after $A was destroyed: $out"; return 1; fi
    check "i: $B holds the lease" wait_until 10 "lease held" lease_held
    out=$(virsh_ destroy "$B" 2>&1) || fail "i: virsh destroy $B: $out"
    check "i: lease released after destroying $B" wait_until 10 "lease released" lease_free
}

info_admin() {
    # libvirtd never talks to the admin sockets; this is informational only.
    local u out
    for u in virtlogd:///system virtlockd:///system; do
        if out=$(timeout 10 virt-admin -c "$u" srv-list 2>&1); then
            log "info: virt-admin -c $u srv-list: $(echo "$out" | tr -s ' \n' ' ')"
        else
            log "info: virt-admin -c $u failed: $(echo "$out" | head -n1)"
        fi
    done
}

main() {
    local t0=$SECONDS
    setup_fs
    log "namespaces ready (pid $$)"
    if [[ -n ${INTEROP_DEB:-} ]]; then
        start_daemons && define_guests && scenario_i_deb
    elif start_daemons && define_guests; then
        if scenario_a_start; then
            scenario_b_lease
            scenario_c_conflict
            scenario_d_suspend
            scenario_f_stderr_running
            scenario_e_destroy
            scenario_g_truncate
        fi
        info_admin
        if [[ ${INTEROP_REEXEC:-} == 1 ]] && ((IT_FAIL == 0)); then
            scenario_h_reexec
        fi
    fi
    if ((IT_FAIL == 0)); then
        check "daemons: virtlogd still alive at the end" pid_alive "$VIRTLOGD_PID"
        check "daemons: virtlockd still alive at the end" pid_alive "$VIRTLOCKD_PID"
        check "daemons: libvirtd still alive at the end" pid_alive "$LIBVIRTD_PID"
    fi
    echo "interop summary: $IT_PASS passed, $IT_FAIL failed ($((SECONDS - t0))s in namespace)"
    if ((IT_FAIL > 0)); then
        printf '  failed: %s\n' "${IT_FAILED_NAMES[@]}"
        return 1
    fi
    return 0
}

main
