#!/usr/bin/env bash
# Runs every test: unit and property tests, the fixture conformance replays, the
# differential tests against Debian 12's C daemons, re-exec tests, virt-admin
# comparisons, and the interop test with real libvirtd 9.0 + QEMU (TCG).
#
# Needs root (the integration tests run each daemon, ours and C, in system mode
# inside a private mount namespace) and the Rust toolchain. On a fresh Debian 12
# machine it installs the peers it needs (libvirt 9.0, QEMU, a C linker) first;
# a missing peer fails the run, nothing is skipped.
#
# Every stage runs even if an earlier test stage failed; the output ends with a
# summary of what ran (one line per test binary, the interop checks) and the
# script exits non-zero if anything failed. Full logs: target/test-logs/.
set -euo pipefail
cd "$(dirname "$0")"

fatal() { printf 'test.sh: FAILED: %s\n' "$*" >&2; exit 1; }
on_err() { printf 'test.sh: FAILED: line %s: "%s" exited %s\n' "$1" "$2" "$3" >&2; }
trap 'on_err "$LINENO" "$BASH_COMMAND" "$?"' ERR

[[ $(id -u) == 0 ]] || fatal "the integration tests need root (mount namespaces, system-mode daemons)"
command -v cargo >/dev/null 2>&1 ||
    fatal "cargo not found on PATH (the Rust toolchain, ~/.cargo/bin, is a prerequisite)"

.ci/install-deps || fatal ".ci/install-deps failed (see its ERROR line above)"
cargo build --workspace --all-targets || fatal "cargo build failed"

LOGS=$PWD/target/test-logs
mkdir -p "$LOGS"
t0=$SECONDS

# Integration tests spawn the daemons from target/debug; they were built above.
set +e; trap - ERR
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$LOGS/cargo-test.log"
cargo_rc=${PIPESTATUS[0]}
# Each further stage is a script that prints one "PASS ..." or "FAIL ..." line per
# check; its log goes to $LOGS/NAME.log and the summary counts the lines.
STAGES=()
declare -A STAGE_RC
stage() {
    local name=$1; shift
    STAGES+=("$name")
    echo
    echo "==================================== stage $name: $*"
    "$@" 2>&1 | tee "$LOGS/$name.log"
    STAGE_RC[$name]=${PIPESTATUS[0]}
}
# INTEROP_REEXEC=1 adds the zero-downtime upgrade under a live guest: C -> ours -> C.
stage interop env INTEROP_REEXEC=1 VIRTLOGD_BIN="$PWD/target/debug/virtlogd" \
    VIRTLOCKD_BIN="$PWD/target/debug/virtlockd" tests/interop/run.sh
# The Debian package (debug build) installed and removed under a live libvirtd + QEMU guest.
stage interop-deb bash -c 'deb=$(VH_DEB_PROFILE=debug VH_DEB_NO_BUILD=1 packaging/deb.sh) && INTEROP_DEB=$deb exec tests/interop/run.sh'
# libvirt 11.3 (Debian 13) in a cached debootstrap root: see its README.
stage interop11 tests/interop11/run.sh
# Our units and daemons under a real systemd 252 and 257 (systemd-nspawn).
stage systemd tests/systemd/run.sh
# Cross-host leases and fencing on a real GlusterFS volume (brings its bed up and down).
stage gluster tests/gluster/run.sh
# Crash survival (issue 15): both daemons with the fd store under a real systemd 252
# (nspawn): SIGKILL, restart, reload; then 9.0's C daemons with Debian's units (baseline).
stage systemd-crash tests/systemd-crash/run.sh
# OFD vs POSIX byte-0 locks across two GlusterFS clients.
stage ofd-gluster tests/ofd-gluster/run.sh
# Each cargo-fuzz target for 20 s from its committed corpus (fuzz/README.md).
stage fuzz fuzz/ci.sh
set -e; trap 'on_err "$LINENO" "$BASH_COMMAND" "$?"' ERR

# ------------------------------------------------------------------ summary
echo
echo "==================================== summary ===================================="
# One line per test binary: cargo prints "Running SRC (target/.../deps/NAME-HASH)" or
# "Doc-tests NAME" before each binary's "test result:" line.
awk '
    /^ +Running / {
        bin = $NF; gsub(/[()]/, "", bin); sub(/.*\//, "", bin); sub(/-[0-9a-f]+$/, "", bin)
        src = ($2 == "unittests") ? $3 : $2
        name = bin " " src; next
    }
    /^ +Doc-tests / { name = $2 " doc-tests"; next }
    # cargo lists the failed tests under a second "failures:" heading.
    /^failures:$/ { inf = 1; next }
    inf && /^(---- |test result)/ { inf = 0 }
    inf && /^    [^ ]/ { sub(/^ +/, ""); failed[++nf] = name ": " $0; next }
    /^test result: / {
        r = $0; sub(/^test result: /, "", r); sub(/; [0-9]+ measured.*/, "", r)
        printf "  %-48s %s\n", name, r
        for (i = 1; i <= NF; i++) {
            if ($i ~ /^passed/) p += $(i - 1)
            if ($i ~ /^failed/) f += $(i - 1)
            if ($i ~ /^ignored/) ig += $(i - 1)
        }
        n++
    }
    END {
        for (i = 1; i <= nf; i++) printf "  FAILED %s\n", failed[i]
        printf "cargo test: %d binaries, %d passed, %d failed, %d ignored\n", n, p, f, ig
    }' "$LOGS/cargo-test.log"
[[ $cargo_rc == 0 ]] || echo "cargo test exited $cargo_rc"
ok=1
[[ $cargo_rc == 0 ]] || ok=
for name in "${STAGES[@]}"; do
    log=$LOGS/$name.log
    grep -E '^FAIL ' "$log" | sed "s/^/  $name /" || true
    np=$(grep -c '^PASS ' "$log" || true)
    nf=$(grep -c '^FAIL ' "$log" || true)
    rc=${STAGE_RC[$name]}
    # A stage that runs cargo tests reports its own "test result:" lines.
    tr=$(grep -E '^test result:' "$log" | tail -n 1 || true)
    echo "$name: $np checks passed, $nf failed, exit $rc${tr:+ ($tr)}"
    [[ $rc == 0 && $nf == 0 ]] || ok=
done
echo "logs: $LOGS/; test time $((SECONDS - t0)) s"
if [[ -n $ok ]]; then
    echo "test.sh: ALL PASSED"
else
    echo "test.sh: FAILED"
    exit 1
fi
