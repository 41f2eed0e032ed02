# shellcheck shell=bash
# Builds (once) and caches the Debian 13 "trixie" root with libvirt 11.3 + QEMU 10 that
# run.sh runs its peers from (tests/systemd/run.sh also boots its systemd 257).  Sourced
# by both; runs on the host as root.
#
# The root is built into a temporary directory and renamed into place only when complete,
# under a lock, so an interrupted or concurrent build never leaves a half-built cache.
# Runs never write into it: run.sh mounts an overlay over it.
#
# The cache key is CHROOT_STAMP: bump it when the package list or set-up changes.

CHROOT_STAMP=trixie-libvirt11-v2
CACHE_DIR=${INTEROP11_CACHE:-/var/cache/virt-helpers}
CHROOT=$CACHE_DIR/$CHROOT_STAMP
# Only what the scenario needs.  --no-install-recommends leaves out virtlockd
# (libvirt-daemon-lock) and the lockd plugin (libvirt-daemon-plugin-lockd), so they are
# named here.  libvirt-daemon-system brings libvirtd (trixie ships no modular daemons).
CHROOT_PACKAGES=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
    libvirt-daemon-log libvirt-daemon-lock libvirt-daemon-plugin-lockd
    qemu-system-x86 qemu-utils
    libfaketime      # the cleaner differential fakes the clock of both virtlogds
    procps           # /bin/kill for the units' ExecReload (every real install has it)
    python3-minimal) # tests/systemd's lock-owner client

_mirror() {
    local m
    m=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
    [[ -n $m ]] || m=$(awk '$1 == "deb" && $2 ~ /debian\/?$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
    echo "${m:-http://deb.debian.org/debian}"
}

# ensure_debootstrap: install it from Debian's packages if missing; fatal when impossible.
ensure_debootstrap() {
    command -v debootstrap >/dev/null 2>&1 && [[ -e /usr/share/debootstrap/scripts/trixie ]] && return 0
    log "installing debootstrap from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2 ||
        { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2; } ||
        die "cannot install debootstrap with apt-get"
    [[ -e /usr/share/debootstrap/scripts/trixie ]] || die "this debootstrap has no script for trixie"
}

# build_chroot: make $CHROOT exist (a no-op when cached).
build_chroot() {
    mkdir -p "$CACHE_DIR" || die "cannot create $CACHE_DIR"
    exec 9>"$CACHE_DIR/.$CHROOT_STAMP.lock"
    flock 9 || die "cannot lock $CACHE_DIR/.$CHROOT_STAMP.lock"
    if [[ -f $CHROOT/.complete ]]; then
        exec 9>&-
        return 0
    fi
    ensure_debootstrap
    local mirror tmp t0=$SECONDS
    mirror=$(_mirror)
    tmp=$CACHE_DIR/.$CHROOT_STAMP.building
    rm -rf "$tmp"
    log "building the trixie root in $tmp from $mirror (first run only; a few minutes)"
    debootstrap --variant=minbase trixie "$tmp" "$mirror" >"$CACHE_DIR/$CHROOT_STAMP.debootstrap.log" 2>&1 ||
        die "debootstrap trixie failed (see $CACHE_DIR/$CHROOT_STAMP.debootstrap.log)"
    cat >"$tmp/etc/apt/sources.list" <<SRC
deb $mirror trixie main
deb $mirror trixie-updates main
deb ${mirror%/debian}/debian-security trixie-security main
SRC
    # Package scripts must not start daemons inside the root.
    printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
    chmod 755 "$tmp/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$tmp/etc/resolv.conf"
    # apt needs /proc and /dev; a private mount namespace keeps those mounts off the host.
    unshare -m --propagation private sh -c '
        mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && mount --make-rslave "$1/dev" &&
        shift && chroot "$@"' sh "$tmp" "$tmp" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive sh -c \
        "apt-get update -q && apt-get install -y -q --no-install-recommends ${CHROOT_PACKAGES[*]} && apt-get clean" \
        >"$CACHE_DIR/$CHROOT_STAMP.apt.log" 2>&1 ||
        die "apt-get in the trixie root failed (see $CACHE_DIR/$CHROOT_STAMP.apt.log)"
    [[ -x $tmp/usr/sbin/libvirtd && -x $tmp/usr/sbin/virtlogd && -x $tmp/usr/sbin/virtlockd &&
        -e $tmp/usr/lib/x86_64-linux-gnu/libvirt/lock-driver/lockd.so ]] ||
        die "the trixie root lacks libvirtd, virtlogd, virtlockd or the lockd plugin"
    date -u +%FT%TZ >"$tmp/.complete"
    rm -rf "$CHROOT"
    mv "$tmp" "$CHROOT" || die "cannot move the finished root to $CHROOT"
    log "trixie root ready in $((SECONDS - t0))s"
    # Roots of earlier stamps are dead weight (~450 MB each).
    find "$CACHE_DIR" -maxdepth 1 -name 'trixie-libvirt11-*' ! -name "$CHROOT_STAMP*" \
        -exec rm -rf {} + 2>/dev/null
    exec 9>&-
}
