#!/usr/bin/env bash
# A short fuzzing pass for CI: every cargo-fuzz target runs for FUZZ_SECONDS (default
# 20) from the committed corpus, under AddressSanitizer; any crash, panic, leak or
# timeout fails the run. The committed corpus is only read: new inputs go to a
# scratch directory. See fuzz/README.md.
#
#   FUZZ_SECONDS=60 fuzz/ci.sh                 # longer
#   FUZZ_SANITIZER=none fuzz/ci.sh             # faster build and runs, no ASan
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-20}
sanitizer=${FUZZ_SANITIZER:-address}
targets=(rpc_decode config_parse restart_state server_sequence)

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes -Zsanitizer (and -Cpasses=sancov-module); stable rustc ships the
# ASan runtime and accepts the flag with RUSTC_BOOTSTRAP=1, so no nightly is needed.
export RUSTC_BOOTSTRAP=1

cargo fuzz build -s "$sanitizer"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    echo "fuzz/ci.sh: $t for ${seconds}s"
    # The first directory receives new inputs; corpus/$t is read only.
    if ! cargo fuzz run -s "$sanitizer" "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
        tail -n 60 "$scratch/$t.log" >&2
        echo "fuzz/ci.sh: $t failed; the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    grep -E '^#[0-9]+[[:space:]]+DONE' "$scratch/$t.log" || true
done
