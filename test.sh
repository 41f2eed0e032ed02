#!/usr/bin/env bash
# Runs every test: unit and property tests, the fixture conformance replays, the
# differential tests against Debian 12's C daemons, re-exec tests, virt-admin
# comparisons, and the interop test with real libvirtd 9.0 + QEMU (TCG).
#
# Needs root (the integration tests run each daemon, ours and C, in system mode
# inside a private mount namespace). On a fresh Debian 12 machine it installs
# the peers it needs (libvirt 9.0, QEMU) first; a missing peer fails the run.
set -euo pipefail
cd "$(dirname "$0")"
if [[ $(id -u) != 0 ]]; then
    echo "test.sh: the integration tests need root (mount namespaces, system-mode daemons)" >&2
    exit 1
fi
.ci/install-deps
cargo build --workspace --all-targets
# Integration tests spawn the daemons from target/debug; they were built above.
cargo test --workspace --no-fail-fast -- --test-threads=2
# INTEROP_REEXEC=1 adds the zero-downtime upgrade under a live guest: C -> ours -> C.
INTEROP_REEXEC=1 VIRTLOGD_BIN="$PWD/target/debug/virtlogd" VIRTLOCKD_BIN="$PWD/target/debug/virtlockd" \
    tests/interop/run.sh
fuzz/ci.sh  # each cargo-fuzz target for 20 s from its committed corpus (fuzz/README.md)
