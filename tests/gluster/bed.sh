#!/usr/bin/env bash
# The GlusterFS bed: one volume, two client "hosts" with their own FUSE mounts, so that
# POSIX fcntl locks taken through one mount are seen (and refused) through the other,
# and a host's network link can be cut.
#
#   bed.sh up     build it (installs glusterfs-server/-client with apt if missing)
#   bed.sh down   tear everything down (idempotent; also run by `up` on failure)
#   bed.sh cut A|B / heal A|B   take a host's link down / up
#
# Layout (all under $VH_GLUSTER_DIR, default /tmp/vh-gluster):
#   network namespaces vhg-br (bridge), vhg-srv (glusterd + brick, 10.79.0.1),
#   vhg-A (client A, 10.79.0.2), vhg-B (client B, 10.79.0.3); the host's own network
#   namespace is untouched. mA/ and mB/ are the FUSE mounts of hosts A and B (mounted in
#   the host's mount namespace; their glusterfs client processes live in vhg-A / vhg-B,
#   so cutting A's link cuts mount A).
#
# Traps (found the hard way, see the commit history):
# * glusterd writes its state to /var/lib/glusterd, logs to /var/log/glusterfs and puts
#   its CLI socket in /run/gluster: it runs in a private mount namespace with those bound
#   to $W, and the gluster CLI runs inside glusterd's namespaces (nsenter), or it would
#   talk to / write into the host's.
# * performance.stat-prefetch and performance.open-behind must be off: with them a lease
#   file that one host just unlinked gives the other "Stale file handle".
# * The clients mount with --fopen-keep-cache=off: otherwise a host re-reading a small
#   file another host rewrote (a renewal heartbeat) may get its own stale page cache.
# * The lock-recovery time is how long the *brick* takes to notice a silent client: with
#   only network.ping-timeout 10 (the client's side) it took 42 s, the default
#   server.tcp-user-timeout. The bed sets network.ping-timeout, server/client
#   tcp-user-timeout (VH_GLUSTER_PING_TIMEOUT, default 10 s) and fast server keepalives:
#   the brick then drops a cut client's locks about 8-10 s after the cut. Fencing must
#   complete before that (see README, "Lease renewal and fencing across hosts").
set -euo pipefail
W=${VH_GLUSTER_DIR:-/tmp/vh-gluster}
PT=${VH_GLUSTER_PING_TIMEOUT:-10}
VOL=vhgv
SRV=10.79.0.1

say() { printf '[gluster-bed] %s\n' "$*" >&2; }
die() { printf '[gluster-bed] ERROR: %s\n' "$*" >&2; exit 1; }

