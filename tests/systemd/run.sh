#!/usr/bin/env bash
# Our daemons under our units (systemd/) and a real systemd as PID 1 of a throw-away
# container: systemd-nspawn --volatile=yes boots the host's own /usr (Debian 12, systemd
# 252) and, when the trixie root of tests/interop11 is cached, Debian 13's /usr (systemd
# 257). The host runs no systemd and no D-Bus: systemctl talks to the container's
# manager through its private socket (nsenter), and the container is not registered.
#
# Checked in each container, through socket activation of the shipped units:
#   - Type=notify: the services reach active/running (so READY=1 arrived), also after
#     `systemctl reload` (SIGUSR1 re-exec in place, same MainPID);
#   - the hardening is in force on virtlogd (bounding set without CAP_KILL,
#     CAP_SYS_RESOURCE, CAP_SYS_ADMIN; seccomp filter on) and the soft NOFILE limit was
#     raised to the unit's hard limit (524288);
#   - busy pipes: a guest-like writer floods a log through vhctl; every byte arrives in
#     order. Once as the machine is (the pump enlarges a busy pipe up to pipe-max-size,
#     which needs no capability while uid 0 is under its pipe-buffer quota; the quota is
#     per uid and machine-wide, so this is only reported), once with uid 0 surely over
#     that quota (a helper on the host holds ~70 MiB of pipe capacity -- slots only, no
#     memory -- for a few seconds): without CAP_SYS_RESOURCE the kernel then refuses
#     F_SETPIPE_SZ with EPERM, and the pump must carry on at the pipe's size;
#   - the owner kill: a lock owner that
#     switched to another uid and dropped its restricted connection while holding a lease
#     is killed by virtlockd, which keeps CAP_KILL as 11.3's virtlockd.service does; with
#     a drop-in taking CAP_KILL away (as 11.3 does for virtlogd, which never kills) the kill
#     fails with EPERM, virtlockd says so and keeps serving;
#   - `virt-admin daemon-shutdown` (11.3's client; under systemd 252 too) ends a service
#     cleanly (Result=success) and the next
#     connection activates it again; `systemctl stop` ends both cleanly;
#   - rollback: the root's own C daemons (9.0 in Debian 12, 11.3 in Debian 13) under our
#     units still start (Type=notify), reload, drain a flood, kill (or, without
#     CAP_KILL, fail to kill) a lease owner, and stop.
#
#   VIRTLOGD_BIN=... VIRTLOCKD_BIN=... VHCTL_BIN=... tests/systemd/run.sh   (as root)
# Env: SYSTEMD_TEST_ROOTS (default: "/ <trixie root if cached>"), SYSTEMD_TEST_KEEP=1.
set -u -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=../interop/lib.sh
. "$HERE/../interop/lib.sh"
# shellcheck source=../interop11/chroot.sh
. "$HERE/../interop11/chroot.sh"

VIRTLOGD_BIN=${VIRTLOGD_BIN:-$REPO/target/debug/virtlogd}
VIRTLOCKD_BIN=${VIRTLOCKD_BIN:-$REPO/target/debug/virtlockd}
VHCTL_BIN=${VHCTL_BIN:-$REPO/target/debug/vhctl}

[[ $(id -u) == 0 ]] || die "must run as root"
for b in "$VIRTLOGD_BIN" "$VIRTLOCKD_BIN" "$VHCTL_BIN"; do [[ -x $b ]] || die "missing $b (cargo build first)"; done
if ! command -v systemd-nspawn >/dev/null 2>&1; then
    log "installing systemd-container (systemd-nspawn) from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd-container >&2 ||
        die "cannot install systemd-container"
fi
command -v python3 >/dev/null 2>&1 || die "python3 is required (pipe-quota helper)"

ROOTS=${SYSTEMD_TEST_ROOTS:-/}
if [[ -z ${SYSTEMD_TEST_ROOTS:-} && -f $CHROOT/.complete ]]; then ROOTS="/ $CHROOT"; fi

