#!/bin/sh
# One command: build our daemons and the bench, then measure ours and the C daemons
# and write bench/RESULTS.md + bench/growth.svg. Must run as root (unshare -m).
# Extra arguments go to vh-bench (e.g. --quick, --dir /var/tmp/x, --keep).
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p virtlogd -p virtlockd -p vh-bench
exec target/release/vh-bench all "$@"
