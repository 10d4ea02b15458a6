#!/usr/bin/env bash
# Builds the cargo-fuzz targets and fuzzes each for SECONDS (default 30), starting
# from the committed seeds. Fails on a crash, leaving the input in artifacts/TARGET/.
# See README.md.
#
#   gateway/fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-30}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(protocol_parse handshake_head)

# The build `cargo fuzz build --sanitizer none` makes, done with cargo itself so that CI
# needs no cargo-fuzz (its install takes minutes). cargo-fuzz's flags, as of 0.13.2:
# sancov instrumentation, `--cfg fuzzing`, one codegen unit, release with line tables.
# `RUSTC_BOOTSTRAP=1`: libfuzzer-sys uses nightly features; only stable is installed.
# No sanitizer: the code under test is safe Rust (unsafe_code is forbidden), and
# without ASan the build is shorter and the targets run 5-7 times faster.
export RUSTC_BOOTSTRAP=1
triple="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Cllvm-args=-sanitizer-coverage-stack-depth \
-Ccodegen-units=1"
# The instrumented build of the dependencies is kept between runs (FUZZ_TARGET_DIR).
target_dir="${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gateway-fuzz/target}"
start=$(date +%s)
cargo build --manifest-path Cargo.toml --target "$triple" --release \
    --config 'profile.release.debug="line-tables-only"' --target-dir "$target_dir" --bins
echo "fuzz: built in $(($(date +%s) - start)) s"
bin_dir="$target_dir/$triple/release"

for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    log="$(mktemp)"
    mkdir -p "artifacts/$target"
    if ! "$bin_dir/$target" -artifact_prefix="artifacts/$target/" \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        -dict="$PWD/dicts/$target.dict" "corpus/$target" "seeds/$target" >"$log" 2>&1; then
        grep -E -A8 "panicked at|^==[0-9]+== ?ERROR" "$log" | head -n 30 || tail -n 30 "$log"
        artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | head -n 1)"
        echo "fuzz: $target FAILED; input: ${artifact:-gateway/fuzz/artifacts/$target/}"
        echo "fuzz: replay with: $bin_dir/$target ${artifact:-<input>} (or cargo fuzz run $target <input>)"
        rm -f "$log"
        exit 1
    fi
    runs="$(grep -o '^Done [0-9]* runs in [0-9]* second(s)' "$log" || true)"
    stats="$(grep -E '^stat::(average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" |
        sed 's/^stat:://' | tr -s ' \n' ' ')"
    echo "fuzz: $target: ${runs:-no summary}, no crash; corpus $(find "corpus/$target" -type f | wc -l) inputs; $stats"
    rm -f "$log"
done
