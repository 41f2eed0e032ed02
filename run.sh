#!/usr/bin/env bash
# Builds both daemons and runs them in the foreground until Ctrl-C.
# As a normal user they run in session mode: sockets, pid files and the re-exec
# state live in $XDG_RUNTIME_DIR/libvirt (or ~/.cache/libvirt), exactly where
# libvirt's session clients look. As root they are the system daemons
# (/run/libvirt/virtlogd-sock, /run/libvirt/virtlockd-sock).
set -euo pipefail
cd "$(dirname "$0")"
command -v cargo >/dev/null 2>&1 || { echo "run.sh: cargo not found: install the Rust toolchain (https://rustup.rs, then open a new shell) and a C linker (apt-get install gcc)" >&2; exit 1; }
cargo build --release -p virtlogd -p virtlockd
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT INT TERM
./target/release/virtlogd --verbose "$@" &
./target/release/virtlockd --verbose "$@" &
wait
