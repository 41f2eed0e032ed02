#!/usr/bin/env bash
# Brings up the GlusterFS bed (bed.sh), runs the cross-host tests on it
# (tests/tests/gluster.rs, ignored in a plain `cargo test`), and tears the bed down,
# whatever happens. Needs root; installs glusterfs-server/-client if missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export VH_GLUSTER_DIR=${VH_GLUSTER_DIR:-/tmp/vh-gluster}
export VH_GLUSTER_BED="$here/bed.sh"
trap '"$here/bed.sh" down' EXIT
"$here/bed.sh" up
cd "$here/../.."
cargo test -p vh-tests --test gluster -- --ignored --test-threads=1 "$@"