down() {
    set +e
    # By /proc/mounts: mountpoint(1) fails on a dead FUSE mount (ENOTCONN).
    for m in mA mB; do
        grep -q " $W/$m fuse" /proc/mounts && umount -l "$W/$m"
    done
    for f in "$W/mA.pid" "$W/mB.pid"; do
        [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null
    done
    if [ -d "$W/run" ]; then
        while read -r f; do kill -KILL "$(cat "$f")" 2>/dev/null; done \
            < <(find "$W/run" -name '*.pid' 2>/dev/null)
    fi
    [ -f "$W/glusterd.pid" ] && kill -KILL "$(cat "$W/glusterd.pid")" 2>/dev/null
    # Anything still running in the server namespace (brick, self-heal daemon).
    for p in $(ip netns pids vhg-srv 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    for p in $(ip netns pids vhg-A 2>/dev/null) $(ip netns pids vhg-B 2>/dev/null); do
        kill -KILL "$p" 2>/dev/null
    done
    sleep 0.5
    for n in vhg-srv vhg-A vhg-B vhg-br; do ip netns del "$n" 2>/dev/null; done
    rm -rf "$W"
    set -e
}

install_if_missing() {
    command -v glusterd >/dev/null && command -v glusterfs >/dev/null && return 0
    say "installing glusterfs-server glusterfs-client"
    local policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        # No service starts during the install: the bed runs its own glusterd.
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        glusterfs-server glusterfs-client >&2 || rc=$?
    [ -n "$policy" ] && rm -f /usr/sbin/policy-rc.d
    [ "$rc" = 0 ] || die "apt-get install glusterfs-server glusterfs-client failed ($rc)"
    command -v glusterd >/dev/null || die "glusterd missing after install"
    command -v glusterfs >/dev/null || die "glusterfs (FUSE client) missing after install"
}

up() {
    [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, FUSE mounts)"
    [ -c /dev/fuse ] || die "/dev/fuse is missing"
    install_if_missing
    down
    trap 'rc=$?; [ "$rc" = 0 ] || { say "set-up failed; tearing down"; down; }' EXIT
    mkdir -p "$W"/{state,log,run,brick,mA,mB}
    cp -a /var/lib/glusterd/. "$W/state/" 2>/dev/null || true

    ip netns add vhg-br
    ip -n vhg-br link set lo up
    ip -n vhg-br link add br0 type bridge
    ip -n vhg-br link set br0 up
    local i=1 n
    for n in srv A B; do
        ip netns add "vhg-$n"
        ip link add "vhg$n" type veth peer name "vhg${n}b"
        ip link set "vhg$n" netns "vhg-$n"
        ip link set "vhg${n}b" netns vhg-br
        ip -n vhg-br link set "vhg${n}b" master br0 up
        ip -n "vhg-$n" link set lo up
        ip -n "vhg-$n" addr add "10.79.0.$i/24" dev "vhg$n"
        ip -n "vhg-$n" link set "vhg$n" up
        i=$((i + 1))
    done

    ip netns exec vhg-srv unshare --mount --propagation private sh -c "
        mount --bind '$W/state' /var/lib/glusterd &&
        mkdir -p /var/log/glusterfs '$W/run/gluster' &&
        mount --bind '$W/log' /var/log/glusterfs &&
        mount --bind '$W/run' /run &&
        exec glusterd -N -p '$W/glusterd.pid'" >"$W/glusterd.out" 2>&1 &
    local gdp=
    for _ in $(seq 1 200); do
        if [ -S "$W/run/glusterd.socket" ] && [ -s "$W/glusterd.pid" ]; then
            gdp=$(cat "$W/glusterd.pid")
            break
        fi
        sleep 0.1
    done
    [ -n "$gdp" ] || die "glusterd did not start: $(cat "$W/glusterd.out")"
    G() { nsenter -t "$gdp" -m -n gluster --mode=script "$@"; }
    G volume create "$VOL" "$SRV:$W/brick" force >/dev/null
    local o
    for o in "network.ping-timeout $PT" "server.tcp-user-timeout $PT" \
        "client.tcp-user-timeout $PT" "server.keepalive-time 2" \
        "server.keepalive-interval 1" "server.keepalive-count 3" \
        "performance.stat-prefetch off" "performance.open-behind off" \
        "performance.quick-read off" "performance.io-cache off" \
        "performance.read-ahead off"; do
        # shellcheck disable=SC2086
        G volume set "$VOL" $o >/dev/null || die "volume option '$o' refused"
    done
    G volume start "$VOL" >/dev/null
    for n in A B; do
        nsenter --net="/run/netns/vhg-$n" glusterfs --volfile-server="$SRV" \
            --volfile-id="$VOL" --attribute-timeout=0 --entry-timeout=0 \
            --fopen-keep-cache=off \
            --pid-file="$W/m$n.pid" --log-file="$W/log/m$n.log" "$W/m$n"
    done
    for _ in $(seq 1 100); do
        mountpoint -q "$W/mA" && mountpoint -q "$W/mB" && break
        sleep 0.1
    done
    mountpoint -q "$W/mA" || die "mount A missing"
    mountpoint -q "$W/mB" || die "mount B missing"
    # The brick may need a moment after the mount before it serves.
    for _ in $(seq 1 100); do
        echo bed >"$W/mA/.bed" 2>/dev/null && [ "$(cat "$W/mB/.bed" 2>/dev/null)" = bed ] && break
        sleep 0.1
    done
    [ "$(cat "$W/mB/.bed" 2>/dev/null)" = bed ] || die "a file written through A is not visible through B"
    rm -f "$W/mA/.bed"
    trap - EXIT
    say "up: $W/mA (host A) and $W/mB (host B), volume $VOL, ping-timeout ${PT}s"
}

link() { # up|down A|B
    case "${2:-}" in A | B) ;; *) die "usage: bed.sh cut|heal A|B" ;; esac
    ip -n vhg-br link set "vhg${2}b" "$1"
}

case "${1:-}" in
up) up ;;
down) down ;;
cut) link down "${2:-}" ;;
heal) link up "${2:-}" ;;
*) die "usage: bed.sh up|down|cut A|heal A" ;;
esac
