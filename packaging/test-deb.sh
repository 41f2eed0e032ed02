#!/usr/bin/env bash
# The package's install/remove cycle under live daemons, without touching the host:
# a private mount namespace with overlays over /usr, /etc, /var/lib/dpkg, /var/log and
# /var/cache (dpkg's changes land in a tmpfs) and a fresh /run. In it, libvirt's C
# virtlogd and virtlockd run as system daemons, and a fake guest holds a log pipe
# (vhctl log-run around `cat` of a FIFO, so the test decides when it writes a line) and
# a disk lease (vhctl lease around `sleep`). Then:
#   dpkg -i: libvirt's binaries and man pages are diverted, ours installed, both
#            daemons re-execute into ours in the same pid; the guest's next line
#            reaches the log and the lease still excludes others; `vhctl status`
#            (ours only) lists the log and the lease;
#   dpkg -r: libvirt's files are back, both daemons re-execute into them, same checks.
# Finally the log holds every line once, in order. A full guest (libvirtd + QEMU) is
# what tests/interop does for the C<->ours re-exec; here the point is the package.
#
# usage: packaging/test-deb.sh DEB    (root; libvirt-daemon must be installed)
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { printf 'test-deb: FAIL: %s\n' "$*" >&2; exit 1; }
say() { printf 'test-deb: %s\n' "$*"; }

deb=$(realpath "${1:?usage: test-deb.sh DEB}")
[[ $(id -u) == 0 ]] || fail "needs root (mount namespace, dpkg)"
vhctl=$PWD/target/${VH_DEB_PROFILE:-debug}/vhctl
[[ -x $vhctl ]] || fail "$vhctl is not built"
for c in dpkg dpkg-divert unshare mkfifo cmp; do
    command -v "$c" >/dev/null || fail "$c not found"
done
dpkg -s libvirt-daemon >/dev/null 2>&1 || fail "libvirt-daemon (the C daemons) is not installed"

if [[ ${VH_DEB_IN_NS:-} != 1 ]]; then
    work=$(mktemp -d /tmp/vh-deb-test.XXXXXX)
    rc=0
    VH_DEB_IN_NS=1 VH_DEB_WORK=$work unshare -m --propagation private "$0" "$deb" || rc=$?
    # The namespace (its mounts and tmpfs) went with the script; processes it started
    # were killed by its exit trap.
    rm -rf "$work"
    exit $rc
fi

