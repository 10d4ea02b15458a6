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

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --locked cargo-fuzz@0.13.2
fi
# cargo-fuzz passes nightly-only flags to rustc; only a stable toolchain is installed.
export RUSTC_BOOTSTRAP=1
# The instrumented build of the dependencies is kept between runs (FUZZ_TARGET_DIR).
# No sanitizer: the code under test is safe Rust (unsafe_code is forbidden), and
# without ASan the build is shorter and the targets run 5-7 times faster.
target_dir="${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gateway-fuzz/target}"
flags=(--sanitizer none --target-dir "$target_dir")
start=$(date +%s)
cargo fuzz build "${flags[@]}"
echo "fuzz: built in $(($(date +%s) - start)) s"

for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    log="$(mktemp)"
    if ! cargo fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        -dict="$PWD/dicts/$target.dict" >"$log" 2>&1; then
        grep -E -A8 "panicked at|^==[0-9]+== ?ERROR" "$log" | head -n 30 || tail -n 30 "$log"
        artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | head -n 1)"
        echo "fuzz: $target FAILED; input: ${artifact:-gateway/fuzz/artifacts/$target/}"
        echo "fuzz: replay with: cd gateway/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $target ${artifact:-<input>}"
        rm -f "$log"
        exit 1
    fi
    runs="$(grep -o '^Done [0-9]* runs in [0-9]* second(s)' "$log" || true)"
    stats="$(grep -E '^stat::(average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" |
        sed 's/^stat:://' | tr -s ' \n' ' ')"
    echo "fuzz: $target: ${runs:-no summary}, no crash; corpus $(find "corpus/$target" -type f | wc -l) inputs; $stats"
    rm -f "$log"
done