W=$(mktemp -d /tmp/vh-systemd.XXXXXX) || die "mktemp"
chmod 755 "$W"
OUTER= LEADER= HOG=
cleanup() {
    local rc=$?
    [[ -n $HOG ]] && kill "$HOG" 2>/dev/null
    stop_container
    if [[ $rc == 0 && $IT_FAIL == 0 && -z ${SYSTEMD_TEST_KEEP:-} ]]; then rm -rf "$W"; else log "artifacts kept in $W"; fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ container
mkdir -p "$W/units" "$W/bin" "$W/etc-libvirt"
cp "$REPO"/systemd/*.service "$REPO"/systemd/*.socket "$W/units/"
cat >"$W/units/vh-test.target" <<'EOF'
[Unit]
Description=virt-helpers: the shipped sockets, nothing else
Wants=virtlogd.socket virtlogd-admin.socket virtlockd.socket virtlockd-admin.socket
EOF
# The empty volatile /etc would make systemd-firstboot wait for a keypress.
ln -s /dev/null "$W/units/systemd-firstboot.service"
install -m 755 "$VIRTLOGD_BIN" "$W/bin/virtlogd"
install -m 755 "$VIRTLOCKD_BIN" "$W/bin/virtlockd"
install -m 755 "$VHCTL_BIN" "$W/bin/vhctl"
install -m 755 "$HERE/lockowner.py" "$W/bin/lockowner.py"
# Debug level for the pump's "pipe raised" / "cannot raise pipe size" lines; the files
# are on the shared directory, which the units' ProtectSystem=full leaves writable.
cat >"$W/etc-libvirt/virtlogd.conf" <<'EOF'
log_level = 1
log_outputs = "1:file:/vh/virtlogd.log"
EOF
cat >"$W/etc-libvirt/virtlockd.conf" <<'EOF'
log_level = 3
log_outputs = "3:file:/vh/virtlockd.log"
EOF

start_container() { # start_container ROOT TAG [c]: with c, the root's own (C) daemons
    local ours=(--bind-ro="$W/bin/virtlogd":/usr/sbin/virtlogd --bind-ro="$W/bin/virtlockd":/usr/sbin/virtlockd)
    [[ ${3:-} == c ]] && ours=()
    mkdir -p "$W/$2"
    chmod 777 "$W/$2"
    systemd-nspawn -D "$1" --volatile=yes --register=no --keep-unit -M "vhsd$$$2" \
        --bind="$W/$2":/vh --bind-ro="$W/bin":/opt/vh "${ours[@]}" \
        --bind-ro="$W/units":/etc/systemd/system --bind-ro="$W/etc-libvirt":/etc/libvirt \
        --console=read-only -b -- systemd.unit=vh-test.target systemd.firstboot=off >"$W/$2/boot.out" 2>&1 </dev/null &
    OUTER=$!
    wait_until 30 "container PID 1" bash -c "ps -o pid= --ppid $OUTER | grep -q ." || return 1
    LEADER=$(ps -o pid= --ppid "$OUTER" | tr -d ' ' | head -n1)
    wait_until 180 "vh-test.target" bash -c "nsenter -t $LEADER -m -p -- systemctl is-active -q vh-test.target 2>/dev/null"
}
stop_container() {
    [[ -n $OUTER ]] || return 0
    CX systemctl poweroff >/dev/null 2>&1
    wait_until 20 "container exit" bash -c "! kill -0 $OUTER 2>/dev/null" || kill -KILL "$LEADER" 2>/dev/null
    wait "$OUTER" 2>/dev/null
    OUTER= LEADER=
    rmdir /run/systemd/nspawn/propagate /run/systemd/nspawn 2>/dev/null
}
CX() { nsenter -t "$LEADER" -m -p -- "$@"; }
prop() { CX systemctl show -P "$2" "$1" 2>/dev/null; }
svc_running() { [[ $(prop "$1" ActiveState) == active && $(prop "$1" SubState) == running ]]; }
# cap_bit PID N: bit N of the process's bounding set (1 = kept)
cap_bit() {
    local bnd
    # awk runs on the host: the container's /usr/bin/awk is an alternatives link into
    # its empty /etc.
    bnd=$(CX cat "/proc/$1/status" | awk '/^CapBnd:/ { print $2 }')
    [[ -n $bnd ]] || return 2
    echo $(((16#$bnd >> $2) & 1))
}
CAP_KILL=5 CAP_SYS_ADMIN=21 CAP_SYS_RESOURCE=24
nofile_raised() { # nofile_raised SOFT/HARD UNIT_SOFT
    [[ $2 == 1024 && ${1%/*} == "${1#*/}" && ${1%/*} -gt 1024 ]]
}

