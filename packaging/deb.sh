#!/usr/bin/env bash
# Builds the Debian package target/debian/virt-helpers_VERSION_ARCH.deb:
#   /usr/sbin/virtlogd, /usr/sbin/virtlockd  ours, libvirt's diverted to *.libvirt
#   /usr/bin/vhctl
#   /usr/share/man/man8/virtlogd.8.gz, virtlockd.8.gz (libvirt's diverted),
#   /usr/share/man/man1/vhctl.1.gz           rendered by `vhctl man` from the --help source
# Maintainer scripts (packaging/debian/): preinst diverts, postinst re-executes the
# running daemons into ours, postrm puts libvirt's back and re-executes into them.
#
# dpkg-deb rather than cargo-deb: it is part of dpkg (no extra tool to install and
# pin), and the interesting parts here are the maintainer scripts and diversions,
# which cargo-deb would only copy from files like these anyway.
#
# VH_DEB_PROFILE=debug packages the debug build (what the tests use); default release.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'deb.sh: %s\n' "$*" >&2; exit 1; }
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (Debian's dpkg package)"
[[ -n ${VH_DEB_NO_BUILD:-} ]] || command -v cargo >/dev/null || die "cargo not found (install the Rust toolchain: https://rustup.rs)"

profile=${VH_DEB_PROFILE:-release}
# VH_DEB_NO_BUILD=1 packages what is already built (the tests, inside `cargo test`).
[[ -n ${VH_DEB_NO_BUILD:-} ]] && build=: || build=cargo
case $profile in
    release) $build build --release -p virtlogd -p virtlockd -p vh-client --bins ;;
    # The whole workspace, as the tests build it (no feature-unification rebuilds).
    debug) $build build --workspace --bins ;;
    *) die "VH_DEB_PROFILE must be release or debug" ;;
esac
bin=target/$profile
for b in virtlogd virtlockd vhctl; do
    [[ -x $bin/$b ]] || die "$bin/$b is not built"
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
[[ -n $version ]] || die "no version in Cargo.toml"
arch=$(dpkg --print-architecture)
# The newest glibc symbol version any binary needs.
glibc=$(objdump -T "$bin/virtlogd" "$bin/virtlockd" "$bin/vhctl" 2>/dev/null |
    grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
[[ -n $glibc ]] || glibc=2.34

# The release package in target/debian/; a debug one (tests) apart, never mistaken for it.
out=target/debian
[[ $profile == release ]] || out=target/debian/$profile
stage=$out/stage
rm -rf "$stage"
mkdir -p "$stage/DEBIAN" "$stage/usr/sbin" "$stage/usr/bin" \
    "$stage/usr/share/man/man8" "$stage/usr/share/man/man1" "$stage/usr/share/doc/virt-helpers"
install -m 0755 "$bin/virtlogd" "$bin/virtlockd" "$stage/usr/sbin/"
install -m 0755 "$bin/vhctl" "$stage/usr/bin/"
if [[ $profile == release ]]; then
    strip --strip-unneeded "$stage/usr/sbin/virtlogd" "$stage/usr/sbin/virtlockd" "$stage/usr/bin/vhctl"
fi
"$bin/vhctl" man virtlogd | gzip -9n >"$stage/usr/share/man/man8/virtlogd.8.gz"
"$bin/vhctl" man virtlockd | gzip -9n >"$stage/usr/share/man/man8/virtlockd.8.gz"
"$bin/vhctl" man vhctl | gzip -9n >"$stage/usr/share/man/man1/vhctl.1.gz"
gzip -9n <README.md >"$stage/usr/share/doc/virt-helpers/README.md.gz"
printf 'virt-helpers\nLicense: LGPL-2.1-or-later\n' >"$stage/usr/share/doc/virt-helpers/copyright"

sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@GLIBC@/$glibc/" \
    packaging/debian/control.in >"$stage/DEBIAN/control"
printf 'Installed-Size: %s\n' "$(du -sk --exclude=DEBIAN "$stage" | cut -f1)" >>"$stage/DEBIAN/control"
for s in preinst postinst postrm; do
    # The shared functions are pasted in: a maintainer script must stand alone.
    awk -v lib=packaging/debian/swap.sh '
        $0 == "#SWAP#" { while ((getline l < lib) > 0) print l; next } { print }
    ' "packaging/debian/$s" >"$stage/DEBIAN/$s"
    chmod 0755 "$stage/DEBIAN/$s"
    sh -n "$stage/DEBIAN/$s" || die "syntax error in $s"
done
deb=$out/virt-helpers_${version}_${arch}.deb
# A debug package (tests only) is big and short-lived: compress it fast.
[[ $profile == release ]] && z=(-Zxz) || z=(-Zgzip -z1)
dpkg-deb --root-owner-group "${z[@]}" --build "$stage" "$deb" >/dev/null
echo "$deb"
