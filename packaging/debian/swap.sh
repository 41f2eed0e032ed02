# Shared by the maintainer scripts (pasted in by packaging/deb.sh): the diversions
# that move libvirt's daemons aside, and the live re-exec of running daemons.

PKG=virt-helpers
# path -> where libvirt's file goes while ours is installed.
DIVERSIONS="
/usr/sbin/virtlogd /usr/sbin/virtlogd.libvirt
/usr/sbin/virtlockd /usr/sbin/virtlockd.libvirt
/usr/share/man/man8/virtlogd.8.gz /usr/share/man/man8/virtlogd.libvirt.8.gz
/usr/share/man/man8/virtlockd.8.gz /usr/share/man/man8/virtlockd.libvirt.8.gz
"

divert_add() {
    echo "$DIVERSIONS" | while read -r path to; do
        [ -n "$path" ] || continue
        dpkg-divert --package "$PKG" --add --rename --divert "$to" "$path" >/dev/null
    done
}

divert_remove() {
    echo "$DIVERSIONS" | while read -r path to; do
        [ -n "$path" ] || continue
        dpkg-divert --package "$PKG" --remove --rename --divert "$to" "$path" >/dev/null
    done
}

# Re-executes a running system daemon into whatever /usr/sbin/NAME is now, in the same
# pid: guests keep their log pipes and leases (the daemons hand them over through the
# re-exec state file, which both libvirt 9.0 and ours read). Through systemd when it
# manages the daemon (its ExecReload is SIGUSR1), else by SIGUSR1 to the PID file's pid.
reexec_daemon() {
    name=$1
    pidfile=/run/$name.pid
    [ -r "$pidfile" ] || return 0
    pid=$(cat "$pidfile" 2>/dev/null || true)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ] || return 0
    want=$(stat -Lc %d:%i "/usr/sbin/$name" 2>/dev/null) || return 0
    [ "$(stat -Lc %d:%i /proc/"$pid"/exe 2>/dev/null)" != "$want" ] || return 0
    if [ -d /run/systemd/system ] && systemctl is-active --quiet "$name.service" 2>/dev/null; then
        systemctl reload "$name.service"
    else
        kill -USR1 "$pid"
    fi
    i=0
    while [ $i -lt 100 ]; do
        if [ "$(stat -Lc %d:%i /proc/"$pid"/exe 2>/dev/null)" = "$want" ]; then
            echo "$PKG: $name (pid $pid) re-executed into /usr/sbin/$name"
            return 0
        fi
        sleep 0.1
        i=$((i + 1))
    done
    echo "$PKG: warning: $name (pid $pid) did not re-execute; it keeps running its previous binary (systemctl reload $name, or kill -USR1 $pid)" >&2
}