# flood TAG NAME: vhctl writes 100000 numbered lines (1.4 MB) into a log through
# virtlogd in 1 MiB writes; the file must hold exactly those lines.
flood() {
    local tag=$1 name=$2
    CX mkdir -p /var/log/vh
    # dd writes 1 MiB at a time: each write fills the 64 KiB pipe at once, so the pump
    # finds it full (busy) whatever the machine's speed.
    if CX /opt/vh/vhctl log-run --system --path "/var/log/vh/$name.log" -- \
        sh -c "seq -f 'line %08g' 1 100000 | dd bs=1M iflag=fullblock status=none" \
        >"$W/$tag/$name.vhctl" 2>&1; then
        pass "$tag: vhctl flooded /var/log/vh/$name.log through virtlogd"
    else
        fail "$tag: vhctl log-run failed: $(head -c 300 "$W/$tag/$name.vhctl")"; return 1
    fi
    seq -f 'line %08g' 1 100000 >"$W/$tag/$name.want"
    CX cat "/var/log/vh/$name.log" >"$W/$tag/$name.got"
    check "$tag: every byte of the flood arrived in order ($name, $(stat -c %s "$W/$tag/$name.got") bytes)" \
        cmp -s "$W/$tag/$name.want" "$W/$tag/$name.got"
}