work=$VH_DEB_WORK
pids=()
cleanup() {
    exec 3>&- 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for n in virtlogd virtlockd; do
        [[ -r /run/$n.pid ]] && kill -9 "$(cat /run/$n.pid)" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# --- an isolated root: overlays for what dpkg writes, a fresh /run ---------------
mount -t tmpfs tmpfs "$work"
for d in /usr /etc /var/lib/dpkg /var/log /var/cache; do
    n=${d//\//_}
    mkdir -p "$work/ov/$n/up" "$work/ov/$n/wk"
    mount -t overlay overlay -o "lowerdir=$d,upperdir=$work/ov/$n/up,workdir=$work/ov/$n/wk" "$d"
done
mount -t tmpfs tmpfs /run
mkdir -p /run/libvirt /var/log/libvirt
cp /usr/sbin/virtlogd "$work/c-virtlogd"
# Ours as packaged (a release package's binaries are stripped).
ours_logd=$work/ours-virtlogd
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/sbin/virtlogd >"$ours_logd"
cp /usr/sbin/virtlockd "$work/c-virtlockd"

# --- libvirt's C daemons, as systemd would run them (no -d) ----------------------
for n in virtlogd virtlockd; do
    /usr/sbin/$n </dev/null >"$work/$n.out" 2>&1 &
done
for i in $(seq 200); do
    [[ -S /run/libvirt/virtlogd-sock && -S /run/libvirt/virtlockd-sock &&
        -s /run/virtlogd.pid && -s /run/virtlockd.pid ]] && break
    sleep 0.05
done
[[ -S /run/libvirt/virtlockd-sock && -s /run/virtlockd.pid ]] || fail "C daemons did not start: $(cat "$work"/*.out)"
logd_pid=$(cat /run/virtlogd.pid)
lockd_pid=$(cat /run/virtlockd.pid)
say "C virtlogd pid $logd_pid, C virtlockd pid $lockd_pid"

# --- the fake guest: a log pipe and a lease ---------------------------------------
log=$work/guest.log
disk=$work/disk.img
: >"$disk"
mkfifo "$work/ctl"
"$vhctl" log-run --system --path "$log" --name guest -- cat "$work/ctl" &
pids+=($!)
exec 3>"$work/ctl"
# The command runs only once the lease is held: it says so, then sleeps.
"$vhctl" lease --system --disk "$disk" --name guest -- sh -c ": >'$work/leased'; exec sleep 3600" &
pids+=($!)

line() {
    echo "$1" >&3
    for i in $(seq 200); do
        grep -qx "$1" "$log" 2>/dev/null && return 0
        sleep 0.05
    done
    fail "the guest's line '$1' did not reach $log"
}
lease_held() {
    local rc=0
    "$vhctl" lease --system --disk "$disk" --name other -- true 2>/dev/null || rc=$?
    [[ $rc == 2 ]] || fail "the guest's lease on $disk is not held (a second lease got exit $rc)"
}
runs() { # name pid binary
    [[ -d /proc/$2 ]] || fail "$1 (pid $2) is gone"
    cmp -s "/proc/$2/exe" "$3" || fail "$1 (pid $2) does not run $3"
}
for i in $(seq 200); do
    [[ -e $work/leased ]] && break
    sleep 0.05
done
[[ -e $work/leased ]] || fail "the guest did not get its lease"
line "line 1 under libvirt's daemons"
lease_held

# --- install: the swap ------------------------------------------------------------
say "dpkg -i $(basename "$deb")"
dpkg -i "$deb" | tee "$work/install.out"
grep -q "virtlogd (pid $logd_pid) re-executed into /usr/sbin/virtlogd" "$work/install.out" ||
    fail "postinst did not re-execute virtlogd"
grep -q "virtlockd (pid $lockd_pid) re-executed into /usr/sbin/virtlockd" "$work/install.out" ||
    fail "postinst did not re-execute virtlockd"
cmp -s /usr/sbin/virtlogd "$ours_logd" || fail "/usr/sbin/virtlogd is not ours"
cmp -s /usr/sbin/virtlogd.libvirt "$work/c-virtlogd" || fail "libvirt's virtlogd was not diverted"
cmp -s /usr/sbin/virtlockd.libvirt "$work/c-virtlockd" || fail "libvirt's virtlockd was not diverted"
[[ $(dpkg-divert --list virt-helpers | wc -l) == 4 ]] || fail "expected 4 diversions"
zcat /usr/share/man/man8/virtlogd.8.gz | grep -q virt-helpers || fail "virtlogd(8) is not ours"
[[ -x /usr/bin/vhctl ]] || fail "no /usr/bin/vhctl"
runs virtlogd "$logd_pid" /usr/sbin/virtlogd
runs virtlockd "$lockd_pid" /usr/sbin/virtlockd
line "line 2 under our daemons"
lease_held
status=$(/usr/bin/vhctl status --system)
grep -q "$log" <<<"$status" || fail "our virtlogd does not hold the guest's log: $status"
grep -q "$disk" <<<"$status" || fail "our virtlockd does not hold the guest's lease: $status"
/usr/bin/vhctl metrics --system | grep -q '^virtlockd_owners 1$' || fail "metrics: one lease owner expected"
say "swapped in place: same pids, pipe and lease kept"

# --- remove: back to libvirt's ----------------------------------------------------
say "dpkg -r virt-helpers"
dpkg -r virt-helpers | tee "$work/remove.out"
grep -q "virtlogd (pid $logd_pid) re-executed" "$work/remove.out" || fail "postrm did not re-execute virtlogd"
grep -q "virtlockd (pid $lockd_pid) re-executed" "$work/remove.out" || fail "postrm did not re-execute virtlockd"
cmp -s /usr/sbin/virtlogd "$work/c-virtlogd" || fail "libvirt's virtlogd is not back"
cmp -s /usr/sbin/virtlockd "$work/c-virtlockd" || fail "libvirt's virtlockd is not back"
[[ ! -e /usr/sbin/virtlogd.libvirt && ! -e /usr/bin/vhctl ]] || fail "leftovers after removal"
[[ -z $(dpkg-divert --list virt-helpers) ]] || fail "diversions left"
zcat /usr/share/man/man8/virtlogd.8.gz | grep -q virt-helpers && fail "virtlogd(8) is still ours"
runs virtlogd "$logd_pid" "$work/c-virtlogd"
runs virtlockd "$lockd_pid" "$work/c-virtlockd"
line "line 3 under libvirt's daemons again"
lease_held

expected=$'line 1 under libvirt\'s daemons\nline 2 under our daemons\nline 3 under libvirt\'s daemons again'
[[ $(cat "$log") == "$expected" ]] || fail "the log is not exactly the three lines: $(cat -A "$log")"
say "PASS: install and removal swapped both daemons live; the guest's log and lease survived both"