# The pipe-quota helper: holds pipes enlarged to 1 MiB (it has CAP_SYS_RESOURCE) until
# killed, so uid 0 is over fs.pipe-user-pages-soft and a capability-less root process
# can no longer enlarge a pipe. Only pipe slots are accounted, no memory is touched.
start_hog() {
    local soft
    soft=$(cat /proc/sys/fs/pipe-user-pages-soft)
    rm -f "$W/hog.ready"
    python3 - "$soft" "$W/hog.ready" <<'EOF' &
import fcntl, os, sys, time
soft, ready = int(sys.argv[1]), sys.argv[2]
F_SETPIPE_SZ = 1031
pipes = []
for _ in range(soft // 256 + 8):
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    pipes.append((r, w))
open(ready, "w").write(str(len(pipes)))
time.sleep(600)
EOF
    HOG=$!
    wait_until 10 "pipe hog" test -s "$W/hog.ready"
}

run_one() { # run_one ROOT TAG
    local root=$1 tag=$2 pid pid2 lim out owner
    if start_container "$root" "$tag"; then
        pass "$tag: systemd $(CX systemctl --version | awk 'NR == 1 { print $2 }') booted with our units; sockets listening"
    else
        fail "$tag: the container did not reach vh-test.target"; sed 's/^/    /' "$W/$tag/boot.out" | tail -n 30; return 1
    fi
    # virtlogd: activation by the first connection, Type=notify.
    out=$(CX timeout 30 virt-admin -c virtlogd:///system srv-list 2>&1) ||
        fail "$tag: virt-admin through the activated admin socket: $out"
    check "$tag: virtlogd.service active/running (Type=notify: READY=1 arrived)" \
        wait_until 30 "virtlogd running" svc_running virtlogd.service
    check "$tag: virtlogd.service is Type=notify" test "$(prop virtlogd.service Type)" == notify
    pid=$(prop virtlogd.service MainPID)
    check "$tag: virtlogd bounding set lacks CAP_KILL, CAP_SYS_RESOURCE, CAP_SYS_ADMIN" \
        test "$(cap_bit "$pid" $CAP_KILL)$(cap_bit "$pid" $CAP_SYS_RESOURCE)$(cap_bit "$pid" $CAP_SYS_ADMIN)" == 000
    check "$tag: virtlogd runs under a seccomp filter (SystemCallFilter)" \
        bash -c "nsenter -t $LEADER -m -p -- grep -q '^Seccomp:[[:space:]]*2' /proc/$pid/status"
    lim=$(CX cat "/proc/$pid/limits" | awk '/^Max open files/ { print $4 "/" $5 }')
    # systemd starts it with soft 1024 (LimitNOFILESoft); the hard limit is 524288 unless
    # the container's own hard limit is lower. The daemon must have raised soft to hard.
    check "$tag: virtlogd raised its soft NOFILE (unit: $(prop virtlogd.service LimitNOFILESoft)) to its hard limit (now soft/hard $lim)" \
        nofile_raised "$lim" "$(prop virtlogd.service LimitNOFILESoft)"
    # Busy pipes.
    flood "$tag" flood-enlarged
    # Informational: whether this pipe could be enlarged depends on how much pipe capacity
    # every uid-0 process of the machine holds (one quota per uid), not only on us.
    if grep -q "pipe raised to .*flood-enlarged.log" "$W/$tag/virtlogd.log"; then
        log "$tag: info: the pump enlarged the busy pipe to 1 MiB (pipe-max-size; no capability needed)"
    else
        log "$tag: info: uid 0 is already over its pipe quota on this machine: the pipe kept its size"
    fi
    if start_hog; then
        flood "$tag" flood-over-quota
        kill "$HOG" 2>/dev/null; wait "$HOG" 2>/dev/null; HOG=
        check "$tag: over the pipe quota without CAP_SYS_RESOURCE, F_SETPIPE_SZ was refused (EPERM) and the pump carried on" \
            grep -q "cannot raise pipe size: EPERM.*flood-over-quota.log" "$W/$tag/virtlogd.log"
    else
        fail "$tag: the pipe-quota helper did not start"
    fi
    check "$tag: virtlogd still active after the floods" svc_running virtlogd.service
    # Reload = SIGUSR1 re-exec in place; READY=1 again.
    CX systemctl reload virtlogd.service || fail "$tag: systemctl reload virtlogd failed"
    check "$tag: after reload (re-exec) virtlogd is active/running" wait_until 30 "virtlogd running" svc_running virtlogd.service
    pid2=$(prop virtlogd.service MainPID)
    check "$tag: reload kept the MainPID ($pid -> $pid2)" test "$pid" == "$pid2"
    flood "$tag" flood-after-reload
    # virtlockd.
    out=$(CX timeout 30 virt-admin -c virtlockd:///system srv-list 2>&1) ||
        fail "$tag: virt-admin through virtlockd's admin socket: $out"
    check "$tag: virtlockd.service active/running (Type=notify)" wait_until 30 "virtlockd running" svc_running virtlockd.service
    pid=$(prop virtlockd.service MainPID)
    lim=$(CX cat "/proc/$pid/limits" | awk '/^Max open files/ { print $4 "/" $5 }')
    # systemd starts it with soft 1024 (LimitNOFILESoft); the hard limit is 524288 unless
    # the container's own hard limit is lower. The daemon must have raised soft to hard.
    check "$tag: virtlockd raised its soft NOFILE (unit: $(prop virtlockd.service LimitNOFILESoft)) to its hard limit (now soft/hard $lim)" \
        nofile_raised "$lim" "$(prop virtlockd.service LimitNOFILESoft)"
    check "$tag: virtlockd keeps CAP_KILL (as 11.3's unit)" test "$(cap_bit "$pid" $CAP_KILL)" == 1
    owner_kill "$tag"
    admin_shutdown "$tag"
    # Stop.
    CX systemctl stop virtlogd.service virtlockd.service 2>/dev/null
    check "$tag: systemctl stop: virtlogd inactive, Result=success" \
        test "$(prop virtlogd.service ActiveState)/$(prop virtlogd.service Result)" == inactive/success
    check "$tag: systemctl stop: virtlockd inactive, Result=success" \
        test "$(prop virtlockd.service ActiveState)/$(prop virtlockd.service Result)" == inactive/success
    stop_container
}

# admin_shutdown TAG: virt-admin daemon-shutdown (11.3's admin procedure 20): the daemon
# quits by itself (STOPPING=1 first); systemd must record a clean exit, and the sockets,
# still listening, start it again on the next connection. Needs 11.3's virt-admin (the
# trixie root's); Debian 12's 9.0 client has no such command.
# Debian 12 container: 11.3's virt-admin from the cached trixie root (a private mount
# namespace gives it a /proc), reaching the container's socket through /proc/PID/root.
admin11() {
    unshare -m --propagation private sh -c 'mount -t proc proc "$0/proc" && exec chroot "$0" \
        env -i PATH=/usr/bin:/usr/sbin LANG=C.UTF-8 timeout 30 virt-admin "$@"' "$CHROOT" "$@"
}
admin_shutdown() {
    local tag=$1 d pid out va=(CX timeout 30 virt-admin)
    if ! CX virt-admin help daemon-shutdown >/dev/null 2>&1; then
        if [[ -f $CHROOT/.complete ]]; then
            va=(admin11)
        else
            log "$tag: info: no virt-admin 11.3 (run tests/interop11 first): daemon-shutdown not checked"
            return 0
        fi
    fi
    for d in virtlogd virtlockd; do
        pid=$(prop $d.service MainPID)
        if [[ ${va[0]} == admin11 ]]; then
            out=$(admin11 -c "$d:///system?socket=/proc/$LEADER/root/run/libvirt/$d-admin-sock" daemon-shutdown 2>&1)
        else
            out=$("${va[@]}" -c $d:///system daemon-shutdown 2>&1)
        fi
        log "$tag: virt-admin 11.3 -c $d:///system daemon-shutdown: $(tr '\n' ' ' <<<"$out")"
        if wait_until 30 "$d inactive" bash -c \
            "[[ \$(nsenter -t $LEADER -m -p -- systemctl show -P ActiveState $d.service)/\$(nsenter -t $LEADER -m -p -- systemctl show -P Result $d.service) == inactive/success ]]"; then
            pass "$tag: after virt-admin daemon-shutdown, $d.service is inactive with Result=success"
        else
            fail "$tag: after virt-admin daemon-shutdown, $d.service is $(prop $d.service ActiveState)/$(prop $d.service SubState), Result=$(prop $d.service Result), MainPID $(prop $d.service MainPID) (was $pid)"
            CX journalctl --no-pager -n 15 -u $d.service 2>&1 | sed 's/^/    /'
        fi
        CX timeout 30 virt-admin -c $d:///system srv-list >/dev/null 2>&1
        check "$tag: ... and the next connection activates it again (MainPID $pid -> $(prop $d.service MainPID))" \
            wait_until 30 "$d running" svc_running $d.service
    done
}

# owner_kill TAG: see the header.
owner_kill() {
    local tag=$1 owner
    CX python3 /opt/vh/lockowner.py /run/libvirt/virtlockd-sock /var/lib/vh-lockspace res1 65534 \
        >"$W/$tag/owner1.out" 2>&1 &
    wait_until 10 "owner dropped its connection" grep -q '^closing' "$W/$tag/owner1.out" ||
        { fail "$tag: lockowner.py: $(cat "$W/$tag/owner1.out")"; return 1; }
    owner=$(awk '/^closing/ { print $2 }' "$W/$tag/owner1.out")
    check "$tag: virtlockd killed the lease owner (uid 65534) that dropped its connection" \
        wait_until 10 "owner killed" bash -c "! nsenter -t $LEADER -m -p -- kill -0 $owner 2>/dev/null"
    # Without CAP_KILL (a drop-in, as 11.3 does for virtlogd only).
    CX mkdir -p /run/systemd/system/virtlockd.service.d
    printf '[Service]\nCapabilityBoundingSet=~CAP_KILL\n' | CX tee /run/systemd/system/virtlockd.service.d/no-kill.conf >/dev/null
    CX systemctl daemon-reload && CX systemctl restart virtlockd.service
    check "$tag: virtlockd restarted without CAP_KILL" bash -c \
        "[[ \$(nsenter -t $LEADER -m -p -- systemctl show -P MainPID virtlockd.service) != 0 ]]"
    CX python3 /opt/vh/lockowner.py /run/libvirt/virtlockd-sock /var/lib/vh-lockspace res2 65534 \
        >"$W/$tag/owner2.out" 2>&1 &
    wait_until 10 "owner dropped its connection" grep -q '^closing' "$W/$tag/owner2.out" ||
        { fail "$tag: lockowner.py (no CAP_KILL): $(cat "$W/$tag/owner2.out")"; return 1; }
    owner=$(awk '/^closing/ { print $2 }' "$W/$tag/owner2.out")
    check "$tag: without CAP_KILL the kill fails and virtlockd says so ('Failed to kill off pid $owner')" \
        wait_until 15 "kill failure logged" grep -q "Failed to kill off pid $owner" "$W/$tag/virtlockd.log"
    check "$tag: ... the owner survived (EPERM)" CX kill -0 "$owner"
    check "$tag: ... and virtlockd keeps serving" bash -c \
        "nsenter -t $LEADER -m -p -- timeout 10 virt-admin -c virtlockd:///system srv-list >/dev/null && nsenter -t $LEADER -m -p -- systemctl is-active -q virtlockd.service"
    CX kill -KILL "$owner" 2>/dev/null
    CX rm -f /run/systemd/system/virtlockd.service.d/no-kill.conf
    CX systemctl daemon-reload
}

# run_c ROOT TAG: the root's own C daemons under our units (binaries rolled back, units
# kept): Debian 12's 9.0 and Debian 13's 11.3 both send READY=1, so Type=notify holds;
# reload is their own SIGUSR1 re-exec. The owner kill with and without CAP_KILL shows
# what C does in the same spot.
run_c() {
    local root=$1 tag=$2 pid
    start_container "$root" "$tag" c || { fail "$tag: the container did not reach vh-test.target"; return 1; }
    CX timeout 30 virt-admin -c virtlogd:///system srv-list >/dev/null 2>&1
    CX timeout 30 virt-admin -c virtlockd:///system srv-list >/dev/null 2>&1
    check "$tag: C virtlogd under our unit: active/running (it sends READY=1)" \
        wait_until 30 "virtlogd running" svc_running virtlogd.service
    check "$tag: C virtlockd under our unit: active/running" \
        wait_until 30 "virtlockd running" svc_running virtlockd.service
    pid=$(prop virtlogd.service MainPID)
    CX systemctl reload virtlogd.service || fail "$tag: systemctl reload virtlogd failed"
    check "$tag: reload: still active/running with MainPID $pid" bash -c \
        "sleep 1; [[ \$(nsenter -t $LEADER -m -p -- systemctl show -P MainPID virtlogd.service) == $pid ]] && nsenter -t $LEADER -m -p -- systemctl is-active -q virtlogd.service"
    flood "$tag" flood-c
    owner_kill "$tag"
    # 9.0 has no admin procedure 20.
    [[ $tag == *c9.0 ]] || admin_shutdown "$tag"
    CX systemctl stop virtlogd.service virtlockd.service 2>/dev/null
    check "$tag: systemctl stop: both inactive, Result=success" \
        test "$(prop virtlogd.service Result)/$(prop virtlockd.service Result)" == success/success
    stop_container
}

t0=$SECONDS
for root in $ROOTS; do
    if [[ $root == / ]]; then
        run_one / debian12; run_c / debian12-c9.0
    else
        run_one "$root" debian13; run_c "$root" debian13-c11.3
    fi
done
echo "systemd summary: $IT_PASS passed, $IT_FAIL failed ($((SECONDS - t0))s)"
if ((IT_FAIL > 0)); then
    printf '  failed: %s\n' "${IT_FAILED_NAMES[@]}"
    exit 1
fi
